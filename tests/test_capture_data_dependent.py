"""Capture whole what export alone cannot, then shard it exactly (issue 19), on small hand-written models:

1. sizes pinned by Python arithmetic on them: an ``lru_cache`` keyed on the token count and
   ``np.sqrt`` of a ratio of ``numel()``s; export-dynamic keeps the token count symbolic;
2. data-dependent Python: ``.tolist()`` of a mask's sum, ``len(set(...))`` of those lengths, ``if`` on a
   tensor's value and a boolean-mask select; export-values specialises on the example's values and a
   later input that reads other values fails, naming the value, the line and the module;
3. a mixture of experts that counts tokens per expert on the host (``.cpu().numpy()``): one opaque
   token-wise op, verified on the example, that sequence parallelism shards through; a module whose
   tokens interact is not made opaque, and the capture says why.

Each is checked on 2 gloo ranks under ``ulysses=2`` and ``ring=2`` against the single-process output,
with the attention sharded (each rank computes its half of the tokens).
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import ditpass
from ditpass.analysis import analyze
from ditpass.opaque import TOKENWISE

from dist_utils import first_output, run_forked

TOL = 1e-5
PLANS = [dict(ulysses=2), dict(ring=2)]
DIM, HEADS = 32, 4


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)

    def forward(self, x_BSD):
        B, S, _ = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        o = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(B, S, DIM))


# ---- 1. sizes pinned by Python arithmetic ----------------------------------------------------------


class _SizeArithmetic(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in, self.attn, self.proj_out = nn.Linear(8, DIM), _Attention(), nn.Linear(DIM, 8)

    @functools.lru_cache(maxsize=8)  # keyed on the token count: a symbolic size must hash
    def _positions(self, n):
        return torch.arange(n, dtype=torch.float32)[:, None] * torch.linspace(0, 0.1, DIM)

    def forward(self, x):
        n = int(x.shape[1])  # a size read into Python (Kandinsky6SR's RoPE): must stay symbolic
        assert isinstance(n, int) or not isinstance(n, float)  # isinstance against `int` holds as before
        h = self.proj_in(x) + self._positions(n)
        scale = np.sqrt(h.numel() / x.numel())  # numpy on sizes: 2.0, traced symbolically
        return self.proj_out(self.attn(h) / scale)


# ---- 2. data-dependent Python --------------------------------------------------------------------


class _DataDependentText(nn.Module):
    """Joint attention over the valid text tokens (a boolean select) and the image tokens."""

    def __init__(self):
        super().__init__()
        self.txt_in, self.img_in = nn.Linear(8, DIM), nn.Linear(8, DIM)
        self.attn, self.proj_out = _Attention(), nn.Linear(DIM, 8)

    def forward(self, img, txt, txt_mask):
        lengths = txt_mask.sum(1).tolist()
        padded = len(set(lengths)) > 1 or lengths[0] < txt.shape[1]
        if txt_mask.any():
            txt = txt[:, txt_mask[0]] if padded else txt
        h = torch.cat([self.txt_in(txt), self.img_in(img)], 1)
        h = self.attn(h)
        return self.proj_out(h[:, txt.shape[1]:])


# ---- 3. a mixture of experts ---------------------------------------------------------------------


class _MoE(nn.Module):
    """Top-1 routing; per-expert token counts on the host, as DeepSeek-style inference code does."""

    def __init__(self, experts=3):
        super().__init__()
        self.gate = nn.Linear(DIM, experts)
        self.experts = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(experts))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        idx = self.gate(flat).argmax(-1)
        counts = idx.bincount(minlength=len(self.experts)).cpu().numpy()
        order, out, start = idx.argsort(), torch.zeros_like(flat), 0
        for e, c in enumerate(counts):
            rows = order[start:start + c]
            out[rows] = self.experts[e](flat[rows])
            start += c
        return out.reshape(x.shape)


class _SequenceMix(_MoE):
    """The same host-side routing, plus each token minus the mean over the tokens: not token-wise."""

    def forward(self, x):
        return super().forward(x) - x.mean(1, keepdim=True)


class _MoEDiT(nn.Module):
    def __init__(self, ffn=_MoE):
        super().__init__()
        self.proj_in, self.attn, self.norm = nn.Linear(8, DIM), _Attention(), nn.LayerNorm(DIM)
        self.moe, self.proj_out = ffn(), nn.Linear(DIM, 8)

    def forward(self, x):
        h = self.proj_in(x)
        h = h + self.attn(h)
        h = h + self.moe(self.norm(h))
        return self.proj_out(h)


def _model(cls, *a):
    torch.manual_seed(0)
    return cls(*a).eval()


def _inputs(n_img=15, n_txt=7, valid=5):
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(1, n_txt, dtype=torch.bool)
    mask[:, :valid] = True
    return dict(img=torch.randn(1, n_img, 8, generator=g), txt=torch.randn(1, n_txt, 8, generator=g), txt_mask=mask)


# ---- the 2-rank check ----------------------------------------------------------------------------


def _run_plans(rank, world, model, inputs, ref, plans, other_inputs):
    warnings.filterwarnings("ignore")
    seen = []  # the token counts the opaque module runs on in this rank
    if isinstance(getattr(model, "moe", None), _MoE):
        forward = type(model.moe).forward
        type(model.moe).forward = lambda self, x: (seen.append(x.shape[1]), forward(self, x))[1]
    out = []
    with torch.no_grad():
        for fields in plans:
            seen.clear()
            pm = ditpass.parallelize(model, ditpass.Plan(**fields))
            y = first_output(pm(**inputs))
            rec = pm.ditpass_records[0]
            sp = next(r for r in rec.results if r.name == "sequence_parallel")
            r = dict(diff=float((y - ref).abs().max()), shape=tuple(y.shape), notes=list(sp.notes),
                     sharded=[s.node for s in rec.sites if s.seq is not None], sites=len(list(rec.sites)),
                     moe_tokens=list(seen), guard=None)
            if other_inputs is not None:  # the guard holds in the rewritten graph too (parallelize would capture again)
                try:
                    rec.runner(**other_inputs)
                except RuntimeError as e:
                    r["guard"] = str(e)
            out.append(r)
    return out


def _check_sharded(model, inputs, other_inputs=None):
    ref, results = run_forked(_run_plans, 2, model, inputs, PLANS, other_inputs, timeout=300)
    for rank, per_plan in enumerate(results):
        for fields, r in zip(PLANS, per_plan):
            assert r["shape"] == tuple(ref.shape), (rank, fields, r)
            assert r["diff"] <= TOL, (rank, fields, r)
            assert r["sites"] >= 1 and len(r["sharded"]) == r["sites"], (rank, fields, r)  # every site sharded
    return results


def _token_inputs(captured) -> dict:
    return analyze(captured.graph_module).inputs


# ---- tests ---------------------------------------------------------------------------------------


def test_size_arithmetic_keeps_token_dims_symbolic_and_shards():
    model, x = _model(_SizeArithmetic), torch.randn(1, 15, 8)
    cap = ditpass.capture(model, x)
    assert cap.method == "export-dynamic" and cap.whole and not cap.specialized, (cap, cap.errors)
    assert list(_token_inputs(cap).values()) == [{1: ("visual",)}]  # the token dim of x, found symbolically
    x2 = torch.randn(1, 11, 8)  # another token count: the same graph, no new capture needed
    torch.testing.assert_close(cap(x2)[0] if isinstance(cap(x2), tuple) else cap(x2), model(x2))
    assert model._positions(15).shape == (15, DIM)  # the eager model's cache still works after the capture
    assert "int" not in globals()  # the capture's stand-in for int() is gone from this module afterwards
    _check_sharded(model, dict(x=x))


def test_data_dependent_python_is_specialised_guarded_and_shards():
    model, inputs = _model(_DataDependentText), _inputs()
    cap = ditpass.capture(model, **inputs)
    assert cap.method == "export-values" and cap.whole, (cap, cap.errors)
    assert "export-dynamic" in cap.errors  # what export alone could not do is said
    where = " | ".join(str(s) for s in cap.specialized)
    assert "`lengths = txt_mask.sum(1).tolist()` in module `<root>` read 5" in where, where
    assert "`if txt_mask.any():`" in where and "txt[:, txt_mask[0]]" in where, where
    tokens = _token_inputs(cap)
    assert tokens["img"] == {1: ("visual",)} and "txt" not in tokens  # image symbolic, the 5 text tokens fixed
    with torch.no_grad():
        torch.testing.assert_close(first_output(cap(**inputs)), first_output(model(**inputs)))
        other = _inputs(n_img=11)  # other image size, same text values: the graph applies
        torch.testing.assert_close(first_output(cap(**other)), first_output(model(**other)))
        six = _inputs(valid=6)  # the text reads 6 valid tokens: the graph does not apply, and says so
        with pytest.raises(RuntimeError) as err:
            cap(**six)
    msg = str(err.value)
    assert "_DataDependentText was captured specialised on a value read from its example inputs" in msg, msg
    assert "read 5" in msg and "test_capture_data_dependent.py" in msg and "module `<root>`" in msg, msg
    assert "ditpass.capture.forget(model)" in msg, msg
    ditpass.capture.forget(model)  # what the message says: capture again for the new values
    again = ditpass.capture(model, **six)
    assert again is not cap and "read 6" in " | ".join(str(s) for s in again.specialized)
    with torch.no_grad():
        torch.testing.assert_close(first_output(again(**six)), first_output(model(**six)))
    ditpass.capture.forget(model)

    results = _check_sharded(model, inputs, other_inputs=_inputs(valid=6))
    for per_plan in results:
        for r in per_plan:
            assert r["guard"] and "read 5" in r["guard"], r  # the rewritten graph keeps the guard


def test_moe_runs_as_one_opaque_tokenwise_op_and_shards_through_it():
    model, x = _model(_MoEDiT), torch.randn(1, 15, 8)
    cap = ditpass.capture(model, x)
    assert cap.method == "export-values" and cap.opaque == ["moe"], (cap, cap.errors)
    assert ".numpy()" in cap.errors["export-dynamic"] and "`moe`" in cap.errors["export-dynamic"]
    ops = [n for n in cap.graph.nodes if n.target is TOKENWISE]
    assert len(ops) == 1 and ops[0].args[3] == [1], ops  # verified along the tokens (batch 1: nothing else)
    assert list(_token_inputs(cap).values()) == [{1: ("visual",)}]
    with torch.no_grad():
        x2 = torch.randn(1, 9, 8)  # other tokens, other routing: the op runs the module itself
        torch.testing.assert_close(cap(x2)[0] if isinstance(cap(x2), tuple) else cap(x2), model(x2))

    results = _check_sharded(model, dict(x=x))
    for per_plan in results:
        for r in per_plan:
            assert r["moe_tokens"] == [8], r  # each rank routes its own half (15 tokens, padded to 16)
            assert not any("opaque_tokenwise" in n for n in r["notes"]), r["notes"]  # no gather around it


def test_module_whose_tokens_interact_is_not_made_opaque():
    model, x = _model(_MoEDiT, _SequenceMix), torch.randn(1, 15, 8)
    cap = ditpass.capture(model, x)
    assert cap.method == "dynamo" and not cap.whole
    why = cap.errors["export-values"]
    assert "`moe` (_SequenceMix) was not made an opaque token-wise op" in why, why
    assert "changes its output (its tokens interact)" in why and ".numpy()" in why, why


def _recapture_worker(rank, world, model, first, _ref, second, refs):
    pm = ditpass.parallelize(model, ditpass.Plan(ulysses=2))
    with torch.no_grad():
        a = pm(**first)
        b = pm(**second)  # reads another value: the specialised graph's assertion fails, parallelize captures again
    return (float((a - refs[0]).abs().max()), float((b - refs[1]).abs().max()), len(pm.ditpass_records),
            [s.value for s in pm.ditpass_records[0].captured.specialized])


def test_parallelize_captures_again_when_inputs_read_other_values():
    model = _model(_DataDependentText)
    first, second = _inputs(valid=5), _inputs(valid=6)
    with torch.no_grad():
        refs = [model(**first), model(**second)]
    _, results = run_forked(_recapture_worker, 2, model, first, second, refs, timeout=300)
    for d1, d2, n_records, values in results:
        assert d1 <= TOL and d2 <= TOL
        assert n_records == 1 and 6 in values  # one record for these shapes, now specialised on the new value
