"""Plan.attention picks the attention kernel (an SDPA kernel, or FlashAttention-3), for plain and ring attention."""
from __future__ import annotations

import re
import sys
import types

import pytest
import torch

import ditpass
from ditpass.runtime.seq import sdpa_backend
from ditpass.plan import PlanError
from ditpass.runtime import fa3, seq

from dist_utils import run_forked
from tiny_models import tiny_flux

def _ring(rank, world, model, inputs, ref, attention):
    calls = []
    math_lse = seq._math_lse
    seq._math_lse = lambda *a, **k: calls.append(1) or math_lse(*a, **k)  # the attention op's body calls it by module global
    try:
        with torch.no_grad():
            out = ditpass.parallelize(model, ditpass.Plan(ring=2, attention=attention))(**inputs)[0]
    finally:
        seq._math_lse = math_lse
    return float((out - ref).abs().max()), len(calls)


def test_ring_attention_follows_the_plan():
    model, inputs = tiny_flux()
    for attention, math_used in (("math", True), ("auto", False)):
        _, results = run_forked(_ring, 2, model, inputs, attention, timeout=600)
        for diff, calls in results:
            assert diff <= 1e-4
            assert (calls > 0) == math_used, (attention, calls)


def test_context_sets_torch_flags():
    flags = torch.backends.cuda
    with sdpa_backend("math"):
        assert flags.math_sdp_enabled() and not flags.flash_sdp_enabled() and not flags.cudnn_sdp_enabled()
    with sdpa_backend("flash"):
        assert flags.flash_sdp_enabled() and not flags.math_sdp_enabled()
    with sdpa_backend("auto"):
        assert flags.flash_sdp_enabled() and flags.math_sdp_enabled()


def test_fields_without_a_pass_are_clear_errors():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(PlanError, match="overrides are validated, but no pass applies them"):
        ditpass.parallelize(model, ditpass.Plan(overrides=(("*", {"attention": "math"}),)))


# ---- FlashAttention-3 (Plan(attention="fa3"), ditpass/runtime/fa3.py) -----------------------------------
# The real kernel needs a Hopper GPU (benchmarks/check_fa3.py checks it there); here a stand-in module keeps
# FA3's contract: [B, S, H, D] in with the last dim contiguous, (out [B, S, H, D], lse float32 [B, H, S] in
# natural log) out, computed with float32 torch math.

def _fake_flash_attn_func(q, k, v, softmax_scale=None, causal=False, return_attn_probs=False, **_):
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1, "FA3 needs the last dim contiguous"
    assert not causal
    _fake_flash_attn_func.calls += 1
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    s = torch.einsum("bshd,bthd->bhst", q.float(), k.float()) * scale
    lse = s.logsumexp(-1)
    out = torch.einsum("bhst,bthd->bshd", torch.exp(s - lse.unsqueeze(-1)), v.float()).to(q.dtype)
    return (out, lse) if return_attn_probs else out


@pytest.fixture
def fake_fa3(monkeypatch):
    """A stand-in ``fa3_fwd_interface`` that also runs float32 (the CPU model's dtype); the device check is
    the real one (CPU: not Hopper) unless a test patches ``fa3.device_ok``."""
    module = types.ModuleType("fa3_fwd_interface")
    module.flash_attn_func = _fake_flash_attn_func
    _fake_flash_attn_func.calls = 0
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", module)
    monkeypatch.setattr(fa3, "dtypes", lambda: frozenset({torch.bfloat16, torch.float32}))
    fa3._interface.cache_clear()
    fa3.device_ok.cache_clear()
    yield _fake_flash_attn_func
    fa3._interface.cache_clear()


def _calls_of(fn, counter, *args):
    """``fn(*args)`` and how many times ``counter`` (a function with a ``calls`` attribute) ran meanwhile."""
    before = counter.calls
    out = fn(*args)
    return out, counter.calls - before


def _run(model, inputs, plan):
    with torch.no_grad():
        return ditpass.parallelize(model, plan)(**inputs)[0]


def test_fa3_op_fake_matches_the_kernel(fake_fa3):
    """What inductor and CUDA graphs plan with (the fake) is what the kernel returns: shapes, strides, dtypes."""
    q, k, v = (torch.randn(2, 9, 3, 16), torch.randn(2, 5, 3, 16), torch.randn(2, 5, 3, 16))
    torch.library.opcheck(torch.ops.ditpass.fa3_attention.default, (q, k, v, None))
    out, lse = torch.ops.ditpass.fa3_attention(q, k, v, 0.3)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fo, fl = torch.ops.ditpass.fa3_attention(mode.from_tensor(q), mode.from_tensor(k), mode.from_tensor(v), 0.3)
    assert (fo.shape, fo.stride(), fo.dtype) == (out.shape, out.stride(), out.dtype)
    assert (fl.shape, fl.stride(), fl.dtype) == (lse.shape, lse.stride(), torch.float32)
    assert out.shape == (2, 9, 3, 16) and lse.shape == (2, 3, 9)


def test_fa3_layout_is_views_and_matches_sdpa(fake_fa3):
    """ditpass's [B, H, S, D] (in [B, S, H, D] memory) goes in and comes out without a copy."""
    q, k, v = (torch.randn(1, 7, 2, 16).transpose(1, 2) for _ in range(3))
    out, lse = fa3.attention(q, k, v, 0.2)
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    ref, ref_lse = seq._math_lse(q, k, v, 0.2)
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)


def test_fa3_compiles_as_one_opaque_op(fake_fa3):
    def f(q, k, v):  # pointwise ops around it, as in a block: inductor fuses them, the op stays one call
        out, lse = fa3.attention(q * 2, k, v + 1, 0.25)
        return out.flatten(2) * 3, lse.exp()

    q, k, v = (torch.randn(1, 2, 12, 16) for _ in range(3))
    eager, n_eager = _calls_of(f, fake_fa3, q, k, v)
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        (out, lse), n = _calls_of(torch.compile(f, backend=backend, fullgraph=True), fake_fa3, q, k, v)
        assert n == n_eager == 1, backend
        assert torch.allclose(out, eager[0], atol=1e-5) and torch.allclose(lse, eager[1], rtol=1e-5), backend


def test_fa3_plan_routes_plain_attention_through_it(fake_fa3, monkeypatch):
    monkeypatch.setattr(fa3, "device_ok", lambda device: True)
    model, inputs = tiny_flux()
    with torch.no_grad():
        ref = model(**inputs)[0]
    out, calls = _calls_of(_run, fake_fa3, model, inputs, ditpass.Plan(attention="fa3"))
    assert calls == 2  # tiny FLUX: one joint block, one single block
    assert float((out - ref).abs().max()) <= 1e-4


def _sp_fa3(rank, world, model, inputs, ref, plan):
    math_calls = []
    math_lse = seq._math_lse
    seq._math_lse = lambda *a, **k: math_calls.append(1) or math_lse(*a, **k)
    try:
        out, calls = _calls_of(_run, _fake_flash_attn_func, model, inputs, plan)
    finally:
        seq._math_lse = math_lse
    return float((out - ref).abs().max()), calls, len(math_calls)


def test_fa3_plan_routes_ring_and_ulysses_attention_through_it(fake_fa3, monkeypatch):
    """Ring attention merges FA3's partial results by their lse (two ring steps per site); Ulysses runs it
    on the gathered sequence. Both exact against one process."""
    monkeypatch.setattr(fa3, "device_ok", lambda device: True)  # the forked ranks inherit the stand-ins
    model, inputs = tiny_flux()
    for plan, per_site in ((ditpass.Plan(ring=2, attention="fa3"), 2), (ditpass.Plan(ulysses=2, attention="fa3"), 1)):
        _, results = run_forked(_sp_fa3, 2, model, inputs, plan, timeout=600)
        for diff, calls, math_calls in results:
            assert diff <= 1e-4, plan
            assert calls == 2 * per_site and math_calls == 0, (plan, calls, math_calls)


def test_fa3_falls_back_to_sdpa_where_it_does_not_compute_the_call(fake_fa3, monkeypatch):
    """attention='fa3' runs FA3 wherever it is exact, torch's SDPA choice elsewhere (masks, causal, other
    dtypes, a value head dim unlike the query's)."""
    monkeypatch.setattr(fa3, "device_ok", lambda device: True)
    q, k, v = (torch.randn(1, 2, 6, 16) for _ in range(3))
    mask = torch.rand(1, 1, 6, 6) > 0.3
    with sdpa_backend("fa3"):
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.cudnn_sdp_enabled()
        assert _calls_of(seq.attend, fake_fa3, q, k, v)[1] == 1
        for args in ((q, k, v, mask), (q, k, v, None, 0.0, True), (q.half(), k.half(), v.half()), (q, k, v[..., :8])):
            out, n = _calls_of(seq.attend, fake_fa3, *args)
            assert n == 0 and torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(*args))
        (out, lse), n = _calls_of(seq.sdpa_lse, fake_fa3, q, k, v, None, mask)
        assert n == 0 and lse.shape == (1, 2, 6)


def test_fa3_errors_name_the_fix(fake_fa3, monkeypatch):
    model, inputs = tiny_flux()
    # installed, but CPU is not a Hopper GPU
    with pytest.raises(PlanError, match=r"attention='fa3'.*Hopper.*device cpu.*attention='auto'"):
        _run(model, inputs, ditpass.Plan(attention="fa3"))
    # not installed
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", None)  # import raises ImportError
    fa3._interface.cache_clear()
    with pytest.raises(PlanError, match=re.escape("pip install 'ditpass[fa3]'")):
        with sdpa_backend("fa3"):
            pass
    with pytest.raises(PlanError, match=r"fa3_fwd_interface, which does not import here \(ModuleNotFoundError"):
        _run(model, inputs, ditpass.Plan(attention="fa3"))
    assert not fa3.available()


def test_auto_picks_fa3_only_on_hopper(fake_fa3, monkeypatch):
    model, inputs = tiny_flux()
    _, calls = _calls_of(_run, fake_fa3, model, inputs, ditpass.Plan())  # installed, CPU: not picked
    assert calls == 0
    q, k, v = (torch.randn(1, 2, 6, 16) for _ in range(3))
    with sdpa_backend("auto"):
        assert not fa3.device_ok(q.device)
        assert _calls_of(seq.attend, fake_fa3, q, k, v)[1] == 0
        monkeypatch.setattr(fa3, "device_ok", lambda device: True)  # as on an H200
        assert _calls_of(seq.attend, fake_fa3, q, k, v)[1] == 0  # short sequences: untried, cuDNN
        monkeypatch.setattr(seq, "FA3_AUTO_MIN", 36)
        assert _calls_of(seq.attend, fake_fa3, q, k, v)[1] == 1
        assert _calls_of(seq.attend, fake_fa3, q, k, v, torch.ones(1, 1, 6, 6, dtype=torch.bool))[1] == 0
    with sdpa_backend("math"):  # a chosen SDPA kernel is that kernel
        assert _calls_of(seq.attend, fake_fa3, q, k, v)[1] == 0


def test_fa3_dtypes_of_the_published_wheel():
    """fa3-fwd 0.0.3 is built with FLASHATTENTION_DISABLE_FP16: bf16 only, unless its config says otherwise."""
    fa3.dtypes.cache_clear()
    try:
        assert torch.bfloat16 in fa3.dtypes()
        if not fa3.available():
            assert fa3.dtypes() == {torch.bfloat16}
    finally:
        fa3.dtypes.cache_clear()
