"""ditpass: compiler passes that parallelize and speed up Diffusion Transformer inference.

    import ditpass
    pipe.transformer = ditpass.parallelize(pipe.transformer, ditpass.Plan(ulysses=2, ring=2))
    print(ditpass.explain(pipe.transformer))

The names below are imported on first use (PEP 562), so ``ditpass --help`` does not wait for torch.
``ditpass.capture`` is the function; its module is ``sys.modules["ditpass.capture"]``
(``from ditpass.capture import ...`` works as usual).
"""
import sys
import types
from importlib import import_module

__all__ = ["Plan", "PlanError", "InputMismatchError", "DistributedTimeout", "capture", "Captured", "CaptureError",
           "analyze", "parallelize", "ParallelModule", "explain", "denoising_loop"]

_WHERE = {"analyze": ".analysis", "parallelize": ".api", "ParallelModule": ".module", "CaptureError": ".capture",
          "Captured": ".capture", "capture": ".capture", "explain": ".tools.explain", "Plan": ".plan",
          "PlanError": ".plan", "InputMismatchError": ".errors", "DistributedTimeout": ".errors",
          "denoising_loop": ".components"}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'ditpass' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The import system sets ``ditpass.capture`` to the submodule when it is first imported; the public name
    is the function of that module, so that assignment is skipped (the function is looked up lazily)."""

    def __setattr__(self, name, value):
        if name == "capture" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
