"""The errors every stage may raise, in a module of their own so that the runtime raises them
without importing the plan."""
from __future__ import annotations

__all__ = ["PlanError", "InputMismatchError", "DistributedTimeout"]


class PlanError(ValueError):
    """A plan that cannot run as given; the message names the field and the fix."""


class InputMismatchError(ValueError):
    """The ranks called the model with different inputs; the message names the inputs and the ranks."""


class DistributedTimeout(RuntimeError):
    """A collective waited longer than the process group's timeout (a peer rank is stuck or gone); the
    message names the collective, this rank and the step."""
