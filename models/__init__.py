"""Model zoo: real diffusers DiT classes with tiny and full-size configs (test and benchmark data)."""

from .zoo import (  # noqa: F401
    FULL_SOURCES,
    GUARDED,
    NAMES,
    PUBLISHED_PARAMS,
    SIZES,
    STATIC_REASONS,
    build,
    config,
    describe,
    dynamic_dims,
    make_inputs,
)

__all__ = [
    "NAMES",
    "SIZES",
    "FULL_SOURCES",
    "PUBLISHED_PARAMS",
    "STATIC_REASONS",
    "GUARDED",
    "build",
    "config",
    "make_inputs",
    "dynamic_dims",
    "describe",
]
