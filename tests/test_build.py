"""The one build path: a parallelized model and the dry run of explain / inspect build alike."""
from __future__ import annotations

import pytest
import torch

import ditpass
from ditpass.plan import PlanError
from ditpass.tools.explain import dry_run

from tiny_models import tiny_flux


def test_dry_run_and_parallelize_build_the_same():
    model, inputs = tiny_flux()  # 4 heads
    cap = ditpass.capture(model, **inputs)
    # the model-aware check is in the build: more Ulysses ranks than heads is refused in the dry run as
    # it is on the ranks (it used to be refused by inspect only)
    with pytest.raises(PlanError, match=r"only 4 heads.*ulysses=4, ring=2"):
        dry_run(cap, ditpass.Plan(ulysses=8))
    pm = ditpass.parallelize(model, ditpass.Plan())
    with torch.no_grad():
        out = pm(**inputs)[0]
    rec, dry = pm.ditpass_records[0], dry_run(cap, ditpass.Plan())
    assert [r.name for r in rec.results] == [r.name for r in dry.results]
    assert [r.modified for r in rec.results] == [r.modified for r in dry.results]
    assert [s.describe() for s in rec.sites] == [s.describe() for s in dry.sites] == ["joint: local"] * 2  # tiny FLUX: 1 double + 1 single block
    assert rec.graph_module.code.count("torch.ops.ditpass.attention.default(") == 2
    assert dry.runner is None and rec.runner is not None  # the dry run stops before the backend
    with torch.no_grad():
        torch.testing.assert_close(out, model(**inputs)[0])
