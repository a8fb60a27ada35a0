"""The errors every stage may raise, in a module of their own so that the runtime raises them
without importing the plan."""
from __future__ import annotations

__all__ = ["PlanError"]


class PlanError(ValueError):
    """A plan that cannot run as given; the message names the field and the fix."""
