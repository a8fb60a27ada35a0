"""Model zoo: real diffusers DiT classes with tiny and full-size configs (test and benchmark data)."""

from . import zoo
from .zoo import *  # noqa: F401,F403  (the zoo's API, listed once in zoo.__all__)

__all__ = list(zoo.__all__)
