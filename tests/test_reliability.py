"""Reliability (issue 15): no silent wrong result, no silent hang.

- ranks that pass different inputs raise, naming the input and the ranks; a pipeline without a
  generator draws the same noise on every rank;
- replaced weights are used (eager and inductor), never the graph of the old ones;
- non-tensor arguments (an Enum) are part of the capture key;
- a stopped peer makes the other ranks fail within the timeout, naming the collective and the step;
- wrong arguments to parallelize fail at once, saying what to pass;
- dp splits only the inputs whose dim 0 is the batch dim (FLUX's txt_ids with T == batch stays whole);
- the capture's Tensor.data patch is per thread and re-entrant; its Dynamo fallback keeps the user's
  compiled functions;
- a default 2-process run prints nothing on stderr.
"""
from __future__ import annotations

import enum
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import ditpass
from ditpass.capture import _traceable_data, capture, signature_of
from ditpass.errors import InputMismatchError

from dist_utils import run_distributed, run_forked
from tiny_models import tiny_flux

TESTS = os.path.dirname(os.path.abspath(__file__))


# ---- 1. the same inputs on every rank --------------------------------------------------------


def _mismatch(rank, world, model, inputs, ref, case):
    inputs = dict(inputs)
    if case == "values":  # an unseeded randn: torch seeds every process differently
        inputs["hidden_states"] = inputs["hidden_states"] + rank
    elif case == "text_length":  # 7 and 8 text tokens: 4 per ulysses rank either way
        n = 7 + rank
        inputs["encoder_hidden_states"] = torch.ones(1, n, 32)
        inputs["txt_ids"] = torch.zeros(n, 3)
    pm = ditpass.parallelize(model, ditpass.Plan(ulysses=2, check_inputs="always" if case == "later" else "first"))
    with torch.no_grad():
        if case == "later":  # agreed at first; check_inputs="always" checks the second call too
            pm(**inputs)
            inputs["timestep"] = inputs["timestep"] * (rank + 1)
        try:
            pm(**inputs)
        except InputMismatchError as e:
            return str(e)
    return None


@pytest.mark.parametrize("case", ["values", "text_length", "later"])
def test_ranks_with_different_inputs_raise(case):
    model, inputs = tiny_flux()
    _, msgs = run_forked(_mismatch, 2, model, inputs, case)
    assert all(msgs), msgs
    names = {"values": ["`hidden_states`"], "text_length": ["`encoder_hidden_states`", "`txt_ids`"],
             "later": ["`timestep`"]}[case]
    for msg in msgs:
        for name in names:
            assert name in msg, msg
        assert "rank 1" in msg and "same full inputs" in msg and "check_inputs='off'" in msg, msg
    if case == "text_length":
        assert "[1, 7, 32] float32 on cpu on rank 0, [1, 8, 32] float32 on cpu on rank 1" in msgs[0]


def _digits_unseeded(rank, world):
    from ditpass.models import digits

    pipe = digits.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe = ditpass.parallelize(pipe, ditpass.Plan(cfg=2))
    torch.manual_seed(rank)  # what torch does anyway: each process has its own seed
    with torch.no_grad():
        images = pipe(class_labels=[3], num_inference_steps=2, output_type="np").images
    return torch.as_tensor(images)


def test_pipeline_without_generator_draws_the_same_noise_on_every_rank():
    """DiTPipeline has no prepare_latents: its noise comes from randn_tensor in __call__. Every rank
    draws rank 0's, which a single process seeded like rank 0 draws too."""
    from ditpass.models import digits

    pipe = digits.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    with torch.no_grad():
        ref = torch.as_tensor(pipe(class_labels=[3], num_inference_steps=2, output_type="np").images)
    a, b = run_distributed(_digits_unseeded, 2, timeout=300)
    assert torch.equal(a, b)
    assert float((a - ref).abs().max()) <= 1e-4


# ---- 2. replaced weights are used -------------------------------------------------------------


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return x + torch.nn.functional.gelu(self.proj(x))


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([_Block(), _Block()])
        self.proj = torch.nn.Linear(8, 8)
        self.register_buffer("shift", torch.zeros(8))

    def forward(self, x):
        for b in self.transformer_blocks:
            x = b(x)
        return self.proj(x) + self.shift


def _close(pm, model, x):
    with torch.no_grad():
        return float((pm(x) - model(x)).abs().max()) <= 1e-6


def test_replaced_weights_are_used():
    torch.manual_seed(0)
    model, x = _Toy().eval(), torch.randn(2, 5, 8)
    pm = ditpass.parallelize(model, ditpass.Plan())
    assert _close(pm, model, x)
    model.proj = torch.nn.Linear(8, 8)  # a replaced submodule
    assert _close(pm, model, x)
    model.transformer_blocks[0].proj.weight = torch.nn.Parameter(torch.randn(8, 8))  # a replaced parameter
    assert _close(pm, model, x)
    model.shift = torch.ones(8)  # a replaced buffer
    assert _close(pm, model, x)
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    assert _close(pm, model, x)
    model.proj = torch.nn.Linear(8, 8)  # a fresh parallelize must not be handed the cached capture
    assert _close(ditpass.parallelize(model, ditpass.Plan()), model, x)
    assert _close(pm, model, x)
    with torch.no_grad():  # in place: the graphs read it as it is, nothing is rebuilt
        records = pm.ditpass_records
        model.proj.weight.mul_(2)
        model.load_state_dict({k: v * 0.5 for k, v in model.state_dict().items()})
        assert _close(pm, model, x) and pm.ditpass_records[0] is records[0]


def test_inductor_sees_data_assignment_and_dtype_round_trip():
    torch.manual_seed(0)
    model, x = _Toy().eval(), torch.randn(2, 5, 8)
    pm = ditpass.parallelize(model, ditpass.Plan(compile="inductor"))
    assert _close(pm, model, x)
    runner = pm.ditpass_records[0].runner  # the blocks run compiled, over aliases of the weights
    assert sum(t["compiled"] for t in runner.templates.values()) == 1
    w = model.transformer_blocks[1].proj.weight
    w.data = torch.randn(8, 8)  # same Parameter object, new storage
    assert _close(pm, model, x)
    model.half()
    model.float()  # rounded to half and back: new storage for every weight
    assert _close(pm, model, x)


# ---- 3. non-tensor arguments key the capture ----------------------------------------------------


class _Mode(enum.Enum):
    ADD = 1
    MUL = 2


class _ByMode(torch.nn.Module):
    def forward(self, x, mode: _Mode = _Mode.ADD, scale=1):
        y = x + 1 if mode is _Mode.ADD else x * 2
        return y * scale


def test_enum_and_typed_values_are_part_of_the_key():
    m, x = _ByMode(), torch.randn(3, 4)
    pm = ditpass.parallelize(m, ditpass.Plan())
    with torch.no_grad():
        for mode in (_Mode.ADD, _Mode.MUL, _Mode.ADD):
            assert torch.equal(pm(x, mode), m(x, mode)), mode
        assert torch.equal(capture(m, x, _Mode.MUL)(x, _Mode.MUL), m(x, _Mode.MUL))
    assert signature_of((x, _Mode.ADD), {}) != signature_of((x, _Mode.MUL), {})
    assert signature_of((x, True), {}) != signature_of((x, 1), {}) != signature_of((x, 1.0), {})
    assert signature_of(([x],), {}) != signature_of(((x,),), {})


# ---- launcher for tests that read the processes' exit and stderr ------------------------------


def _launch(tmp_path, body: str, world: int = 2, env: dict | None = None):
    """Start ``body`` (a script) as ``world`` ranks, as torchrun would; returns the Popen objects."""
    import socket

    script = tmp_path / "rank.py"
    script.write_text("import torch\ntorch.set_num_threads(1)\n" + textwrap.dedent(body))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        e = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port), PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
                 **(env or {}))
        e.pop("DITPASS_VERBOSE", None)
        procs.append(subprocess.Popen([sys.executable, str(script)], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs, timeout: float, wait: int | None = None):
    """(returncode, stdout, stderr) of the first ``wait`` ranks (default all), waited for at most ``timeout``
    s; then every rank still running is SIGKILLed (a stopped one too)."""
    out = []
    deadline = time.monotonic() + timeout
    try:
        for p in procs[:wait]:
            try:
                so, se = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
                out.append((p.returncode, so, se))
            except subprocess.TimeoutExpired:
                out.append((None, "", ""))
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.communicate()
    return out


# ---- 4. a stopped peer fails the others within the timeout ------------------------------------

_STOPPED_PEER = """
import os, signal, time
import ditpass
from tiny_models import tiny_flux

model, inputs = tiny_flux()
pm = ditpass.parallelize(model, ditpass.Plan(ulysses=2, check_inputs="{check}"))
if pm.rank == 1:
    os.kill(os.getpid(), signal.SIGSTOP)  # frozen before the first collective of the call
print("calling", flush=True)
t0 = time.monotonic()
try:
    with torch.no_grad():
        pm(**inputs)
finally:
    print(f"failed after {{time.monotonic() - t0:.1f}} s", flush=True)
"""


@pytest.mark.parametrize("check", ["first", "off"])
def test_stopped_peer_times_out_naming_collective_and_step(tmp_path, check):
    """``check="off"``: the first collective is the graph's own (Ulysses' all-to-all)."""
    procs = _launch(tmp_path, _STOPPED_PEER.format(check=check), env={"DITPASS_TIMEOUT": "5"})
    [(rc, out, err)] = _finish(procs, timeout=120, wait=1)
    assert rc not in (None, 0), (rc, out, err)
    assert "calling" in out, err
    seconds = float(out.split("failed after ")[1].split(" s")[0])
    assert seconds < 20, out
    assert "DistributedTimeout: rank 0:" in err and "timed out after 5 s" in err, err
    assert "call 0 (step 0, generation 0) of FluxTransformer2DModel" in err, err
    what = "torch.distributed.all_gather_object" if check == "first" else "_c10d.wait_tensor(sent)"
    assert what in err.split("DistributedTimeout:")[1], err


def _group_timeouts(rank, world):
    from ditpass import mesh

    mesh.init_distributed(timeout=7)  # the group exists (120 s, dist_utils'): the mesh's new groups get 7 s
    dm = mesh.ParallelDims(ditpass.Plan(ulysses=2), world).build_mesh()
    return {axis: dm[axis].get_group()._get_backend(torch.device("cpu")).options._timeout.total_seconds()
            for axis in ("ring", "ulysses")}


def test_mesh_groups_time_out_like_the_plan_says():
    """c10d gives a new group 30 minutes unless told; ulysses spans the world, so it is the world group."""
    assert run_distributed(_group_timeouts, 2) == [{"ring": 7, "ulysses": 120}] * 2


def test_timeout_setting(monkeypatch):
    from ditpass import mesh

    monkeypatch.setattr(mesh, "_timeout_s", None)
    monkeypatch.delenv("DITPASS_TIMEOUT", raising=False)
    assert mesh.timeout_seconds() == mesh.DEFAULT_TIMEOUT_S == 300
    monkeypatch.setenv("DITPASS_TIMEOUT", "7.5")
    assert mesh.timeout_seconds() == 7.5 and mesh.timeout_seconds(3) == 3
    monkeypatch.setenv("DITPASS_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="DITPASS_TIMEOUT='soon'.*seconds"):
        mesh.timeout_seconds()


# ---- 5. wrong arguments fail at once ----------------------------------------------------------


def test_parallelize_says_what_to_pass():
    m = torch.nn.Linear(4, 4)
    for bad in (lambda x: x, "transformer", None):
        with pytest.raises(TypeError, match=r"torch.nn.Module, e.g. pipe.transformer\) or a diffusers pipeline"):
            ditpass.parallelize(bad, ditpass.Plan())
    with pytest.raises(TypeError, match=r"ditpass.Plan.parse\('ulysses=2'\)"):
        ditpass.parallelize(m, "ulysses=2")
    with pytest.raises(TypeError, match=r"Plan.from_dict\(d\), or the fields as keywords"):
        ditpass.parallelize(m, {"ulysses": 2})
    with pytest.raises(TypeError, match=r"a plan and plan fields \(ulysses\).*plan.replace\(ulysses=2\)"):
        ditpass.parallelize(m, ditpass.Plan(), ulysses=2)
    with pytest.raises(ditpass.PlanError, match="did you mean 'ulysses'"):
        ditpass.parallelize(m, ulyses=2)
    pm = ditpass.parallelize(m, ditpass.Plan())
    t0 = time.monotonic()
    with pytest.raises(TypeError, match=r"already parallelized .*model.module"):
        ditpass.parallelize(pm, ditpass.Plan())
    assert time.monotonic() - t0 < 1


# ---- 6. dp splits the per-sample inputs only ----------------------------------------------------


def _dp(rank, world, model, inputs, ref):
    pm = ditpass.parallelize(model, ditpass.Plan(dp=2))
    with torch.no_grad():
        out = pm(**inputs)[0]
    return float((out - ref).abs().max()), pm.batch_split.calls


def test_dp_keeps_text_ids_whole_when_text_length_equals_batch():
    model, inputs = tiny_flux(n_txt=2)
    g = torch.Generator().manual_seed(2)
    for k in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
        inputs[k] = torch.randn(2, *inputs[k].shape[1:], generator=g)
    inputs.update(timestep=torch.tensor([0.5, 0.7]), guidance=torch.tensor([3.5, 2.5]))
    _, results = run_forked(_dp, 2, model, inputs)
    for diff, calls in results:
        assert calls == 1 and diff <= 1e-5, results


# ---- 7. the capture's side effects are scoped ---------------------------------------------------


class _Waits(torch.nn.Module):
    def __init__(self, inside: threading.Event, release: threading.Event):
        super().__init__()
        self.inside, self.release = inside, release

    def forward(self, x):
        self.inside.set()
        self.release.wait(30)
        return x * 2


def _real_data(x: torch.Tensor) -> bool:
    """``x.data`` is torch's: a write through it does not bump ``x``'s version (``detach()``'s would)."""
    before = x._version
    x.data.add_(0)
    return x._version == before


def test_data_patch_is_per_thread_and_reentrant():
    inside, release = threading.Event(), threading.Event()
    worker = threading.Thread(target=capture, args=(_Waits(inside, release), torch.ones(2)),
                              kwargs=dict(strategies=("export-static",)))
    worker.start()
    try:
        assert inside.wait(60)
        assert _real_data(torch.ones(3))  # another thread, while a capture runs
    finally:
        release.set()
        worker.join(60)
    with _traceable_data():
        with _traceable_data():
            pass
        assert not _real_data(torch.ones(3))  # still traceable in the outer capture
    assert _real_data(torch.ones(3)) and "data" not in vars(torch.Tensor)


class _DataDependent(torch.nn.Module):
    def forward(self, x):
        return x * float(x.abs().mean().numpy())


def test_dynamo_fallback_keeps_users_compiled_functions():
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    @torch.compile(backend=counting)
    def users(x):
        return torch.sin(x) + 1

    x = torch.randn(4)
    users(x)
    assert len(compiles) == 1
    assert capture(_DataDependent(), x).method == "dynamo"
    users(x)
    assert len(compiles) == 1  # not compiled again: its cache survived the capture


# ---- 8. a default run prints nothing ------------------------------------------------------------

_QUIET_RUN = """
import ditpass
from tiny_models import tiny_flux

model, inputs = tiny_flux()
pm = ditpass.parallelize(model, ditpass.Plan(ulysses=2))
with torch.no_grad():
    pm(**inputs)
print("done", flush=True)
"""


def test_two_process_run_prints_nothing_on_stderr(tmp_path):
    results = _finish(_launch(tmp_path, _QUIET_RUN), timeout=240)
    for rank, (rc, out, err) in enumerate(results):
        assert rc == 0 and "done" in out, (rank, rc, err)
        assert err == "", f"rank {rank} printed on stderr:\n{err}"
