"""Frozen dataclasses registered as JAX pytrees, with no extra dependency.

Fields marked ``static_field()`` are part of the tree structure (hashable,
compile-time); all other fields are leaves. Numbers must be leaves so that a
sweep or a ``vmap`` over them never recompiles.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax

_T = TypeVar("_T")


def static_field(**kwargs: Any) -> Any:
    """A dataclass field that is static (part of the treedef, not a leaf)."""
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata["static"] = True
    return dataclasses.field(metadata=metadata, **kwargs)


def pytree_dataclass(cls: type[_T]) -> type[_T]:
    """Make ``cls`` a frozen dataclass and register it as a pytree."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    data_names = [f.name for f in fields if not f.metadata.get("static", False)]
    meta_names = [f.name for f in fields if f.metadata.get("static", False)]
    jax.tree_util.register_dataclass(cls, data_fields=data_names, meta_fields=meta_names)
    return cls


def replace(obj: _T, **changes: Any) -> _T:
    """``dataclasses.replace`` re-exported for pytree dataclasses."""
    return dataclasses.replace(obj, **changes)  # type: ignore[type-var]
