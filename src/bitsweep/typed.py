"""Plain data (YAML, JSON) -> typed dataclasses, with one clear line for every mistake.

Unknown keys are reported against the known ones and wrong types name the key, so a typo in a config
(``calibration.n_sampels``) stops the workflow before any job instead of being silently ignored.

>>> @dataclass
... class Calibration:
...     n_samples: int = 32
>>> from_dict(Calibration, {"n_samples": 8})
Calibration(n_samples=8)
>>> from_dict(Calibration, {"n_sampels": 8}, "backends.openvino.calibration")
Traceback (most recent call last):
bitsweep.errors.ConfigError: backends.openvino.calibration: unknown keys ['n_sampels']; known: n_samples
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass  # noqa: F401  (the doctest above)
from typing import Any

from bitsweep.errors import ConfigError


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, recursing into nested dataclasses."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    extra = set(data) - set(fields)
    if extra:
        raise ConfigError(
            f"{where or cls.__name__}: unknown keys {sorted(extra)}; known: {', '.join(sorted(fields))}"
        )
    kwargs = {key: _convert(hints[key], _over_default(fields[key], value), f"{where}.{key}".lstrip("."))
              for key, value in data.items()}  # fmt: skip
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required key is missing
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def _over_default(f: dataclasses.Field, value: Any) -> Any:
    """A partial mapping for a nested dataclass field overrides that field's own default, key by key: qnn's
    ``calibration: {n_samples: 2}`` keeps qnn's n_ctx (512), not the Calibration class's (256)."""
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    elif f.default is not dataclasses.MISSING:
        default = f.default
    else:
        return value
    if dataclasses.is_dataclass(default) and isinstance(value, dict):
        return _merge(dataclasses.asdict(default), value)
    return value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            _merge(base[key], value) if isinstance(base.get(key), dict) and isinstance(value, dict) else value
        )
    return out


def _convert(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None:
            return None
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin in (list, tuple) and not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if (origin is dict or hint is dict) and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    if hint in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if hint is int and value != int(value):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return hint(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def to_json(obj: Any, exclude: tuple[str, ...] = ()) -> str:
    """Stable JSON of a config object (minus top-level ``exclude`` keys): what Snakemake compares to decide
    what to re-run, so it must hold exactly what changes a job's output."""
    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    if exclude:
        data = {k: v for k, v in data.items() if k not in exclude}
    return json.dumps(data, sort_keys=True)
