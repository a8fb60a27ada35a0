"""Capture: a module plus example inputs -> one FX GraphModule that shares the module's parameters.

Strategies, tried in order (the first that works wins, and `Captured.method` says which):

1. ``export-dynamic``: ``torch.export.export(strict=False)`` with symbolic sizes. The caller may
   pass ``dynamic_shapes`` (e.g. the zoo's named dims ``H, W, F, T``); otherwise every dim of every
   tensor input and every ``int`` input (LTX's ``num_frames``/``height``/``width``, Qwen-Image's
   ``img_shapes``) is ``Dim.AUTO`` and export keeps symbolic whatever the code does not specialise.
   The analysis needs these symbols to find token dims without trusting numbers.
2. ``export-values``: the same, specialised on the values the model reads from its inputs. Data-
   dependent Python (``if mask.any():``, ``lengths = mask.sum(1).tolist()``, a boolean-mask
   select) runs on the example's real values (torch's real-tensor propagation): every integer
   read from a tensor, and every size that depends on data, is the example's number in the graph
   (so the sizes after it are concrete or symbolic in the input sizes only, never unbacked), and
   is checked by a runtime assertion in the graph (`Captured.specialized` lists them). A later
   call whose inputs read another value fails that assertion with an error that names the value,
   the source line that read it, the module and the example's value. A submodule that still
   cannot be traced (a mixture of experts that counts tokens per expert on the host) but acts on
   each token on its own, verified on the example, runs as one opaque token-wise op
   (`ditpass.opaque`; `Captured.opaque` lists the modules), which sequence parallelism shards
   through; every module of that class is made opaque at once.
3. ``export-static``: concrete sizes (a model whose Python branches on sizes).
4. ``dynamo``: Dynamo's graphs with its graph breaks left to Python (a model with data-dependent
   Python that none of the above captures). Callable and analysable, one graph per piece;
   passes that need one whole graph refuse it by name.

If all fail, `CaptureError` names the innermost module that was running and the failing op.

While exporting, things that break tracing in otherwise ordinary model code are made traceable
for every model alike:

- ``tensor.data`` reads are ``tensor.detach()`` (the same storage, but seen by the tracer):
  CogVideoX's sin-cos position table, rebuilt when the input size differs from the config's,
  is written through ``new_zeros(...).data[...].copy_()``; untraced, export fails with "fake
  tensor in the exported program constant's list". Only in the thread that captures, and
  only while it does (`_traceable_data`); other threads read ``.data`` as always.
- Symbolic sizes are hashable (``SymInt.__hash__``): a ``functools.lru_cache`` keyed on the grid
  size (NucleusMoE's RoPE) or ``len(set(seq_lengths))`` (Lumina2) would raise "unhashable
  SymInt". A size whose value is fixed hashes as that int; any other hashes alike within one
  capture, so that two symbolic sizes are compared with ``==``, which export turns into a guard
  or a symbolic answer (they are never taken to differ because their hashes do). A symbolic size
  and a plain int are taken to differ; the cache keeps its entries (keyed on that capture's
  sizes, they never match a later call).
- numpy ufuncs on symbolic sizes (``np.sqrt(norm.numel() / emb.numel())``, Cosmos) call the
  size's method of that name: ``sqrt``, ``floor`` and ``ceil`` exist while capturing.
- ``int(size)`` on a symbolic size keeps it symbolic (Kandinsky6SR's RoPE reads its grid as
  ``int(pos.shape[0])``, which would fix every token count to the example's): in the modules
  that define the model's submodule classes, the name ``int`` is a stand-in for the builtin
  that returns a ``SymInt`` unchanged and is the builtin otherwise (``isinstance(x, int)``
  holds as before), only while capturing (`_symbolic_int`).
- Module attributes that the traced forward sets to fake tensors (a lazily built cache) are put
  back afterwards, so the eager module keeps working.

All of these hold only in the thread that captures, and only while it does. One more holds always: the
predispatch ops that enter and leave a vmap level, which export writes around what ``torch.vmap`` traced
(flex_attention's block masks), are kept by dead-code elimination (`_keep_vmap_levels`).

torch.export's expected notes (``Dim.AUTO`` specialised a size-1 dim, ...) are kept out of the
terminal unless ``DITPASS_VERBOSE=1``; the Dynamo fallback compiles with a backend of its own and
leaves the user's other compiled functions alone (no ``torch._dynamo.reset()``).

Captures are cached per (module, input signature, dynamic_shapes, strategies): a diffusion run
calls one shape many times. The signature holds tensor shapes, dtypes and devices and the type
and value of every other argument (an Enum, a flag). A cached capture is used only while the
module's parameters and buffers are the objects it was captured with, with their data where it
was (`Weights`): a replaced layer or parameter, ``load_state_dict(assign=True)``,
``w.data = ...`` or ``model.half()`` capture again instead of running the old weights.
"""
from __future__ import annotations

import builtins
import contextlib
import enum
import logging
import math
import os
import re
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx

log = logging.getLogger("ditpass.capture")

__all__ = ["capture", "Captured", "CaptureError", "Specialization", "forget", "signature_of", "Weights"]


class CaptureError(RuntimeError):
    """No strategy could capture the module; the message names the module path and the op."""


def _sig(x: Any):
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.dtype, x.device.type)
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_sig(v) for v in x))
    if isinstance(x, dict):
        return ("dict", tuple((k, _sig(v)) for k, v in sorted(x.items())))
    if isinstance(x, enum.Enum):
        return (type(x).__qualname__, x.name, _sig(x.value))
    try:  # by type and value: True, 1 and 1.0 are equal as keys but may trace differently
        hash(x)
    except TypeError:
        return (type(x).__qualname__,)
    return (type(x).__qualname__, x)


def signature_of(args: tuple, kwargs: dict) -> tuple:
    """The cache key of one call: shapes, dtypes and devices of tensors, type and value of the rest."""
    return (_sig(args), _sig(kwargs))


class Weights:
    """What graphs captured from ``module`` read of it, to tell cheaply (no device work; under 1 ms for
    FLUX.1-dev's 1,160 tensors) whether it changed since: each module's parameter, buffer and child
    slots (the objects, which the graphs hold) and each tensor's data pointer and dtype (which compiled
    code may have aliased)."""

    def __init__(self, module: torch.nn.Module):
        self.slots = [(m, tuple(m._parameters.items()), tuple(m._buffers.items()), tuple(m._modules.items()))
                      for m in module.modules()]
        self.tensors = [(t, t.data_ptr(), t.dtype) for _, ps, bs, _ in self.slots for _, t in ps + bs
                        if t is not None]

    def current(self) -> bool:
        """False once a parameter, buffer or submodule was replaced, added or removed, or its data moved
        (``w.data = ...``, ``model.half()``); in-place writes keep it True."""
        for m, ps, bs, cs in self.slots:
            for now, then in ((m._parameters, ps), (m._buffers, bs), (m._modules, cs)):
                if len(now) != len(then):
                    return False
                for k, v in then:
                    if now.get(k) is not v:
                        return False
        return all(t.data_ptr() == ptr and t.dtype == dtype for t, ptr, dtype in self.tensors)


@dataclass
class Captured:
    """The result of `capture`: call it like the module; `.graph_module` is the FX graph.

    ``graph_modules`` holds every graph (one for export; one per piece for Dynamo's fallback).
    ``module_path`` maps nothing: module paths live on each node as ``meta["nn_module_stack"]``.
    """

    module: torch.nn.Module
    graph_modules: list[torch.fx.GraphModule]
    method: str  # "export-dynamic" | "export-values" | "export-static" | "dynamo"
    signature: tuple
    seconds: float
    exported_program: Any = None
    errors: dict[str, str] = field(default_factory=dict)  # strategy -> why it failed
    _runner: Callable | None = None
    weights: Weights | None = None  # the module's when captured: the cache serves this capture while current
    specialized: list = field(default_factory=list)  # export-values: the values fixed in the graph (Specialization)
    opaque: list[str] = field(default_factory=list)  # export-values: modules run as one opaque token-wise op

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

    def input_values(self) -> dict[str, Any]:
        """The fake value of each input as exported, by its path in the call's ``(args, kwargs)``
        (``pytree.keystr``, e.g. ``"[1]['hidden_states']"``); empty for Dynamo's pieces."""
        ep = self.exported_program
        if ep is None:
            return {}
        from torch.export.graph_signature import InputKind
        from torch.utils import _pytree as pytree

        spec = ep.call_spec.in_spec
        positions = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
        paths = [pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path(positions)[0]]
        user = [s.arg for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
        vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
        return {path: vals.get(getattr(arg, "name", None)) for path, arg in zip(paths, user)}

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


def forget(module: torch.nn.Module) -> None:
    """Drop the captures cached for ``module``: the next `capture` traces it again (for inputs that read other
    values than a specialised capture's example, see ``export-values``)."""
    _CACHE.pop(module, None)


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
_SYMINT_HASH = torch.SymInt.__hash__
_CAPTURING = threading.local()  # .depth: captures under way in this thread; .values: see _example_values
_DATA_LOCK = threading.Lock()
_data_users = 0  # captures under way in any thread; the shims are installed while > 0


def _capturing() -> bool:
    return bool(getattr(_CAPTURING, "depth", 0))


def _data_get(t):
    if _capturing():
        return t.detach()
    return _TENSOR_DATA.__get__(t, type(t))


def _symint_hash(s):
    if _capturing() and not s.node.is_nested_int():
        expr = s.node.expr
        return hash(int(expr)) if expr.is_number else hash(id(s.node.shape_env))
    return _SYMINT_HASH(s)


def _sym_method(name, fn):
    def method(s):
        if not _capturing():
            raise AttributeError(f"{type(s).__name__} has no method {name!r}")
        return fn(s)

    method.__name__ = name
    return method


# numpy ufuncs on an object call its method of the ufunc's name
_SYM_METHODS = {"sqrt": lambda s: torch._sym_sqrt(s), "floor": math.floor, "ceil": math.ceil}


def _install_shims():
    torch.Tensor.data = property(_data_get, lambda t, v: _TENSOR_DATA.__set__(t, v))
    torch.SymInt.__hash__ = _symint_hash
    for cls in (torch.SymInt, torch.SymFloat):
        for name, fn in _SYM_METHODS.items():
            if name not in cls.__dict__:
                setattr(cls, name, _sym_method(name, fn))


def _remove_shims():
    del torch.Tensor.data
    torch.SymInt.__hash__ = _SYMINT_HASH
    for cls in (torch.SymInt, torch.SymFloat):
        for name in _SYM_METHODS:
            if getattr(cls.__dict__.get(name), "__name__", None) == name:
                delattr(cls, name)


@contextlib.contextmanager
def _traceable_data():
    """While a capture runs in this thread: ``t.data`` reads as ``t.detach()`` (same storage, visible to the
    tracer; writes unchanged), symbolic sizes hash and take numpy's ``sqrt``/``floor``/``ceil`` (see the
    module docstring); other threads see torch as always. Re-entrant (a capture inside a capture)."""
    global _data_users
    with _DATA_LOCK:
        if _data_users == 0:
            _install_shims()
        _data_users += 1
    _CAPTURING.depth = getattr(_CAPTURING, "depth", 0) + 1
    try:
        yield
    finally:
        _CAPTURING.depth -= 1
        with _DATA_LOCK:
            _data_users -= 1
            if _data_users == 0:
                _remove_shims()


class _IntType(type):
    def __instancecheck__(cls, x):
        return isinstance(x, builtins.int)

    def __subclasscheck__(cls, c):
        return issubclass(c, builtins.int)


class _Int(metaclass=_IntType):
    """``int`` in a model's source modules while capturing: ``int(size)`` of a symbolic size stays symbolic."""

    def __new__(cls, x=0, *args, **kwargs):
        if isinstance(x, torch.SymInt) and not args and not kwargs and _capturing():
            return x
        return builtins.int(x, *args, **kwargs)


_INT_USERS: dict[str, int] = {}  # module name -> captures under way that put _Int there
_INT_LOCK = threading.Lock()


@contextlib.contextmanager
def _symbolic_int(module: torch.nn.Module):
    """`_Int` as ``int`` in the modules defining ``module``'s submodule classes (those without an ``int`` of
    their own; the torch and ditpass ones left alone), for the duration of a capture."""
    names = {type(m).__module__ for m in module.modules()}
    mods = [sys.modules[n] for n in names if n in sys.modules and not n.startswith(("torch.", "ditpass."))]
    with _INT_LOCK:
        mine = [m for m in mods if m.__dict__.get("int", _Int) is _Int]
        for m in mine:
            _INT_USERS[m.__name__] = _INT_USERS.get(m.__name__, 0) + 1
            m.__dict__["int"] = _Int
    try:
        yield
    finally:
        with _INT_LOCK:
            for m in mine:
                _INT_USERS[m.__name__] -= 1
                if not _INT_USERS[m.__name__]:
                    del _INT_USERS[m.__name__]
                    m.__dict__.pop("int", None)


@dataclass
class Specialization:
    """A value the capture read from the example's tensors and fixed in the graph (``export-values``)."""

    symbol: str  # the unbacked symbol torch gave it (``u0``), named in the graph's runtime assertions
    value: int  # the example's value
    where: str  # the model's source line that read it
    module: str  # the module path running there

    def __str__(self) -> str:
        return f"{self.where} in module `{self.module}` read {self.value}"


_SET_REAL_VAL = None  # ShapeEnv.set_real_tensor_prop_unbacked_vals, while _example_values patches it
_values_users = 0  # export-values captures under way in any thread


def _user_frame() -> str:
    import traceback

    frames = [f for f in traceback.extract_stack() if not _own(f.filename)]
    if not frames:
        return "?"
    f = frames[-1]
    return f"{_short(f.filename)}:{f.lineno} `{(f.line or '').strip()}`"


@contextlib.contextmanager
def _example_values(stack: list[str], record: list[Specialization]):
    """Export on real values too, and fix every integer that the traced code reads from a tensor, or that a
    data-dependent size is, at the example's value: ``Eq(u, value)``, a runtime assertion in the graph
    that also makes torch replace ``u`` by the value in every size after it. Fixed after the torch call
    that produced it returns (torch binds a fresh symbol to the op's output first)."""
    import sympy
    import torch._functorch.config
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch.overrides import TorchFunctionMode
    from torch.utils._sympy.symbol import SymT, symbol_is_type

    global _SET_REAL_VAL, _values_users
    pending: list = []
    fixed: set = set()

    def set_real(env, k, v):
        _SET_REAL_VAL(env, k, v)
        if getattr(_CAPTURING, "values", None) is not pending:
            return
        if isinstance(k, sympy.Eq) and k.rhs == 1:  # a bool read from a tensor: Eq(u, 1) over an int u
            k, v = k.lhs, int(bool(v))
        if isinstance(k, sympy.Symbol) and symbol_is_type(k, SymT.UNBACKED_INT) and k not in fixed:
            fixed.add(k)
            pending.append((env, k, int(v)))

    class FixValues(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            while pending:
                env, k, v = pending.pop(0)
                spec = Specialization(str(k), v, _user_frame(), stack[-1] if stack else "<root>")
                record.append(spec)
                # a count of selected elements is "size-like": torch then reasons as if it were >= 2 and keeps it
                # symbolic when it is 0 or 1; here it is the example's number, checked by the assertion
                env.size_like.discard(k)
                env.guard_or_defer_runtime_assert(sympy.Eq(k, v), f"ditpass: {spec}")
            return out

    with _DATA_LOCK:
        if _values_users == 0:
            _SET_REAL_VAL = ShapeEnv.set_real_tensor_prop_unbacked_vals
            ShapeEnv.set_real_tensor_prop_unbacked_vals = set_real
        _values_users += 1
    outer, _CAPTURING.values = getattr(_CAPTURING, "values", None), pending
    try:
        with torch._functorch.config.patch(fake_tensor_propagate_real_tensors=True,
                                           generate_fake_kernels_from_real_mismatches=True), FixValues():
            yield
    finally:
        _CAPTURING.values = outer
        with _DATA_LOCK:
            _values_users -= 1
            if _values_users == 0:
                ShapeEnv.set_real_tensor_prop_unbacked_vals = _SET_REAL_VAL


def _explain_asserts(gm: torch.fx.GraphModule, specs: list[Specialization], name: str) -> None:
    """The graph's runtime assertions on a fixed value say which value, where it was read, and what to do."""
    by_symbol = {s.symbol: s for s in specs}
    changed = False
    for node in gm.graph.nodes:
        if node.target is not torch.ops.aten._assert_scalar.default or len(node.args) < 2:
            continue
        hits = [by_symbol[u] for u in re.findall(r"\bu\d+\b", str(node.args[1])) if u in by_symbol]
        if not hits:
            continue
        expr = str(node.args[1]).split("expression ")[-1].split(" on node")[0]
        node.args = (node.args[0], (
            f"{name} was captured specialised on a value read from its example inputs: "
            + "; ".join(f"{h.where} (module `{h.module}`) read {h.value}" for h in hits)
            + f". These inputs read another value ({expr} does not hold), so the graph captured for the "
            f"example does not apply to them (ditpass keeps one graph per input shapes): call it with inputs that "
            f"read the same values, or capture again for these: `ditpass.capture.forget(model)`, then a new "
            f"ditpass.capture(model, ...) or ditpass.parallelize(model, plan) called with them"))
        changed = True
    if changed:
        gm.recompile()


# torch's loggers whose warnings during our capture are expected (a size-1 dim specialised, a graph break
# that the fallback handles): at ERROR while capturing, unless DITPASS_VERBOSE=1
_QUIET = ("torch._export", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes")


@contextlib.contextmanager
def _quiet_torch():
    if os.environ.get("DITPASS_VERBOSE", "") not in ("", "0"):
        yield
        return
    loggers = [logging.getLogger(name) for name in _QUIET]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


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

    from torch.utils import _pytree as pytree

    # export marks its example inputs' dims dynamic, on the tensor objects: a user's compiled function
    # called with them later would recompile; aliases (same storage) take the marks instead
    args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.detach(), (tuple(args), dict(kwargs)))
    printed = io.StringIO()  # torch prints the partial graph on data-dependent errors: keep it out of stdout
    try:
        with _traceable_data(), _symbolic_int(module), _keep_module_state(module), \
                contextlib.redirect_stdout(printed):
            ep = torch.export.export(module, tuple(args), dict(kwargs), dynamic_shapes=dynamic_shapes, strict=False)
    finally:
        if printed.getvalue():
            log.debug("printed while exporting:\n%s", printed.getvalue())
    return ep, ep.module()


def _export_values(module, args, kwargs, dynamic_shapes, stack: list[str]):
    """``export-values`` (see the module docstring): returns (ep, gm, specializations, opaque module paths).
    A failure inside a submodule makes every module of its class an opaque token-wise op, where each one
    is verified token-wise on the example, and exports again; otherwise the failure is raised, saying why
    the module could not be made opaque."""
    from .opaque import opaque_forwards

    paths = {m: n or "<root>" for n, m in module.named_modules()}
    opaque: dict[torch.nn.Module, tuple[int, list[int]]] = {}
    tried: set[type] = set()
    while True:
        specs: list[Specialization] = []
        stack.clear()
        try:
            with _example_values(stack, specs), opaque_forwards(opaque):
                ep, gm = _export(module, args, kwargs, dynamic_shapes)
        except Exception as exc:  # noqa: BLE001 - re-raised unless the failing module can be made opaque
            where = stack[-1] if stack else "<root>"
            sub = module.get_submodule(where) if where != "<root>" else None
            if sub is None or type(sub) in tried:
                raise
            tried.add(type(sub))
            made, why = _make_opaque(module, type(sub), args, kwargs, paths)
            if why:
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                raise RuntimeError(f"{type(exc).__name__}: {first}; `{where}` ({type(sub).__name__}) was not made an "
                                   f"opaque token-wise op: {why}") from exc
            opaque.update(made)
            continue
        _explain_asserts(gm, specs, type(module).__name__)
        _drop_real_values(ep.graph_module, gm)
        return ep, gm, specs, [paths[m] for m in opaque]


def _drop_real_values(*gms: torch.fx.GraphModule) -> None:
    """Real-tensor propagation leaves the example's value on every fake value of the graph, and its fake mode
    running every op for real: a pass that propagates shapes with that mode would run the collectives it
    inserts, and the graph would hold a copy of every intermediate tensor. Both are dropped."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils import _pytree as pytree

    for gm in gms:
        for node in gm.graph.nodes:
            for v in pytree.tree_leaves(node.meta.get("val")):
                if isinstance(v, FakeTensor):
                    v.real_tensor = None
                    v.fake_mode.propagate_real_tensors = False


def _make_opaque(root, cls, args, kwargs, paths):
    """Every module of class ``cls`` that the example runs, registered as an opaque token-wise op:
    ``({module: (key, dims)}, "")``, or ``({}, why not)`` where one of them does not qualify."""
    from .opaque import register, single_tensor_call, verify_tokenwise

    targets = [m for m in root.modules() if type(m) is cls]
    seen: dict = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, kw: seen.setdefault(mod, (a, kw)) and None, with_kwargs=True)
             for m in targets]
    try:
        with torch.no_grad():
            root(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    made = {}
    for m in targets:
        if m not in seen:
            continue
        a, kw = seen[m]
        if not single_tensor_call(a, kw):
            return {}, (f"`{paths[m]}` is called with {len(a)} positional and {len(kw)} keyword arguments; an "
                        f"opaque token-wise op takes one tensor")
        dims, why = verify_tokenwise(m, a[0])
        if not dims:
            return {}, f"`{paths[m]}`: {why}"
        with torch.no_grad():
            made[m] = (register(m, paths[m], m(a[0])), dims)
    return made, ""


def _dynamo_capture(module, args, kwargs):
    """Dynamo's graphs, graph breaks handled by Python: returns (graphs, runner)."""
    graphs: list[torch.fx.GraphModule] = []

    def collect(gm: torch.fx.GraphModule, _example_inputs):
        graphs.append(gm)
        return gm.forward

    # no torch._dynamo.reset(): it would drop the user's other compiled functions. Our backend is a new
    # object, so Dynamo compiles afresh for it; the limit only counts our own recompiles of this code.
    compiled = torch.compile(module, backend=collect, fullgraph=False, dynamic=False)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1024, accumulated_recompile_limit=4096):
        compiled(*args, **kwargs)
    if not graphs:
        raise RuntimeError("Dynamo produced no graph")
    return graphs, compiled


def _keep_vmap_levels() -> None:
    """Export traces ``torch.vmap`` (flex_attention's BlockMask: ``create_block_mask`` evaluates the mask_mod under
    vmap, ``BlockMask.from_kv_blocks`` transposes the block tables under vmap) as predispatch ops that enter and
    leave a vmap level around the batched ops. Their results are unused, so FX's dead-code elimination (every
    pass that rewrites the graph runs it) would drop them and leave the batched ops between them without their
    level ("Either your tensor may have escaped from inside a function being vmapped ..."). They are marked
    side-effectful, which they are (they change functorch's nesting level), once for every graph."""
    try:
        from torch._functorch import predispatch
        from torch.fx import node as fx_node
    except ImportError:  # a torch without them: nothing to keep
        return
    for name in ("_vmap_increment_nesting", "_vmap_decrement_nesting"):
        fn = getattr(predispatch, name, None)
        if fn is not None:
            fx_node._side_effectful_functions.add(fn)


_keep_vmap_levels()

_STRATEGIES = ("export-dynamic", "export-values", "export-static", "dynamo")


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
    cached = per_module.get(key)
    if cached is not None and cached.weights.current():
        return cached
    errors: dict[str, str] = {}
    t0 = time.time()
    was_training = module.training
    module.eval()
    try:
        for method in order:
            if method in ("export-dynamic", "export-values") and dynamic_shapes is None:
                continue
            try:
                with _module_tracker(module) as stack, torch.no_grad(), _quiet_torch():
                    if method in ("export-dynamic", "export-values"):
                        if isinstance(dynamic_shapes, str) and dynamic_shapes == "auto":
                            a_spec, k_spec = auto_dynamic_shapes(args, kwargs)
                            spec = _combine_spec(module, a_spec, k_spec)
                        else:
                            spec = dynamic_shapes
                        if method == "export-dynamic":
                            ep, gm = _export(module, args, kwargs, spec)
                            result = Captured(module, [gm], method, sig, time.time() - t0, ep, errors)
                        else:
                            ep, gm, specs, opaque = _export_values(module, args, kwargs, spec, stack)
                            result = Captured(module, [gm], method, sig, time.time() - t0, ep, errors,
                                              specialized=specs, opaque=opaque)
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
            result.weights = Weights(module)
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


capture.forget = forget  # ``ditpass.capture`` is the function: ``ditpass.capture.forget(model)`` reaches this
