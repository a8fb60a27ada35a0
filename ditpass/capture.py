"""Capture: a module plus example inputs -> one FX GraphModule that shares the module's parameters.

Strategies, tried in order (the first that works wins, and `Captured.method` says which):

1. ``export-dynamic``: ``torch.export.export(strict=False)`` with symbolic sizes. The caller may
   pass ``dynamic_shapes`` (e.g. the zoo's named dims ``H, W, F, T``); otherwise every dim of every
   tensor input and every ``int`` input (LTX's ``num_frames``/``height``/``width``, Qwen-Image's
   ``img_shapes``) is ``Dim.AUTO`` and export keeps symbolic whatever the code does not specialise.
   The analysis needs these symbols to find token dims without trusting numbers.
2. ``export-static``: the same with concrete sizes (a model whose Python branches on sizes).
3. ``dynamo``: Dynamo's graphs with its graph breaks left to Python (a model with data-dependent
   Python such as ``.numpy()`` or ``set()`` of sizes). Callable and analysable, one graph per
   piece; passes that need one whole graph refuse it by name.

If all fail, `CaptureError` names the innermost module that was running and the failing op.

While exporting, two things that break tracing in otherwise ordinary model code are made
traceable for every model alike:

- ``tensor.data`` reads are ``tensor.detach()`` (the same storage, but seen by the tracer):
  CogVideoX's sin-cos position table, rebuilt when the input size differs from the config's,
  is written through ``new_zeros(...).data[...].copy_()``; untraced, export fails with "fake
  tensor in the exported program constant's list".
- Module attributes that the traced forward sets to fake tensors (a lazily built cache) are put
  back afterwards, so the eager module keeps working.

Captures are cached per (module, input signature, dynamic_shapes, strategies): a diffusion run
calls one shape many times.
"""
from __future__ import annotations

import contextlib
import logging
import re
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx

log = logging.getLogger("ditpass.capture")

__all__ = ["capture", "Captured", "CaptureError", "signature_of"]


class CaptureError(RuntimeError):
    """No strategy could capture the module; the message names the module path and the op."""


def _sig(x: Any):
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.dtype, x.device.type)
    if isinstance(x, (list, tuple)):
        return tuple(_sig(v) for v in x)
    if isinstance(x, dict):
        return tuple((k, _sig(v)) for k, v in sorted(x.items()))
    if isinstance(x, (int, float, bool, str, type(None))):
        return x
    return type(x).__name__


def signature_of(args: tuple, kwargs: dict) -> tuple:
    """The cache key of one call: shapes, dtypes and devices of tensors, values of the rest."""
    return (_sig(args), _sig(kwargs))


@dataclass
class Captured:
    """The result of `capture`: call it like the module; `.graph_module` is the FX graph.

    ``graph_modules`` holds every graph (one for export; one per piece for Dynamo's fallback).
    ``module_path`` maps nothing: module paths live on each node as ``meta["nn_module_stack"]``.
    """

    module: torch.nn.Module
    graph_modules: list[torch.fx.GraphModule]
    method: str  # "export-dynamic" | "export-static" | "dynamo"
    signature: tuple
    seconds: float
    exported_program: Any = None
    errors: dict[str, str] = field(default_factory=dict)  # strategy -> why it failed
    _runner: Callable | None = None

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        return self.graph_modules[0]

    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph

    @property
    def whole(self) -> bool:
        """True when one graph covers the whole forward (what graph passes need)."""
        return self.method.startswith("export")

    def __call__(self, *args, **kwargs):
        if self._runner is not None:
            return self._runner(*args, **kwargs)
        return self.graph_module(*args, **kwargs)

    def __repr__(self) -> str:
        n = sum(len(g.graph.nodes) for g in self.graph_modules)
        return (f"Captured({type(self.module).__name__}, method={self.method}, graphs={len(self.graph_modules)}, "
                f"nodes={n}, {self.seconds:.1f}s)")


# module -> {signature: Captured}; weak so a dropped model frees its graphs
_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def auto_dynamic_shapes(args: tuple, kwargs: dict):
    """``Dim.AUTO`` on every dim of every tensor input and on every ``int`` input (not ``bool``):
    export decides what stays symbolic. Python ints that size tensors (a frame count, a list of
    image shapes) would otherwise be burnt in as constants, and the token count with them."""
    from torch.export import Dim

    def spec(v):
        if isinstance(v, torch.Tensor):
            return {i: Dim.AUTO for i in range(v.dim())} if v.dim() else None
        if isinstance(v, int) and not isinstance(v, bool):
            return Dim.AUTO
        if isinstance(v, (list, tuple)):
            return type(v)(spec(x) for x in v)
        if isinstance(v, dict):
            return {k: spec(x) for k, x in v.items()}
        return None

    return spec(tuple(args)), {k: spec(v) for k, v in kwargs.items()}


@contextlib.contextmanager
def _module_tracker(root: torch.nn.Module):
    """Record the stack of module paths being run, so an error can name where it happened."""
    stack: list[str] = []
    deepest: list[list[str]] = [[]]
    names = {m: n for n, m in root.named_modules()}

    def pre(mod, _args):
        stack.append(names.get(mod, type(mod).__name__) or "<root>")
        if len(stack) >= len(deepest[0]):
            deepest[0] = list(stack)

    def post(mod, _args, _out):
        if stack:
            stack.pop()

    handles = [m.register_forward_pre_hook(pre) for m in names] + [m.register_forward_hook(post) for m in names]
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


_USER_FRAME = re.compile(r'File "([^"]+)", line (\d+), in ([^\s]+)\n\s*(.*)')


def _own(filename: str) -> bool:
    """Frames of torch and of ditpass's own capture code: not where the model failed."""
    f = filename.replace("\\", "/")
    return "/torch/" in f or f.endswith("ditpass/capture.py") or "/contextlib.py" in f


def _short(filename: str) -> str:
    return "/".join(filename.replace("\\", "/").rsplit("/", 2)[-2:])


def _failing_op(exc: BaseException) -> str:
    """Where the model's code failed: the last frame of the traceback outside torch and ditpass's
    capture (or, for Dynamo errors, the last user frame its message names), then the error."""
    import traceback

    where = None
    for e in _chain(exc):
        frames = [f for f in traceback.extract_tb(e.__traceback__) if not _own(f.filename)]
        if frames:
            f = frames[-1]
            where = f"{_short(f.filename)}:{f.lineno} `{(f.line or '').strip()}`"
            break
    if where is None:  # Dynamo reports the user frames in its message ("from user code: File ...")
        hits = [h for h in _USER_FRAME.findall(str(exc)) if not _own(h[0])]
        if hits:
            fn, line, _func, code = hits[-1]
            where = f"{_short(fn)}:{line} `{code.strip()}`"
    msg = str(exc).strip()
    first = msg.splitlines()[0][:300] if msg else ""
    return f"{where or '?'}: {type(exc).__name__}: {first}"


def _chain(exc: BaseException):
    """The exception, then the ones it was raised from (``raise ... from``), outer first."""
    out: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in out and len(out) < 8:
        out.append(e)
        e = e.__cause__
    return out


_TENSOR_DATA = torch._C.TensorBase.__dict__["data"]


@contextlib.contextmanager
def _traceable_data():
    """``t.data`` reads as ``t.detach()`` (same storage, visible to the tracer); writes unchanged."""
    torch.Tensor.data = property(lambda t: t.detach(), lambda t, v: _TENSOR_DATA.__set__(t, v))
    try:
        yield
    finally:
        del torch.Tensor.data


def _has_fake(v, depth: int = 0) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(v, FakeTensor):
        return True
    if depth < 3 and isinstance(v, (list, tuple)):
        return any(_has_fake(x, depth + 1) for x in v)
    if depth < 3 and isinstance(v, dict):
        return any(_has_fake(x, depth + 1) for x in v.values())
    return False


@contextlib.contextmanager
def _keep_module_state(module: torch.nn.Module):
    """Undo attribute writes that leave fake tensors on modules (caches filled while tracing)."""
    before = [(m, dict(m.__dict__), dict(m._buffers)) for m in module.modules()]
    try:
        yield
    finally:
        for m, attrs, bufs in before:
            for k, v in list(m.__dict__.items()):
                if k not in ("_parameters", "_buffers", "_modules") and _has_fake(v):
                    if k in attrs:
                        m.__dict__[k] = attrs[k]
                    else:
                        del m.__dict__[k]
            for k, v in list(m._buffers.items()):
                if _has_fake(v) and k in bufs:
                    m._buffers[k] = bufs[k]


def _export(module, args, kwargs, dynamic_shapes):
    import io

    printed = io.StringIO()  # torch prints the partial graph on data-dependent errors: keep it out of stdout
    try:
        with _traceable_data(), _keep_module_state(module), contextlib.redirect_stdout(printed):
            ep = torch.export.export(module, tuple(args), dict(kwargs), dynamic_shapes=dynamic_shapes, strict=False)
    finally:
        if printed.getvalue():
            log.debug("printed while exporting:\n%s", printed.getvalue())
    return ep, ep.module()


def _dynamo_capture(module, args, kwargs):
    """Dynamo's graphs, graph breaks handled by Python: returns (graphs, runner)."""
    graphs: list[torch.fx.GraphModule] = []

    def collect(gm: torch.fx.GraphModule, _example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(module, backend=collect, fullgraph=False, dynamic=False)
    with torch.no_grad():
        compiled(*args, **kwargs)
    if not graphs:
        raise RuntimeError("Dynamo produced no graph")
    return graphs, compiled


_STRATEGIES = ("export-dynamic", "export-static", "dynamo")


def _spec_key(spec: Any) -> str:
    """A hashable stand-in for a dynamic_shapes spec (Dims print their name and range)."""
    return spec if spec is None or isinstance(spec, str) else repr(spec)


def capture(module: torch.nn.Module, *args, dynamic_shapes: Any = "auto", strategies: tuple[str, ...] | None = None,
            **kwargs) -> Captured:
    """Capture ``module(*args, **kwargs)`` as an FX graph that shares the module's parameters.

    ``dynamic_shapes``: ``"auto"`` (every dim and int ``Dim.AUTO``), ``None`` (static) or an
    explicit ``torch.export`` spec for the keyword inputs. ``strategies`` restricts the strategies
    tried. The result is cached per input signature, ``dynamic_shapes`` and ``strategies``.
    """
    order = tuple(strategies or _STRATEGIES)
    bad = [m for m in order if m not in _STRATEGIES]
    if bad:
        raise ValueError(f"unknown capture strategy {bad[0]!r}; use one of {', '.join(_STRATEGIES)}")
    sig = signature_of(args, kwargs)
    key = (sig, _spec_key(dynamic_shapes), order)
    per_module = _CACHE.setdefault(module, {})
    if key in per_module:
        return per_module[key]
    errors: dict[str, str] = {}
    t0 = time.time()
    was_training = module.training
    module.eval()
    try:
        for method in order:
            if method == "export-dynamic" and dynamic_shapes is None:
                continue
            try:
                with _module_tracker(module) as stack, torch.no_grad():
                    if method == "export-dynamic":
                        if isinstance(dynamic_shapes, str) and dynamic_shapes == "auto":
                            a_spec, k_spec = auto_dynamic_shapes(args, kwargs)
                            spec = _combine_spec(module, a_spec, k_spec)
                        else:
                            spec = dynamic_shapes
                        ep, gm = _export(module, args, kwargs, spec)
                        result = Captured(module, [gm], method, sig, time.time() - t0, ep, errors)
                    elif method == "export-static":
                        ep, gm = _export(module, args, kwargs, None)
                        result = Captured(module, [gm], method, sig, time.time() - t0, ep, errors)
                    else:
                        graphs, runner = _dynamo_capture(module, args, kwargs)
                        result = Captured(module, graphs, method, sig, time.time() - t0, None, errors, runner)
            except Exception as exc:  # noqa: BLE001 - every failure is recorded and reported below
                where = stack[-1] if stack else "<root>"
                errors[method] = f"in module `{where}`: {_failing_op(exc)}"
                log.info("capture %s failed: %s", method, errors[method])
                continue
            per_module[key] = result
            return result
    finally:
        module.train(was_training)
    lines = "\n".join(f"  {m}: {e}" for m, e in errors.items())
    raise CaptureError(f"could not capture {type(module).__name__}; every strategy failed:\n{lines}")


def _combine_spec(module, a_spec, k_spec):
    """torch.export takes one spec for the call: a dict keyed by the forward's parameter names."""
    if not a_spec:
        return k_spec
    import inspect

    names = [p for p in inspect.signature(module.forward).parameters]
    return {**{names[i]: s for i, s in enumerate(a_spec)}, **k_spec}
