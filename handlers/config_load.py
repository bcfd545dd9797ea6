"""Where an IrisConfig comes from: one loader, its sources named, lowest precedence first.

1. the fields' defaults (handlers/config.py);
2. a YAML file: the one named by IRIS_CONFIG, else infra/local.yaml (none for a Serve
   config's inline `args`, which are the whole config);
3. IRIS_* environment variables: IRIS_<FIELD>__<FIELD>..., e.g. IRIS_FETCH__MAX_IMAGE_BYTES;
4. explicit values: a Serve config's inline `args`, or keyword overrides in code.

Mappings merge key by key across sources; anything else is replaced by the higher source.
Field names in variable names are case-insensitive; keys inside free-form maps (engine.env,
engine.extra_args, resources, autoscaling_config) are kept exactly as written. A value is
read as JSON (numbers, true/false, lists, objects) unless its field is a string. An IRIS_*
variable that names no field stops the load, naming the closest one.
"""

from __future__ import annotations

import difflib
import json
import os
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from handlers.config import REPO_ROOT, IrisConfig
from handlers.cpu_affinity import REPLICA_CORES_ENV

PREFIX = "IRIS_"
SEP = "__"
CONFIG_FILE_VAR = "IRIS_CONFIG"  # names the YAML file; not a field
# Also not a field: set by init_ray in Ray's processes, where an app built inside Ray
# (Serve's import_path, deployments.app) reads its config.
NOT_FIELDS = frozenset({CONFIG_FILE_VAR, REPLICA_CORES_ENV})
DEFAULT_CONFIG_PATH = REPO_ROOT / "infra" / "local.yaml"


class ConfigError(ValueError):
    """The configuration cannot be loaded; the message says what to change."""


def load_config(
    *,
    use_yaml: bool = True,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> IrisConfig:
    """The config from every source (module docstring). use_yaml=False: no file, as for a
    Serve config's inline args."""
    env = os.environ if environ is None else environ
    layers: list[dict[str, Any]] = []
    if use_yaml:
        path = yaml_path(env)
        if path is not None:
            layers.append(read_yaml(path))
    layers.append(env_layer(env))
    layers.append(overrides)
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = deep_merge(merged, layer)
    try:
        return IrisConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from exc


def yaml_path(environ: Mapping[str, str]) -> Path | None:
    name = environ.get(CONFIG_FILE_VAR)
    if name:
        path = Path(name)
        if not path.exists():
            raise ConfigError(f"{CONFIG_FILE_VAR} names a file that does not exist: {name}")
        return path
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def read_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def deep_merge(low: Mapping[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(low)
    for key, value in high.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def env_layer(environ: Mapping[str, str]) -> dict[str, Any]:
    """IRIS_* variables as a nested mapping, checked against the fields."""
    layer: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(PREFIX) or name in NOT_FIELDS:
            continue
        path, annotation = _resolve(name)
        value = raw if _as_written(annotation) else _json_or_str(raw)
        node = layer
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return layer


def _resolve(name: str) -> tuple[list[str], Any]:
    """The config path a variable names, and the annotation of what it sets."""
    segments = name[len(PREFIX):].split(SEP)
    model: type[BaseModel] | None = IrisConfig
    annotation: Any = IrisConfig
    path: list[str] = []
    for segment in segments:
        if model is None:
            # Inside a free-form map: the key as written, its values as the map's.
            if not _is_mapping(annotation) or not segment:
                raise ConfigError(_unknown(name))
            path.append(segment)
            annotation = _map_value(annotation)
            continue
        field = segment.lower()
        if field not in model.model_fields:
            raise ConfigError(_unknown(name))
        path.append(field)
        annotation = model.model_fields[field].annotation
        model = _model_of(annotation)
    return path, annotation


def _unknown(name: str) -> str:
    close = difflib.get_close_matches(name, list(known_variables()), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    return (f"{name} is not an Iris setting{hint} (IRIS_* variables name config fields, "
            f"with __ between levels; unknown names are refused so a typo cannot go unnoticed)")


def known_variables(model: type[BaseModel] = IrisConfig, prefix: str = PREFIX) -> Iterator[str]:
    for field, info in model.model_fields.items():
        name = prefix + field.upper()
        yield name
        sub = _model_of(info.annotation)
        if sub is not None:
            yield from known_variables(sub, name + SEP)


def _members(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(a for a in get_args(annotation) if a is not type(None))
    return (annotation,)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member
    return None


def _is_mapping(annotation: Any) -> bool:
    return any(get_origin(m) is dict for m in _members(annotation))


def _map_value(annotation: Any) -> Any:
    for member in _members(annotation):
        if get_origin(member) is dict:
            return get_args(member)[1]
    return Any


def _as_written(annotation: Any) -> bool:
    """Strings (and secrets, whose validator reads lists itself) are taken as written."""
    members = _members(annotation)
    return bool(members) and all(
        m in (str, SecretStr) or (get_origin(m) is list and get_args(m) == (SecretStr,))
        for m in members
    )


def _json_or_str(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "config"
        lines.append(f"{where}: {err.get('msg')}")
    return "invalid configuration: " + "; ".join(lines)
