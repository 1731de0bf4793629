"""Generic helpers for typed dataclass configs: to/from JSON-able dicts and dotted
command-line overrides (``model.text.depth=4``), with did-you-mean errors."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

from .utils import did_you_mean


def _require(cond: bool, msg: str) -> None:
    """A ValueError with ``msg`` unless ``cond`` (configs validate with it)."""
    if not cond:
        raise ValueError(msg)


def _positive(owner: str, **values: int | float) -> None:
    for name, v in values.items():
        _require(v > 0, f"{owner}.{name} must be > 0, got {v}")

T = TypeVar("T")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _field_types(cls: type, data: dict | None = None) -> dict[str, Any]:
    """Annotated field types; a class with ``field_types_for(data)`` narrows some of them
    from the data (``PolicyConfig`` picks its model config by ``family``)."""
    types_ = typing.get_type_hints(cls)
    if data is not None and hasattr(cls, "field_types_for"):
        types_.update(cls.field_types_for(data))
    return types_


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Turn a JSON value into the annotated type (nested dataclasses, tuples, optionals)."""
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if isinstance(value, typ):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"config {where}: expected a mapping for {typ.__name__}, "
                             f"got {value!r}")
        return from_dict(typ, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except (ValueError, TypeError):
                continue
        raise ValueError(f"config {where}: {value!r} does not fit {typ}")
    if origin in (tuple, list) and not isinstance(value, (list, tuple)):
        raise ValueError(f"config {where}: expected a list (JSON, e.g. [\"a\", \"b\"]), "
                         f"got {value!r}")
    if origin is tuple:
        args = typing.get_args(typ)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
    if origin is list:
        (a,) = typing.get_args(typ)
        return [_coerce(v, a, where) for v in value]
    if origin is dict:
        _, a = typing.get_args(typ)
        return {k: _coerce(v, a, where) for k, v in value.items()}
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ in (int, float, str, bool) and not isinstance(value, typ):
        raise ValueError(f"config {where}: expected {typ.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass ``cls`` from a dict; unknown keys get a did-you-mean error."""
    types_ = _field_types(cls, data)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ValueError(f"config: {did_you_mean(key, names, what=f'key in {cls.__name__}')}"
                             f" (at {path!r})")
        kwargs[key] = _coerce(value, types_[key], path)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Return a copy of ``cfg`` with ``a.b.c=value`` overrides applied (values as JSON,
    or bare strings). Validation runs again through each dataclass's __post_init__."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected KEY=VALUE, e.g. model.chunk_size=8")
        key, text = item.split("=", 1)
        node, cls = data, type(cfg)
        parts = key.split(".")
        for i, part in enumerate(parts):
            names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(
                cls) else list(node)
            if part not in node:
                raise ValueError(f"override {key!r}: "
                                 f"{did_you_mean(part, names, what='config key')}")
            if i == len(parts) - 1:
                node[part] = _parse_value(text)
            else:
                sub_t = _field_types(cls, node)[part] if dataclasses.is_dataclass(
                    cls) else None
                node, cls = node[part], sub_t
                if not isinstance(node, dict):
                    raise ValueError(f"override {key!r}: {'.'.join(parts[:i + 1])} is not a "
                                     "section")
    return from_dict(type(cfg), data)
