"""A new user's bad and unusual inputs, run for real and sorted by what they get (CPU; 2 gloo processes where
the case needs ranks): the totals behind RELIABILITY.md.

    python benchmarks/probe_reliability.py            # writes benchmarks/results/reliability_probe.md (~3 min)

Every case ends in one of:

- ``correct``: the result equals the unmodified model's (or a single process's) within float noise;
- ``clear error``: a ditpass error (or a one-line CLI error, exit status 2) that names what is wrong;
- ``silent wrong``: no error, but the result differs;
- ``hang``: no answer within the case's limit;
- ``unclear``: any other exception or traceback;
- ``outside``: a file was written outside the output folder.

The regression tests are in tests/test_reliability.py, tests/test_cli_user.py and tests/test_serve.py; this
script is the census, not the proof.
"""
from __future__ import annotations

import enum
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import ditpass  # noqa: E402
from ditpass.errors import DistributedTimeout, InputMismatchError, PlanError  # noqa: E402

from dist_utils import run_forked  # noqa: E402
from tiny_models import tiny_flux  # noqa: E402

OURS = (PlanError, InputMismatchError, DistributedTimeout)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ROWS: list[dict] = []


def record(group: str, case: str, outcome: str, detail: str = ""):
    ROWS.append(dict(group=group, case=case, outcome=outcome, detail=detail.strip().splitlines()[-1][:160] if detail else ""))
    print(f"{outcome:>12}  {group}: {case}  {ROWS[-1]['detail']}", flush=True)


def close(a, b, tol=1e-4) -> bool:
    return a.shape == b.shape and float((a - b).detach().abs().max()) <= tol


def api_case(group, case, fn):
    """``fn()`` returns True (correct) / False (wrong) or raises."""
    try:
        ok = fn()
        record(group, case, "correct" if ok else "silent wrong")
    except OURS as e:
        record(group, case, "clear error", f"{type(e).__name__}: {e}")
    except TypeError as e:
        record(group, case, "clear error" if "parallelize" in str(e) or "Plan" in str(e) else "unclear",
               f"TypeError: {e}")
    except Exception as e:  # noqa: BLE001 - the census sorts every failure
        record(group, case, "unclear", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=1)}")


def cli_case(group, case, argv, out_dir=None, nproc=1, limit=120, want_inside=None):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    try:
        p = subprocess.run(launcher + ["-m", "ditpass", *argv], capture_output=True, text=True, timeout=limit,
                           env=ENV, cwd=out_dir or ROOT)
    except subprocess.TimeoutExpired:
        return record(group, case, "hang")
    err = p.stderr
    if want_inside is not None:
        root, names = want_inside
        outside = [f for f in names if os.path.exists(f) and not os.path.realpath(f).startswith(os.path.realpath(root))]
        if outside:
            return record(group, case, "outside", outside[0])
    if p.returncode == 0:
        return record(group, case, "correct")
    line = [x for x in err.splitlines() if "error:" in x]
    # one process: exit status 2 and the line, no traceback before it; under torchrun (which exits 1 and prints
    # its own report) the workers' line, which the report repeats as the root cause
    if line and (p.returncode == 2 and "Traceback" not in err.split(line[0])[0][-2000:]
                 or nproc > 1 and "traceback : GenerateError" in err):
        return record(group, case, "clear error", line[0])
    record(group, case, "unclear", (err or p.stdout)[-400:])


# ---- the cases ------------------------------------------------------------------------------------


def api_cases():
    g = "parallelize arguments"
    model, inputs = tiny_flux()
    for name, bad in (("a lambda", lambda x: x), ("a string", "flux"), ("None", None), ("an int", 3)):
        api_case(g, f"parallelize({name})", lambda bad=bad: ditpass.parallelize(bad, ditpass.Plan()) and False)
    api_case(g, "plan as a string", lambda: ditpass.parallelize(model, "ulysses=2") and False)
    api_case(g, "plan as a dict", lambda: ditpass.parallelize(model, {"ulysses": 2}) and False)
    api_case(g, "Plan() plus keywords", lambda: ditpass.parallelize(model, ditpass.Plan(), ulysses=2) and False)
    api_case(g, "unknown plan keyword", lambda: ditpass.parallelize(model, ulyses=2) and False)
    pm = ditpass.parallelize(model, ditpass.Plan())
    api_case(g, "an already parallelized model", lambda: ditpass.parallelize(pm, ditpass.Plan()) and False)

    g = "plan values"
    for text in ("ulysses=0", "cfg=3", "ulysses=2", "pipefusion=2,patches=1", "compile=fast", "attention=magic",
                 "check_inputs=never", "warmup_steps=-1", "ring=-2", "pipefusion=2,cuda_graphs=true",
                 "step_cache=lru", "fastattn_threshold=2"):
        def build(text=text):
            ditpass.parallelize(tiny_flux()[0], ditpass.Plan.parse(text))(**inputs)
            return True
        api_case(g, text, build)

    g = "same inputs, one process"
    with torch.no_grad():
        ref = model(**inputs)[0]
    for n_img, n_txt in ((15, 7), (16, 8), (1, 1), (64, 3)):
        m, x = tiny_flux(n_img=n_img, n_txt=n_txt)
        api_case(g, f"{n_img} image + {n_txt} text tokens", lambda m=m, x=x: close(
            ditpass.parallelize(m, ditpass.Plan())(**x)[0], m(**x)[0]))

    g = "weights changed after the first call"

    def changed(how):
        m, x = tiny_flux()
        pm = ditpass.parallelize(m, ditpass.Plan())
        with torch.no_grad():
            pm(**x)
            if how == "replace parameter":
                m.proj_out.weight = torch.nn.Parameter(torch.randn_like(m.proj_out.weight))
            elif how == "replace submodule":
                m.proj_out = torch.nn.Linear(m.proj_out.in_features, m.proj_out.out_features)
            elif how == "load_state_dict(assign=True)":
                sd = {k: torch.randn_like(v) * 0.1 for k, v in m.state_dict().items()}
                m.load_state_dict(sd, assign=True)
            elif how == "w.data = ...":
                m.proj_out.weight.data = torch.randn_like(m.proj_out.weight)
            elif how == "in place copy_":
                m.proj_out.weight.copy_(torch.randn_like(m.proj_out.weight))
            elif how == "fresh parallelize after a change":
                m.proj_out.weight = torch.nn.Parameter(torch.randn_like(m.proj_out.weight))
                pm = ditpass.parallelize(m, ditpass.Plan())
            return close(pm(**x)[0], m(**x)[0])

    for how in ("replace parameter", "replace submodule", "load_state_dict(assign=True)", "w.data = ...",
                "in place copy_", "fresh parallelize after a change"):
        api_case(g, how, lambda how=how: changed(how))

    g = "non-tensor arguments"

    class Mode(enum.Enum):
        A = 1
        B = 2

    class ByMode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x, mode: Mode = Mode.A, scale: float = 1.0):
            return self.lin(x) * (2.0 if mode is Mode.B else 1.0) * scale

    def by_mode():
        m = ByMode()
        pm = ditpass.parallelize(m, ditpass.Plan())
        x = torch.randn(2, 4)
        with torch.no_grad():
            return all(close(pm(x, mode), m(x, mode)) for mode in (Mode.A, Mode.B)) and \
                close(pm(x, scale=3), m(x, scale=3)) and close(pm(x, scale=True), m(x, scale=True))

    api_case(g, "an Enum argument A then B, a scale 3 then True", by_mode)
    del ref


def _ranks(rank, world, model, inputs, ref, plan, how):
    x = dict(inputs)
    if how == "different values":
        x["hidden_states"] = x["hidden_states"] + rank
    elif how == "different text lengths":
        n = 7 + rank
        x["encoder_hidden_states"] = torch.ones(1, n, 32)
        x["txt_ids"] = torch.zeros(n, 3)
    elif how == "batch 2":
        x = {k: (torch.cat([v, v * 0.5]) if isinstance(v, torch.Tensor) and k in (
            "hidden_states", "encoder_hidden_states", "pooled_projections") else v) for k, v in x.items()}
        x["timestep"] = torch.tensor([0.5, 0.5])
        x["guidance"] = torch.tensor([3.5, 3.5])
    try:
        with torch.no_grad():
            out = ditpass.parallelize(model, ditpass.Plan.parse(plan))(**x)[0]
            want = model(**x)[0] if how != "different values" else None
    except OURS as e:
        return ("clear error", f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001
        return ("unclear", f"{type(e).__name__}: {e}")
    if want is None:
        return ("silent wrong", "no error for different inputs")
    return ("correct" if close(out, want) else "silent wrong", "")


def rank_cases():
    g = "ranks, 2 gloo processes"
    for plan in ("ulysses=2", "ring=2", "cfg=2", "dp=2"):
        for how in ("same inputs", "different values", "different text lengths"):
            if plan in ("cfg=2", "dp=2") and how != "different values":
                how = "batch 2" if how == "same inputs" else how
            model, inputs = tiny_flux()
            try:
                _, res = run_forked(_ranks, 2, model, inputs, plan, how, timeout=120)
                outcome = "clear error" if any(r[0] == "clear error" for r in res) else res[0][0]
                detail = next((r[1] for r in res if r[1]), "")
            except TimeoutError as e:
                outcome, detail = "hang", str(e)
            except Exception as e:  # noqa: BLE001
                outcome, detail = "unclear", f"{type(e).__name__}: {e}"
            record(g, f"{plan}, {how}", outcome, detail)


def cli_cases():
    tmp = tempfile.mkdtemp(prefix="probe-")
    out = os.path.join(tmp, "out")
    g = "ditpass generate flags"
    for flags in (["--num_inference_steps", "0"], ["--num_inference_steps", "-1"], ["--guidance_scale", "nan"],
                  ["--guidance_scale", "inf"], ["--num_pipeline_patch", "0", "--pipefusion_parallel_degree", "2"],
                  ["--ulysses_degree", "0"], ["--model", "NoSuchModel"], ["--device", "tpu"], ["--device", "cuda"],
                  ["--ulysses_degree", "2"], ["--plan", "garbage"], ["--plan", "cfg=3"], ["--prompt", "11"],
                  ["--seed", "-1"], ["--height", "-8"], ["--timeout", "0"], ["--pipeline_kwargs", "x"]):
        cli_case(g, " ".join(flags), ["generate", "--output_dir", out, "--num_inference_steps", "2", *flags])
    blocker = os.path.join(tmp, "a-file")
    open(blocker, "w").close()
    cli_case(g, "--output_dir inside a file", ["generate", "--output_dir", os.path.join(blocker, "x")])
    g = "file names from prompts"
    for prompt in ("../../x", "/etc/passwd", "a/b", "3"):
        cli_case(g, f"prompt {prompt!r}", ["generate", "--output_dir", out, "--num_inference_steps", "2",
                                           "--prompt", prompt],
                 want_inside=(out, [os.path.join(out, "../../x.png"), os.path.join(tmp, "x.png"), "/etc/passwd.png"]))
    g = "ditpass inspect / run"
    for argv in (["inspect", "--model", "Flux"], ["inspect", "--model", "FluxTransformer2DModel", "--height", "-64"],
                 ["inspect", "--model", "FluxTransformer2DModel", "--svg", os.path.join(tmp, "no", "g.svg")],
                 ["inspect", "--model", "FluxTransformer2DModel", "--plan", "pipefusion=2,cuda_graphs=true"],
                 ["inspect", "--model", "nope:Nothing"], ["inspect", "--model", "FluxTransformer2DModel", "--device", "gpu"],
                 ["run", "--model", "Flux"], ["run", "--plan", "ring=2"], ["run", "--device", "tpu"]):
        cli_case(g, " ".join(argv), argv)
    g = "ranks, torchrun"
    cli_case(g, "generate --ulysses_degree 4 on 2 processes", ["generate", "--output_dir", out, "--ulysses_degree", "4"],
             nproc=2)
    cli_case(g, "generate --use_cfg_parallel (no generator needed)", ["generate", "--output_dir", out,
                                                                      "--num_inference_steps", "4", "--use_cfg_parallel"],
             nproc=2)


STOPPED = """
import os, signal, sys, time, torch
sys.path[:0] = [{root!r}, {tests!r}]
import ditpass
from tiny_models import tiny_flux
model, inputs = tiny_flux()
pm = ditpass.parallelize(model, ditpass.Plan(ulysses=2))
if pm.rank == 1:
    os.kill(os.getpid(), signal.SIGSTOP)
with torch.no_grad():
    pm(**inputs)
"""


def hang_cases():
    """A frozen peer: the other rank must stop within the timeout (5 s here) with a message."""
    import socket
    import signal

    g = "a stopped peer"
    tmp = tempfile.mkdtemp(prefix="probe-")
    script = os.path.join(tmp, "rank.py")
    with open(script, "w") as f:
        f.write(STOPPED.format(root=ROOT, tests=os.path.join(ROOT, "tests")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(ENV, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port), DITPASS_TIMEOUT="5")) for r in range(2)]
    t0 = time.monotonic()
    try:
        _, err = procs[0].communicate(timeout=90)
        took = time.monotonic() - t0
        ok = procs[0].returncode != 0 and "DistributedTimeout" in err
        said = [x for x in err.splitlines() if "DistributedTimeout" in x]
        record(g, f"SIGSTOP rank 1, DITPASS_TIMEOUT=5 (rank 0 ended after {took:.0f} s)",
               "clear error" if ok else "unclear", said[-1] if said else err[-300:])
    except subprocess.TimeoutExpired:
        record(g, "SIGSTOP rank 1, DITPASS_TIMEOUT=5", "hang")
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.communicate()


def main():
    t0 = time.perf_counter()
    api_cases()
    rank_cases()
    cli_cases()
    hang_cases()
    totals: dict[str, int] = {}
    for r in ROWS:
        totals[r["outcome"]] = totals.get(r["outcome"], 0) + 1
    order = ["correct", "clear error", "silent wrong", "hang", "unclear", "outside"]
    lines = [f"# Reliability probe ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, CPU)", "",
             f"`python benchmarks/probe_reliability.py`: {len(ROWS)} cases in {time.perf_counter() - t0:.0f} s. "
             "Totals: " + ", ".join(f"{k} {totals.get(k, 0)}" for k in order) + ".", "",
             "| group | case | outcome | what the user sees |", "| --- | --- | --- | --- |"]
    for r in ROWS:
        lines.append(f"| {r['group']} | `{r['case']}` | {r['outcome']} | {r['detail'].replace('|', '/')} |")
    path = os.path.join(ROOT, "benchmarks", "results", "reliability_probe.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(path.replace(".md", ".json"), "w") as f:
        json.dump(dict(totals=totals, rows=ROWS), f, indent=1)
    print("\n".join(lines[:3]))
    return 0 if not any(totals.get(k) for k in ("silent wrong", "hang", "unclear", "outside")) else 1


if __name__ == "__main__":
    sys.exit(main())
