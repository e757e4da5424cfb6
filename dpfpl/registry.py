"""The method registry as callers see it: every method of :mod:`dpfpl.methods` and the
``baselines`` package (which registers its classes with :func:`dpfpl.methods.register`)."""

from __future__ import annotations

from .errors import ConfigError
from .methods import _REGISTRY, Method

__all__ = ["get_method", "method_names"]


def _load_builtin() -> None:
    import baselines  # noqa: F401  (registers the baselines)


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
