"""JSON into frozen dataclasses, strictly: every field's type is checked against the dataclass's hints (unions,
literals, tuples, nested dataclasses), unknown and missing fields are named, and nothing is silently converted
(``true`` is not a 1, 2.7 is not a 2). ``ConfigError`` names the field and the fix."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# A value read from or written to JSON (a preset, an inline transformers/diffusers config, an architecture file):
# arbitrary by nature. Code that reads one checks it (require_int, coerce, check_inline_config) before trusting it.
JSONValue = Any
D = TypeVar("D", bound="DataclassInstance")


class ConfigError(ValueError):
    """A preset or config file that cannot describe a model; the message names the field and the fix."""


def is_int(value: object) -> bool:
    """A whole number, not a bool (which Python counts as an int: ``true`` in a config is a mistake, not a 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def require_int(name: str, value: object, minimum: int) -> None:
    """``value`` is a whole number >= ``minimum``. A float is refused, not truncated: 2.7 is a mistake, not a 2."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def check_inline_config(where: str, make: Callable[[], object]) -> None:
    """Make the transformers config object an inline ``config`` describes (no weights, no download), so that a wrongly
    typed field is a ConfigError naming it when the preset loads, not huggingface_hub's
    StrictDataclassFieldValidationError traceback when the model is built."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        make()
    except (StrictDataclassError, TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"{where}: {' '.join(str(e).split())}") from None


def to_jsonable(value: JSONValue) -> JSONValue:
    if isinstance(value, Mapping):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def build(cls: type[D], data: object, path: str) -> D:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'} must be an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(path + u for u in unknown)}; known: {', '.join(fields)}")
    kwargs: dict[str, object] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required field {path + name!r}")
            continue
        kwargs[name] = coerce(hints[name], data[name], path + name)
    return cls(**kwargs)


# tp is any type hint (a class, a Union, a Literal, Mapping[...]...): typing has no type for "a type hint"
def coerce(tp: Any, value: object, path: str) -> object:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors: list[str] = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path!r} has the wrong type: {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path!r} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path!r} must be a list, got {type(value).__name__} {value!r}")
        return tuple(coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is Mapping or tp is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path!r} must be an object, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, path + ".")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # bool is an int in Python; a config saying `"n_visual_tokens": true` is a mistake, not a 1.
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{path!r} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value
