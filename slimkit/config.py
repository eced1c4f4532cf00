"""Config dataclasses <-> plain dicts (YAML), with errors that name the field.

Every method's config is a small dataclass validated in ``__post_init__`` with :func:`check`;
recipes and CLI flags are thin loaders onto the same dataclasses via :func:`config_from_dict`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar, Union

from .errors import ConfigError

__all__ = ["check", "config_from_dict", "config_to_dict"]

T = TypeVar("T")


def check(condition: bool, field: str, message: str) -> None:
    """Raise :class:`ConfigError` for ``field`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message, field=field)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config as plain data (lists, dicts, numbers, strings) ready for YAML or JSON."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return plain(config)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, field: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, field)
            except ConfigError as e:
                errors.append(e.reason)
        raise ConfigError(f"got {value!r}; expected {' or '.join(_type_name(a) for a in args if a is not type(None))}"
                          + (" or null" if type(None) in args else ""), field=field)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"got {value!r}; choose one of {', '.join(map(repr, args))}", field=field)
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"got {value!r}; expected true or false", field=field)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"got {value!r}; expected an integer", field=field)
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"got {value!r}; expected a number", field=field)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"got {value!r}; expected a string", field=field)
        return value
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"got {value!r}; expected a list", field=field)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"got {value!r}; expected {len(args)} items", field=field)
            return tuple(_coerce(v, a, field) for v, a in zip(value, args))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, field) for v in value]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"got {value!r}; expected a mapping", field=field)
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, field): _coerce(v, vt, field) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return config_from_dict(tp, value)
    return value


def config_from_dict(cls: type[T], data: dict[str, Any] | None, where: str | None = None) -> T:
    """Build ``cls`` from a mapping, rejecting unknown fields and values of the wrong type."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of fields, got {data!r}", where=where)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    try:
        for key, value in data.items():
            if key not in fields:
                raise ConfigError(
                    f"unknown field; {cls.__name__} takes: {', '.join(fields) or 'no fields'}", field=str(key)
                )
            kwargs[key] = _coerce(value, hints.get(key, Any), key)
        return cls(**kwargs)
    except ConfigError as e:
        raise (e.located(where) if where else e) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e), where=where) from None
