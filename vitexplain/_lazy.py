"""Package namespaces whose names are imported on first use, so that importing a package (or asking the
command line for ``--help``) loads no torch, timm or numba."""
from __future__ import annotations

from importlib import import_module
from typing import Callable


def lazy_exports(package: str, homes: dict[str, str]) -> tuple[Callable, Callable, list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` for ``package``: each name of ``homes`` is looked up in
    its module (relative to ``package``) when first asked for, then kept in the package's namespace."""
    import sys

    def __getattr__(name: str):
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(homes[name], package), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(homes))

    return __getattr__, __dir__, sorted(homes)
