"""`ditpass serve` as an operator runs it: the real service (torchrun, 2 CPU processes, gloo; or one process) and a
real HTTP client. One service is shared by the tests that leave it running; the tests that stop it start their own.
"""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cli_utils import ENV, run_generate, saved_images
from ditpass.tools.serve import agree

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

STEPS = 8  # the generations of this file: quick on CPU, and the shared service's --max_steps


class Served:
    """A running ``ditpass serve``: its launcher process (own process group), URL and log file."""

    def __init__(self, proc, port, log, cwd):
        self.proc, self.port, self.log, self.cwd = proc, port, log, cwd
        self.pids: list[int] = []  # every rank's, once it answers
        self.url = f"http://127.0.0.1:{port}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def info(self) -> dict:
        return httpx.get(self.url + "/info", timeout=10).json()

    def post(self, body, timeout=60, **kw):
        return httpx.post(self.url + "/generate", json=body, timeout=timeout, **kw)

    def wait_exit(self, seconds: float) -> int:
        try:
            return self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the service did not exit within {seconds} s; its log:\n{self.text()[-3000:]}")

    def kill(self):
        """End the launcher and every rank: SIGTERM to the launcher (torchrun passes it on), then SIGKILL to what is
        left. torchrun starts its workers in sessions of their own: killing the launcher's group would orphan them."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    ours = f"\0--port\0{self.port}\0".encode() in f.read()  # (not a new process with this pid)
            except OSError:
                continue  # gone
            if ours:
                os.kill(pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(log_dir, *flags, nproc: int = 2, deadline: float = 180, script=None) -> Served:
    """``ditpass serve --port <free> <flags>`` under torchrun (nproc > 1) or alone (``script``: a file that runs
    the command instead of ``-m ditpass serve``); returns once /health says ok."""
    port = free_port()
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    command = [str(script)] if script else ["-m", "ditpass", "serve"]
    log = log_dir / f"serve_{port}.log"
    cwd = log_dir / f"cwd_{port}"  # empty: where a relative path from a client would land
    cwd.mkdir()
    with open(log, "w") as f:
        proc = subprocess.Popen(launcher + command + ["--port", str(port), *flags], env=ENV, cwd=cwd,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    served = Served(proc, port, log, cwd)
    t_end = time.monotonic() + deadline
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            pytest.fail(f"ditpass serve exited with {proc.returncode} before it answered:\n{served.text()[-3000:]}")
        try:
            if httpx.get(served.url + "/health", timeout=2).status_code == 200:
                served.pids = [r["pid"] for r in served.info()["ranks"]]
                return served
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    served.kill()
    pytest.fail(f"ditpass serve did not answer /health within {deadline} s:\n{served.text()[-3000:]}")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    served = start(tmp_path_factory.mktemp("serve"), "--use_cfg_parallel", "--max_steps", str(STEPS),
                   "--max_batch", "4", "--queue_size", "2")
    try:
        yield served
    finally:
        served.kill()


def picture(png: bytes):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def test_agree():
    assert agree([None, None]) == "ok"
    assert agree([("user", "PlanError: x"), ("user", "PlanError: x")]) == "error"
    assert agree([("error", "boom"), None]) == "split"
    assert agree([("error", "rank 0 timed out"), ("error", "rank 1 timed out")]) == "split"


def test_same_pixels_as_generate(service, tmp_path):
    """A request equals ``ditpass generate`` with the same prompt, seed and steps (one process there, cfg=2 on
    two here): the seed is a torch.Generator("cpu"), as generate's."""
    proc = run_generate(tmp_path, nproc=1, steps=STEPS)  # --prompt 3 7 --seed 0
    assert proc.returncode == 0, proc.stderr[-3000:]
    three, seven = saved_images(tmp_path)
    r = service.post({"prompt": "3", "seed": 0, "num_inference_steps": STEPS})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-plan"] == "Plan(cfg=2)" and int(r.headers["x-steps"]) == STEPS
    assert float(r.headers["x-seconds"]) > 0
    got = picture(r.content)
    assert got.shape == three.shape == (32, 32)
    assert np.abs(got - three).max() <= 1

    r = service.post({"prompt": ["3", "7"], "seed": 0, "num_inference_steps": STEPS, "output": "json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prompts"] == ["3", "7"] and body["plan"] == "Plan(cfg=2)" and body["world_size"] == 2
    assert body["seconds"] > 0 and body["steps"] == STEPS and (body["width"], body["height"]) == (32, 32)
    for b64, want in zip(body["images"], (three, seven), strict=True):
        assert np.abs(picture(base64.b64decode(b64)) - want).max() <= 1


BAD = {
    "wrong type: steps as text": {"prompt": "3", "num_inference_steps": "8"},
    "wrong type: steps as float": {"prompt": "3", "num_inference_steps": 8.0},
    "wrong type: seed as bool": {"prompt": "3", "seed": True},
    "wrong type: prompt as number": {"prompt": 3},
    "negative steps": {"prompt": "3", "num_inference_steps": -1},
    "zero steps": {"prompt": "3", "num_inference_steps": 0},
    "steps over --max_steps": {"prompt": "3", "num_inference_steps": STEPS + 1},
    "huge steps": {"prompt": "3", "num_inference_steps": 10**12},
    "huge size": {"prompt": "3", "height": 100000, "width": 100000},
    "a size not the model's": {"prompt": "3", "height": 64},
    "frames for a picture model": {"prompt": "3", "num_frames": 8},
    "negative seed": {"prompt": "3", "seed": -1},
    "huge seed": {"prompt": "3", "seed": 2**70},
    "guidance infinite": b'{"prompt": "3", "guidance_scale": 1e309}',
    "guidance NaN": b'{"prompt": "3", "guidance_scale": NaN}',
    "not JSON": b'{not json',
    "guidance over the bound": {"prompt": "3", "guidance_scale": 1e6},
    "unknown field": {"prompt": "3", "output_dir": "/tmp/x"},
    "unknown label": {"prompt": "cat"},
    "empty prompt list": {"prompt": []},
    "too many prompts": {"prompt": ["1"] * 5},
    "no prompt": {"seed": 1},
    "no steps: the model's default is over --max_steps": {"prompt": "3"},  # digits: 20 steps
    "path as prompt": {"prompt": "../../x"},
    "path in a prompt list": {"prompt": ["3", "../../x"]},
    "path as negative prompt": {"prompt": "3", "negative_prompt": "../../x"},
    "path as output": {"prompt": "3", "output": "../../x"},
    "absolute path as output": {"prompt": "3", "output": "/tmp/x.png"},
    "not an object": ["3"],
}


def test_bad_requests_are_refused_and_the_service_goes_on(service):
    for what, body in BAD.items():
        if isinstance(body, bytes):
            r = httpx.post(service.url + "/generate", content=body, headers={"content-type": "application/json"})
        else:
            r = service.post(body)
        assert r.status_code == 422, (what, r.status_code, r.text)
        assert r.json()["detail"], what
    msg = {what: " ".join(e["msg"] for e in service.post(BAD[what]).json()["detail"]) for what in
           ("a size not the model's", "path as negative prompt", "unknown label", "steps over --max_steps",
            "no steps: the model's default is over --max_steps")}
    assert "fixed size: 32x32" in msg["a size not the model's"]
    assert "takes no negative_prompt" in msg["path as negative prompt"]
    assert "'0', '1'" in msg["unknown label"]
    assert f"less than or equal to {STEPS}" in msg["steps over --max_steps"]
    assert "Field required" in msg["no steps: the model's default is over --max_steps"]

    # a request that every rank fails alike, during the generation: cfg=2 needs the two CFG halves, which DiT
    # makes only with guidance_scale > 1; all ranks agree, the service goes on
    r = service.post({"prompt": "3", "guidance_scale": 1.0, "num_inference_steps": 2})
    assert r.status_code == 422 and "PlanError" in r.json()["detail"][0]["msg"], r.text
    r = service.post({"prompt": "5", "num_inference_steps": 2})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    # nothing written where a client pointed: the service writes no files
    assert os.listdir(service.cwd) == [] and not os.path.exists(service.cwd.parent.parent / "x")


def test_concurrent_requests_are_served_or_refused(service):
    """16 clients at once on a queue of 2: each gets 200 or 503 (none lost or hung), and some get 503."""
    n = 16
    codes: list = [None] * n
    barrier = threading.Barrier(n)

    def client(i):
        barrier.wait()
        try:
            codes[i] = service.post({"prompt": ["1", "2", "3", "4"], "seed": i, "num_inference_steps": STEPS},
                                    timeout=120).status_code
        except httpx.HTTPError as e:
            codes[i] = repr(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert all(not t.is_alive() for t in threads), "a request hung"
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 1, codes
    info = service.info()
    assert info["queue"] == {"length": 0, "size": 2} and info["running"] is None
    assert httpx.get(service.url + "/health").json() == {"status": "ok"}
    assert service.post({"prompt": "8", "num_inference_steps": 1}).status_code == 200


def test_info_and_page(service):
    info = service.info()
    assert info["model"] == "digits" and info["pipeline"] == "DiTPipeline" and info["world_size"] == 2
    assert info["plan"] == "Plan(cfg=2)" and info["labels"] == [str(i) for i in range(10)]
    assert [r["rank"] for r in info["ranks"]] == [0, 1] and all(r["pid"] > 0 for r in info["ranks"])
    assert info["limits"]["max_steps"] == STEPS and info["size"] == {"width": 32, "height": 32}
    page = httpx.get(service.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<form" in page.text and "fetch(" in page.text and "http" not in page.text.split("<body>")[1]
    schema = httpx.get(service.url + "/openapi.json").json()
    body = schema["components"]["schemas"]["GenerateRequest"]
    assert body["additionalProperties"] is False
    assert body["properties"]["num_inference_steps"]["maximum"] == STEPS
    assert "num_inference_steps" in body["required"]  # digits' default, 20 steps, is over the limit
    assert info["default_steps"] == 20


def test_progress_of_the_running_request(service):
    """/info shows the running request's step while it runs."""
    seen = []
    done = threading.Event()

    def poll():
        while not done.is_set():
            running = service.info()["running"]
            if running:
                seen.append((running["step"], running["steps"]))
            time.sleep(0.02)

    t = threading.Thread(target=poll)
    t.start()
    try:
        for _ in range(5):
            assert service.post({"prompt": ["1", "2", "3", "4"], "num_inference_steps": STEPS}).status_code == 200
    finally:
        done.set()
        t.join()
    assert seen and all(steps == STEPS and 0 <= step <= STEPS for step, steps in seen), seen
    assert any(0 < step for step, _ in seen), seen


def test_schemathesis_fuzzing(service, tmp_path):
    """Requests made from the service's own schema: no 5xx, every response as the schema says."""
    exe = shutil.which("schemathesis") or os.path.join(os.path.dirname(sys.executable), "schemathesis")
    if not os.path.exists(exe):
        pytest.skip("schemathesis is not installed (pip install schemathesis)")
    # positive_data_acceptance is left out: a request the schema allows may still be one the plan cannot run
    # (cfg=2 needs DiT's two CFG halves, i.e. guidance_scale > 1), a 422 that a JSON schema cannot say
    cmd = [exe, "run", service.url + "/openapi.json", "--checks", "all", "--exclude-checks", "positive_data_acceptance",
           "--max-examples", "10", "--seed", "1", "--workers", "1", "--request-timeout", "60", "--no-color",
           "--generation-database", "none", "--phases", "examples,coverage,fuzzing"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert httpx.get(service.url + "/health").json() == {"status": "ok"}


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_page_in_a_browser(service, tmp_path):
    """The page's form, in headless Chromium: submit "7" and see the picture."""
    sync_api = pytest.importorskip("playwright.sync_api")
    exe = _browser()
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        except Exception as e:  # noqa: BLE001 - no browser on this machine: nothing to test with
            pytest.skip(f"no Chromium to run (playwright's or a system one): {str(e).splitlines()[0]}")
        try:
            page = browser.new_page(viewport={"width": 900, "height": 600})
            page.goto(service.url + "/")
            page.select_option("select[name=prompt]", "7")
            page.fill("input[name=num_inference_steps]", str(STEPS))
            page.click("button[type=submit]")
            img = page.wait_for_selector("#out img", timeout=60_000)
            page.wait_for_function("document.querySelector('#out img').naturalWidth > 0")
            assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [32, 32]
            assert "steps in" in page.inner_text("#status")
            page.screenshot(path=str(tmp_path / "serve_page.png"))
        finally:
            browser.close()


def test_a_killed_rank_ends_the_service(tmp_path):
    served = start(tmp_path, "--use_cfg_parallel")
    try:
        ranks = served.info()["ranks"]
        os.kill(ranks[1]["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        code = served.wait_exit(60)
        assert code != 0
        assert time.monotonic() - t0 < 60
        log = served.text()
        assert "ditpass serve: " in log and "a rank died or hangs" in log and "exiting" in log, log[-3000:]
        assert re.search(rf"exitcode\s*:\s*1 \(pid: {ranks[0]['pid']}\)", log), log[-3000:]  # torchrun's report
        with pytest.raises(ProcessLookupError):
            os.kill(ranks[0]["pid"], 0)
    finally:
        served.kill()


@pytest.mark.parametrize("target", ["rank 0", "launcher"])
def test_sigterm_stops_every_rank(tmp_path, target):
    """SIGTERM to rank 0: every rank stops, status 0 (torchrun's too). To torchrun: it passes the signal on to every
    rank, which stop so, and then exits 1 itself (to torchrun a signal is a failure)."""
    served = start(tmp_path, "--use_cfg_parallel")
    try:
        assert served.post({"prompt": "2", "num_inference_steps": 2}).status_code == 200
        ranks = served.info()["ranks"]
        os.kill(ranks[0]["pid"] if target == "rank 0" else served.proc.pid, signal.SIGTERM)
        assert served.wait_exit(30) == (0 if target == "rank 0" else 1), served.text()[-3000:]
        log = served.text()
        assert "ditpass serve: stopped after 1 request(s) served, 0 failed" in log, log[-3000:]
        assert "exiting" not in log and "died" not in log
        for r in ranks:
            with pytest.raises(ProcessLookupError):
                os.kill(r["pid"], 0)
    finally:
        served.kill()


LONE_FAILURE = """
import sys
from ditpass.tools import cli, serve

kwargs = serve.Worker.kwargs


def failing(self, request):  # rank 1 alone fails on "9", before its first collective
    if self.rank == 1 and request["prompts"] == ["9"]:
        raise RuntimeError("rank 1 alone fails")
    return kwargs(self, request)


serve.Worker.kwargs = failing
sys.exit(cli.main(["serve", *sys.argv[1:]]))
"""


def test_a_rank_that_fails_alone_stops_the_service(tmp_path):
    """A rank that fails alone leaves the others waiting in a collective: the control group's timeout ends the
    wait, the client gets a 500 that says so, and every rank exits (status 1) instead of hanging."""
    script = tmp_path / "lone_failure.py"
    script.write_text(LONE_FAILURE)
    served = start(tmp_path, "--use_cfg_parallel", "--timeout", "5", script=script)
    try:
        assert served.post({"prompt": "2", "num_inference_steps": 2}).status_code == 200
        t0 = time.monotonic()
        r = served.post({"prompt": "9", "num_inference_steps": 2}, timeout=60)
        assert r.status_code == 500 and "the service stops" in r.json()["detail"], r.text
        assert served.wait_exit(60) != 0
        assert time.monotonic() - t0 < 60
        log = served.text()
        assert "ditpass serve (rank 1): the ranks did not all report" in log, log[-3000:]
        assert "ditpass serve: stopped after 1 request(s) served, 1 failed" in log, log[-3000:]
    finally:
        served.kill()


def test_one_process_and_sigterm(tmp_path):
    """Without torchrun: one process serves, and SIGTERM ends it with status 0."""
    served = start(tmp_path, nproc=1)
    try:
        assert served.info()["world_size"] == 1 and served.info()["plan"] == "Plan()"
        r = served.post({"prompt": "3", "num_inference_steps": STEPS})
        assert r.status_code == 200 and r.headers["x-plan"] == "Plan()"
        os.kill(served.proc.pid, signal.SIGTERM)
        assert served.wait_exit(30) == 0, served.text()[-3000:]
    finally:
        served.kill()
