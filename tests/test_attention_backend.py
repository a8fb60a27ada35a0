"""Plan.attention picks the SDPA kernel, for F.scaled_dot_product_attention and for ring attention."""
from __future__ import annotations

import pytest
import torch

import ditpass
from ditpass.runtime.seq import sdpa_backend
from ditpass.plan import PlanError
from ditpass.runtime import seq

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
