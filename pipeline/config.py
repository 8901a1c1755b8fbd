"""Typed configs: dataclass schemas filled from defaults, an optional preset, a YAML file and
dotted command-line overrides, in that order.

Promises:
- `load_config` returns an instance of the schema whose every field has the declared type, or
  raises `ConfigError` before any work is done. The message names the source of the bad value
  (the file path, `command line`, `<base>` or `<defaults>`), the dotted key and the expected type.
- Mappings merge key by key across layers; any other value (lists included) replaces the one
  below it, so `optim.lr=3e-4` changes one knob and `tags=[a]` replaces the whole list.
- `to_dict`, `dump_config` and `config_hash` see exactly what `load_config` accepts: a dumped
  config loads back to an equal object, and equal configs hash equally on any machine.
- A field declared with `operational(...)` changes how a run executes (resources, worker and thread
  counts, timeouts, log and save periods), never what it computes: `result_view` and `result_hash`
  leave it out, as they leave out what a config's `unused_keys()` names. A field declared with `extendable(...)` (`trainer.max_steps`) changes the result, but
  raising it continues a run from its checkpoints instead of starting it again.
- Every number is checked against the `Range` its type declares (pipeline/ranges.py: `lr:
  PositiveFloat`, `channel_mult: list[PositiveInt]`), and every float must be finite: a value out of
  range is a `ConfigError` naming the key, its source and the range, before any dataclass is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import os
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from pipeline.ranges import FieldError, range_of

T = TypeVar("T")
Key = tuple[Any, ...]  # a path into the config: field names and dict keys (str), list indices (int)

COMMAND_LINE = "command line"
DEFAULTS = "<defaults>"
BASE = "<base>"


class ConfigError(ValueError):
    """A config problem, with a message naming the key, the source (file path or 'command line')
    and the expected type."""


def load_config(schema: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                *, base: Mapping | None = None) -> T:
    """Defaults of `schema` (a dataclass, possibly nesting dataclasses), then `base` (a preset
    mapping), then the YAML file at `path`, then dotted overrides like "optim.lr=3e-4" (values
    parsed as YAML), merged in that order, validated, and returned as an instance of `schema`.

    Each dataclass's `validate(self)` method, if it has one, runs after it is built (children
    first); a ValueError it raises becomes a ConfigError naming that dataclass's key."""
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        raise TypeError(f"schema must be a dataclass type, got {schema!r}")
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    raw: dict = {}
    sources: dict[Key, str] = {}
    _merge(raw, _defaults(schema), DEFAULTS, sources)
    if base is not None:
        _merge(raw, base, BASE, sources)
    if path is not None:
        _merge(raw, _read_yaml(path), os.fspath(path), sources)
    for item in overrides:
        _merge(raw, _override_mapping(item), COMMAND_LINE, sources)
    # Where a value is absent rather than wrong, blame the most specific layer the user gave.
    fallback = os.fspath(path) if path is not None else COMMAND_LINE if overrides else DEFAULTS
    return _Resolver(sources, fallback).build(raw, schema, ())


def merge_overrides(raw: Mapping, overrides: Sequence[str]) -> dict:
    """A copy of `raw` with each "dotted.key=value" override merged in, schema-free."""
    out: dict = {}
    _merge(out, raw, DEFAULTS, {})
    for item in overrides:
        _merge(out, _override_mapping(item), COMMAND_LINE, {})
    return out


def to_dict(cfg: Any) -> dict:
    """`cfg` as plain nested dicts, lists and scalars (tuples become lists), holding the fields
    that `load_config` accepts, so the result is fit for `yaml.safe_dump` and `json.dumps`."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"to_dict expects a dataclass instance, got {type(cfg).__name__}")
    return _plain(cfg)


def dump_config(cfg: Any, path: str | os.PathLike, comment: str = "") -> None:
    """Write the fully resolved `cfg` as YAML in field order, after `comment` as a first line of
    YAML comment when given, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)
    path.write_text(f"# {comment}\n{text}" if comment else text, encoding="utf-8")


_ROLE = "t2i.role"  # the key of a field's role in its metadata
OPERATIONAL, EXTENDABLE = "operational", "extendable"


def operational(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that changes how a run executes, not what it computes; see the module docstring."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_ROLE: OPERATIONAL})


def extendable(default: int) -> Any:
    """An int dataclass field whose increase continues a run from its checkpoints (see the module docstring)."""
    return dataclasses.field(default=default, metadata={_ROLE: EXTENDABLE})


def result_view(cfg: Any) -> dict[str, Any]:
    """The values that change what a run computes, flat by dotted key ('optim.lr'; a list or a
    mapping is one value): operational fields left out, and the keys under the prefixes a config's
    `unused_keys()` names, when it has that method (keys its other values make irrelevant)."""
    unused = tuple(cfg.unused_keys()) if callable(getattr(cfg, "unused_keys", None)) else ()
    return {key: _plain(value) for key, role, value in _leaves(cfg, "", None)
            if role != OPERATIONAL and not any(key == prefix or key.startswith(prefix + ".") for prefix in unused)}


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The keys whose values differ between two result views, with (old, new); a key absent from
    one side has the value MISSING there."""
    return {key: (old.get(key, MISSING), new.get(key, MISSING)) for key in sorted(set(old) | set(new))
            if old.get(key, MISSING) != new.get(key, MISSING)}


MISSING = "(absent)"


def extendable_keys(cfg: Any) -> set[str]:
    """The dotted keys of `cfg`'s extendable fields."""
    return {key for key, role, _ in _leaves(cfg, "", None) if role == EXTENDABLE}


def _leaves(cfg: Any, prefix: str, inherited: str | None) -> Iterator[tuple[str, str | None, Any]]:
    """(dotted key, role, value) of every non-dataclass field; a field inherits the role of the
    nearest marked dataclass field above it (`launch` marks all of LaunchConfig)."""
    for f in _init_fields(cfg):
        role, value = f.metadata.get(_ROLE, inherited), getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from _leaves(value, f"{prefix}{f.name}.", role)
        else:
            yield f"{prefix}{f.name}", role, value


def result_hash(cfg: Any) -> str:
    """sha256 hex digest of the canonical JSON of `result_view(cfg)`: equal for configs that differ
    only in operational fields."""
    return _digest(result_view(cfg))


def config_hash(cfg: Any) -> str:
    """sha256 hex digest of the canonical JSON of `to_dict(cfg)`: independent of field order,
    and different whenever any value differs."""
    return _digest(to_dict(cfg))


def _digest(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _plain(value: Any) -> Any:
    """A deep copy of `value` made of dicts, lists and scalars only."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in _init_fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _init_fields(cls: Any) -> list[dataclasses.Field]:
    """The fields a config sets: those passed to __init__."""
    return [f for f in dataclasses.fields(cls) if f.init]


def _defaults(schema: type) -> dict:
    """The schema's defaults as plain data; a required nested dataclass contributes its own."""
    hints = get_type_hints(schema, include_extras=True)
    out: dict = {}
    for f in _init_fields(schema):
        if f.default is not dataclasses.MISSING:
            out[f.name] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = _plain(f.default_factory())
        elif dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = _defaults(hints[f.name])
    return out


def _merge(into: dict, new: Mapping, source: str, sources: dict[Key, str], prefix: Key = ()) -> None:
    """Merge `new` into `into` in place, recording in `sources` which layer set each key."""
    for k, v in new.items():
        key = (*prefix, k)
        if isinstance(v, Mapping) and isinstance(into.get(k), dict):
            _merge(into[k], v, source, sources, key)
            continue
        into[k] = _plain(v)
        for stale in [s for s in sources if s[: len(key)] == key]:
            del sources[stale]
        sources[key] = source


def _override_mapping(item: str) -> dict:
    """'a.b=value' as {'a': {'b': value}}, the value parsed as YAML."""
    key, sep, text = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(parts):
        raise ConfigError(f"{COMMAND_LINE}: override {item!r} must look like key=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = f"value {text!r} is not valid YAML ({getattr(e, 'problem', None) or e})"
        raise ConfigError(f"{COMMAND_LINE}: key '{key}': {problem}") from None
    for part in reversed(parts):
        value = {part: value}
    return value


def _read_yaml(path: str | os.PathLike) -> dict:
    source = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{source}: cannot read config file ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}: invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if data is None:  # an empty file sets nothing
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of keys to values, got {_describe(data)}")
    return data


class _Resolver:
    """Turns merged raw data into typed values, blaming the layer each bad value came from."""

    def __init__(self, sources: dict[Key, str], fallback: str) -> None:
        self.sources = sources
        self.fallback = fallback

    def source(self, key: Key) -> str:
        """The layer that set `key`, or else the nearest mapping holding it."""
        held = (self.sources[key[:n]] for n in range(len(key), 0, -1) if key[:n] in self.sources)
        return next(held, self.fallback)

    def wrong_type(self, value: Any, shown: Any, key: Key, blame: Key | None = None) -> ConfigError:
        """`key` holds `value`, not a `shown`; the layer that set `blame` (default: `key`) is named."""
        expected = _type_name(shown)
        if dataclasses.is_dataclass(shown):
            expected = f"a mapping ({expected})"
        source = self.source(blame or key)
        return ConfigError(f"{source}: key '{_dotted(key)}' expects {expected}, got {_describe(value)}")

    def build(self, raw: Any, cls: type[T], key: Key, shown: Any = None) -> T:
        """An instance of dataclass `cls` from mapping `raw`, validated."""
        if not isinstance(raw, Mapping):
            raise self.wrong_type(raw, shown or cls, key)
        hints = get_type_hints(cls, include_extras=True)
        fields = {f.name: f for f in _init_fields(cls)}
        for name in raw:
            if name not in fields:
                close = difflib.get_close_matches(str(name), list(fields), n=1)
                # else a field of that name one section down: `top_k` for the sample stage's `dalle.top_k`
                close = close or [f"{section}.{name}" for section in fields if dataclasses.is_dataclass(hints[section])
                                  and name in {inner.name for inner in _init_fields(hints[section])}][:1]
                hint = f" (did you mean '{_dotted((*key, close[0]))}'?)" if close else ""
                raise ConfigError(f"{self.source((*key, name))}: unknown key '{_dotted((*key, name))}'{hint}")
        kwargs = {}
        for name, f in fields.items():
            if name in raw:
                kwargs[name] = self.coerce(raw[name], hints[name], (*key, name))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                missing = f"missing required value '{_dotted((*key, name))}'"
                raise ConfigError(f"{self.fallback}: {missing} (expected {_type_name(hints[name])})")
        try:
            obj = cls(**kwargs)
            if callable(getattr(obj, "validate", None)):
                obj.validate()
        except FieldError as e:  # a check of one field's value
            field_key = (*key, e.field)
            raise ConfigError(f"{self.source(field_key)}: key '{_dotted(field_key)}' {e}") from e
        except ValueError as e:  # from __post_init__ or validate(): a range or consistency check
            # Any layer that set a value in or above this dataclass may hold the culprit.
            around = dict.fromkeys(s for k, s in self.sources.items()
                                   if s != DEFAULTS and (k[: len(key)] == key or key[: len(k)] == k))
            where = f"key '{_dotted(key)}'" if key else "config"
            source = " + ".join(around) or self.fallback
            raise ConfigError(f"{source}: invalid {where} ({cls.__name__}): {e}") from e
        return obj

    def coerce(self, value: Any, tp: Any, key: Key, shown: Any = None) -> Any:
        """`value` as type `tp`; `shown` is the type to name in an error, if not `tp` itself."""
        shown = shown or tp
        if tp is Any:
            return value
        if get_origin(tp) is Annotated:
            value = self.coerce(value, get_args(tp)[0], key, shown)
            allowed = range_of(tp)
            if allowed is not None and value not in allowed:
                raise ConfigError(f"{self.source(key)}: key '{_dotted(key)}' must be {allowed}, got {value!r}")
            return value
        if dataclasses.is_dataclass(tp):
            return self.build(value, tp, key, shown)
        origin, args = get_origin(tp) or tp, get_args(tp)
        if origin is Literal:
            if any(value == a and type(value) is type(a) for a in args):
                return value
        elif origin in (Union, types.UnionType):
            arms = [a for a in args if a is not type(None)]
            if value is None and len(arms) < len(args):
                return None
            if len(arms) == 1:  # Optional[X]: let X's nested errors through, naming the full type here
                return self.coerce(value, arms[0], key, shown)
            for arm in arms:  # the first arm that accepts the value wins
                with contextlib.suppress(ConfigError):
                    return self.coerce(value, arm, key)
        elif origin in (list, tuple):
            fixed = origin is tuple and args and args[-1] is not Ellipsis
            if isinstance(value, (list, tuple)) and (not fixed or len(value) == len(args)):
                item_types = args if fixed else (args[0] if args else Any,) * len(value)
                return origin(self.coerce(v, t, (*key, i)) for i, (v, t) in enumerate(zip(value, item_types)))
        elif origin is dict:
            key_type, value_type = args or (Any, Any)
            if isinstance(value, Mapping):
                out = {}
                for k, v in value.items():
                    try:
                        k = self.coerce(k, key_type, key)
                    except ConfigError:
                        raise self.wrong_type(value, shown, key, blame=(*key, k)) from None
                    out[k] = self.coerce(v, value_type, (*key, k))
                return out
        elif tp is float:
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                try:  # strings too: PyYAML reads 3e-4 (no dot) as one
                    number = float(value)
                except ValueError:
                    raise self.wrong_type(value, shown, key) from None
                if not math.isfinite(number):
                    raise ConfigError(f"{self.source(key)}: key '{_dotted(key)}' must be a finite number, got {value!r}")
                return number
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif isinstance(tp, type):
            if isinstance(value, tp):
                return value
        else:
            raise TypeError(f"config key '{_dotted(key)}' has unsupported type {tp!r}")
        raise self.wrong_type(value, shown, key)


def _dotted(key: Key) -> str:
    """('optim', 'betas', 1) as 'optim.betas[1]'."""
    text = ""
    for part in key:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if dataclasses.is_dataclass(tp):
        return tp.__name__
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (Union, types.UnionType):
        return " | ".join(f"({n})" if n.startswith("one of") else n for n in map(_type_name, args))
    if origin is None:
        return getattr(tp, "__name__", repr(tp))
    names = ["..." if a is Ellipsis else _type_name(a) for a in args]
    return f"{origin.__name__}[{', '.join(names)}]" if names else origin.__name__


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
