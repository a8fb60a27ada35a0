"""ditpass: compiler passes that parallelize and speed up Diffusion Transformer inference.

    import ditpass
    pipe.transformer = ditpass.parallelize(pipe.transformer, ditpass.Plan(ulysses=2, ring=2))
    print(ditpass.explain(pipe.transformer))
"""
from .analysis import analyze
from .api import ParallelModule, parallelize
from .capture import CaptureError, Captured, capture
from .plan import Plan, PlanError

__all__ = ["Plan", "PlanError", "capture", "Captured", "CaptureError", "analyze", "parallelize", "ParallelModule",
           "explain"]


def explain(obj, **kwargs):
    """What ditpass did to ``obj`` (a `Captured` or a parallelized module); prints as text."""
    from .explain import explain as _explain

    return _explain(obj, **kwargs)
