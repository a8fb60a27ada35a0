"""Captures of the tiny zoo models, made once per test session and shared by test_capture.py and
test_analysis.py (a capture of a tiny model takes seconds; both files need all twelve)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ditpass import capture
from ditpass.models import build, dynamic_dims, make_inputs


@dataclass
class Entry:
    name: str
    model: torch.nn.Module
    inputs: dict
    captured: Any
    seconds: float
    dynamic: str  # "auto" or "zoo" (the zoo's dynamic_dims)


_MODELS: dict[str, tuple[torch.nn.Module, dict]] = {}
_CAPTURES: dict[tuple[str, str], Entry] = {}


def model_and_inputs(name: str) -> tuple[torch.nn.Module, dict]:
    if name not in _MODELS:
        _MODELS[name] = (build(name), make_inputs(name))
    return _MODELS[name]


def zoo_capture(name: str, dynamic: str = "auto") -> Entry:
    """``ditpass.capture`` of the tiny model ``name`` with ``dynamic_shapes="auto"`` (``dynamic="auto"``)
    or with the zoo's ``dynamic_dims`` (``dynamic="zoo"``); cached for the session."""
    key = (name, dynamic)
    if key not in _CAPTURES:
        model, inputs = model_and_inputs(name)
        spec = "auto" if dynamic == "auto" else dynamic_dims(name)
        old = torch.get_num_threads()
        torch.set_num_threads(min(old, 2))
        try:
            t = time.perf_counter()
            with torch.no_grad():
                cap = capture(model, dynamic_shapes=spec, **inputs)
            _CAPTURES[key] = Entry(name, model, inputs, cap, time.perf_counter() - t, dynamic)
        finally:
            torch.set_num_threads(old)
    return _CAPTURES[key]


def flat_tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in flat_tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in flat_tensors(v)]
    if hasattr(x, "to_tuple"):
        return flat_tensors(x.to_tuple())
    return []


def max_abs_diff(a, b) -> float:
    ta, tb = flat_tensors(a), flat_tensors(b)
    assert len(ta) == len(tb) and ta, (len(ta), len(tb))
    out = 0.0
    for x, y in zip(ta, tb):
        assert x.shape == y.shape, (x.shape, y.shape)
        out = max(out, (x.float() - y.float()).abs().max().item() if x.numel() else 0.0)
    return out
