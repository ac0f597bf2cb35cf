"""Load and validate a config against workflow/schemas/config.schema.yaml.

Errors name the key (`steps.image_pyramid.num_mip`) and, for typos, the key
that was probably meant. Defaults from the schema are filled in so the rest of
magma never has to guess.
"""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path

import jsonschema
import yaml

from .errors import MagmaError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
OP_SCHEMAS = SCHEMA_PATH.parent / "ops"  # one file per op: ops/<op>.yaml

# ops of the SPEC that later releases add; named so the error says "not yet", not "unknown"
PLANNED_OPS = {
    "skeleton", "ccl", "voxel_counts", "contrast", "quantize", "reorder", "roi", "remap",
}


# keys that name files rather than layers
FILE_KEYS = {"create": ("src",), "skeleton_export": ("dest",)}


# libyaml's parser when PyYAML has it: the schemas are read on every Snakemake start (0.14 s in
# pure Python, 0.02 s with libyaml)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_schema() -> dict:
    """The top-level schema with every op's schema (schemas/ops/<op>.yaml) under `$defs`."""
    with open(SCHEMA_PATH) as f:
        schema = yaml.load(f, Loader=_LOADER)
    for path in sorted(OP_SCHEMAS.glob("*.yaml")):
        with open(path) as f:
            schema["$defs"][path.stem] = yaml.load(f, Loader=_LOADER)
    return schema


def implemented_ops(schema: dict) -> list:
    return sorted(k for k, v in schema["$defs"].items() if isinstance(v, dict) and "op" in v.get("properties", {}))


def _where(prefix: str, path) -> str:
    parts = [prefix] + [str(p) for p in path]
    return ".".join(p for p in parts if p)


def _message(err: jsonschema.ValidationError, prefix: str) -> str:
    where = _where(prefix, err.absolute_path)
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        hints = []
        for key in extra:
            close = difflib.get_close_matches(key, allowed, n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        return f"{where}: unknown key {', '.join(hints)}; allowed: {', '.join(allowed)}"
    if err.validator == "required":
        return f"{where}: {err.message}" if where else err.message
    if err.validator == "propertyNames" or "propertyNames" in err.schema_path:
        return f"{where}: name {err.instance!r} must start with a letter and use only letters, digits, _ and -"
    return f"{where or 'config'}: {err.message}"


def _raise_first(validator, instance, prefix: str) -> None:
    errors = sorted(validator.iter_errors(instance), key=lambda e: (len(list(e.absolute_path)), str(e.absolute_path)))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        raise MagmaError("config: " + _message(best, prefix))


def _fill_defaults(schema: dict, instance: dict, root: dict) -> None:
    for key, sub in schema.get("properties", {}).items():
        if "$ref" in sub and "default" not in sub:
            sub = _resolve(sub["$ref"], root)
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if isinstance(instance.get(key), dict) and sub.get("type") == "object":
            _fill_defaults(sub, instance[key], root)


def _resolve(ref: str, root: dict) -> dict:
    node = root
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    return node


SAFE_PATH = re.compile(r"[A-Za-z0-9_./-]+")


def check_run_dir(run_dir) -> None:
    """Markers and logs stay where the user said: inside the working directory for a
    relative path (no `..`), or exactly the absolute path given. Plain characters only,
    so the path means the same to Snakemake, to a shell and to every executor."""
    if run_dir is None:
        return
    where = "config: execution.run_dir"
    if not SAFE_PATH.fullmatch(run_dir):
        raise MagmaError(f"{where}: {run_dir!r} may use only letters, digits, '_', '-', '.' and '/'")
    if ".." in run_dir.split("/"):
        raise MagmaError(
            f"{where}: {run_dir!r} climbs out with '..'; markers and logs go inside the working directory"
            " (a relative path) or to an absolute path you name"
        )
    if run_dir.strip("/.") == "":
        raise MagmaError(f"{where}: {run_dir!r} names no directory; use e.g. results/my-dataset")


def validate(config: dict) -> dict:
    """A validated copy of `config` with every default filled in."""
    schema = load_schema()
    if not config:
        raise MagmaError("config: the config is empty; it needs `layers` and `steps` (see config/README.md)")
    if not isinstance(config, dict):
        raise MagmaError(f"config: expected a mapping with `layers` and `steps`, got {type(config).__name__}")
    cfg = copy.deepcopy(config)
    cls = jsonschema.Draft202012Validator
    top = {k: v for k, v in schema.items() if k != "$defs"} | {"$defs": schema["$defs"]}
    _raise_first(cls(top), cfg, "")
    _fill_defaults(top, cfg, schema)

    ops = implemented_ops(schema)
    for name, step in cfg["steps"].items():
        op = step["op"]
        if op not in ops:
            if op in PLANNED_OPS:
                raise MagmaError(f"config: steps.{name}.op: '{op}' is not available in this version of magma yet")
            close = difflib.get_close_matches(op, ops, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise MagmaError(f"config: steps.{name}.op: unknown op '{op}'{hint}; available: {', '.join(ops)}")
        sub = dict(schema["$defs"][op]) | {"$defs": schema["$defs"]}
        _raise_first(cls(sub), step, f"steps.{name}")
        _fill_defaults(sub, step, schema)
        for other in step.get("after", []):
            if other not in cfg["steps"]:
                raise MagmaError(f"config: steps.{name}.after: no step named '{other}'")
            if other == name:
                raise MagmaError(f"config: steps.{name}.after: a step cannot wait for itself")
        for key in ("layer", "src", "dest"):
            if key in FILE_KEYS.get(op, ()):
                continue  # files, not a layer
            if key in step and step[key] not in cfg["layers"]:
                raise MagmaError(
                    f"config: steps.{name}.{key}: no layer named '{step[key]}'; layers: {', '.join(cfg['layers'])}"
                )
    check_run_dir(cfg["execution"]["run_dir"])
    for name in cfg["execution"]["steps"]:
        if name not in cfg["steps"]:
            raise MagmaError(f"config: execution.steps.{name}: no step named '{name}'")
    if "demo" in cfg:
        for key in ("image", "segmentation"):
            if cfg["demo"][key] not in cfg["layers"]:
                raise MagmaError(f"config: demo.{key}: no layer named '{cfg['demo'][key]}'")
        if cfg["demo"]["image"] == cfg["demo"]["segmentation"]:
            raise MagmaError("config: demo: image and segmentation must be different layers")
    return cfg


def load(path: str | Path) -> dict:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise MagmaError(f"config: cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise MagmaError(f"config: {path} is not valid YAML: {exc}") from exc
    return validate(raw)
