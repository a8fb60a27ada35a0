"""The pipeline hook and components by role, on the built-in digits pipeline (one process)."""
from __future__ import annotations

import inspect

import torch

import ditpass
from ditpass.components import roles
from ditpass.models import digits


def test_generation_hook_resets_state_and_counts_steps():
    pipe = digits.load_pipeline(device="cpu", dtype=torch.float32)
    cls = type(pipe)
    found = roles(pipe)
    assert set(found["transformer"]) == {"transformer"} and set(found["vae"]) == {"vae"}
    pipe = ditpass.parallelize(pipe, ditpass.Plan())
    assert isinstance(pipe.transformer, ditpass.ParallelModule)
    # same class name and call signature (the hook is a same-named subclass)
    assert type(pipe).__name__ == cls.__name__ and isinstance(pipe, cls)
    assert "num_inference_steps" in inspect.signature(pipe.__call__).parameters
    state = pipe.transformer.ditpass_state
    buf = state.buffer("probe", torch.ones(2))
    labels = pipe.get_label_ids(["3"])
    with torch.no_grad():
        pipe(class_labels=labels, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
        assert (state.generation, state.step, state.calls) == (1, 3, 3)
        assert torch.equal(buf, torch.zeros(2))  # reset at the start of the generation, storage kept
        pipe(class_labels=labels, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert (state.generation, state.step, state.calls) == (2, 2, 2)
    assert state.buffer("probe", torch.ones(2)) is buf
    assert "step" not in vars(pipe.scheduler)  # the step counter is removed after each generation
    # parallelizing again wraps the original transformer (no nesting), one hook
    pipe = ditpass.parallelize(pipe, ditpass.Plan())
    assert not isinstance(pipe.transformer.module, ditpass.ParallelModule)
    assert type(pipe).__mro__[1] is cls
