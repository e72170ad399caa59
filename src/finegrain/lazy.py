"""Names a package exports but imports only on first use (PEP 562 module ``__getattr__``).

A package lists ``name -> module`` and sets ``__getattr__ = lazy_attributes(__name__, where)``, so that importing
the package stays light (no torch, transformers or matplotlib until a name that needs them is used).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` that imports ``where[name]`` and returns its ``name``."""

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
