"""ditpass: compiler passes that parallelize and speed up Diffusion Transformer inference.

    import ditpass
    pipe.transformer = ditpass.parallelize(pipe.transformer, ditpass.Plan(ulysses=2, ring=2))
    print(ditpass.explain(pipe.transformer))
"""
from .analysis import analyze
from .api import parallelize
from .module import ParallelModule
from .capture import CaptureError, Captured, capture
from .tools.explain import explain  # eager: importing the submodule later would otherwise shadow the function
from .plan import Plan, PlanError

__all__ = ["Plan", "PlanError", "capture", "Captured", "CaptureError", "analyze", "parallelize", "ParallelModule",
           "explain"]
