"""Validation of a model config as data: a JSON Schema, then the rules a schema cannot say.

``model_config.schema.json`` (package data, beside this module) is our JSON Schema (draft-07) of
WSInfer's model config spec 1.0 plus the ``"wsi_toolkit"`` object and the static ranges of
:mod:`wsi_toolkit.limits`. Each property's ``description`` is the text of the error message
("field 'spacing_um_px': must be <description>; got 30"). Integers are JSON integers: ``96.0``
is not one (as WSInfer's draft-04 schema reads it).

A config is checked in this order; the first problem is raised as :class:`ModelPackageError`
naming the field:

1. JSON values only (dicts with string keys, lists, strings, numbers, booleans, null);
2. the schema (types, required keys, enums, ranges);
3. finite numbers (NaN/Infinity are not JSON, but a Python caller can pass them);
4. the cross-field rules: one class name per output, a ``[s, s]`` Resize is square, exactly one
   ToTensor with every Normalize after it, ``tumor_class`` is one of ``class_names``.

Nothing here imports torch.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jsonschema

from wsi_toolkit.errors import ModelPackageError

__all__ = ["SCHEMA_FILE", "config_schema", "check_config", "check_step", "field_name"]

SCHEMA_FILE = "model_config.schema.json"
NAMESPACE = "wsi_toolkit"


@functools.cache
def config_schema() -> dict[str, Any]:
    """The JSON Schema of ``config.json`` (a fresh copy is not made: do not modify it)."""
    text = importlib.resources.files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def _is_integer(checker: Any, instance: Any) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


def _is_number(checker: Any, instance: Any) -> bool:
    return isinstance(instance, (int, float)) and not isinstance(instance, bool)


# Draft-07 with JSON's integers and real numbers only (draft-06+ would take 96.0 as an integer).
_Validator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    type_checker=jsonschema.Draft7Validator.TYPE_CHECKER.redefine_many(
        {"integer": _is_integer, "number": _is_number}),
)


@functools.cache
def _validator(definition: str | None) -> Any:
    schema = config_schema()
    if definition is not None:  # one definition, e.g. a transform item, with the others for its $refs
        schema = {"$ref": f"#/definitions/{definition}", "definitions": schema["definitions"]}
    return _Validator(schema)


def field_name(path: Sequence[str | int]) -> str | None:
    """``["transform", 0, "arguments", "size"]`` -> ``"transform[0].arguments.size"``."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------------------------
# 1 and 3: JSON values, finite numbers


def _json_values(value: Any, *, finite: bool) -> Iterator[ModelPackageError]:
    """Problems with ``value`` as JSON, in document order: non-JSON types and non-string keys; with
    ``finite``, NaN and infinities. Iterative: a deeply nested value is no recursion problem."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        v, path = stack.pop()
        if isinstance(v, Mapping):
            for k in v:
                if not isinstance(k, str):
                    yield ModelPackageError(f"keys must be strings (JSON); got {k!r}", field=field_name(path))
            stack.extend((v[k], [*path, k]) for k in reversed(list(v)) if isinstance(k, str))
        elif isinstance(v, (list, tuple)):
            stack.extend((v[i], [*path, i]) for i in reversed(range(len(v))))
        elif v is None or isinstance(v, (str, bool, int)):
            continue
        elif isinstance(v, float):
            if finite and not math.isfinite(v):
                yield ModelPackageError(f"must be a finite number (JSON has no NaN/Infinity); got {v!r}",
                                        field=field_name(path))
        else:
            yield ModelPackageError(
                f"must hold JSON values only (dict, list, str, int, float, bool, None); got {type(v).__name__} "
                f"{_got(v)}; convert it first (e.g. float(x) for numpy scalars)", field=field_name(path))


# --------------------------------------------------------------------------------------------
# 2: the schema, its errors as messages


def _resolve(node: Any, root: Mapping) -> Any:
    """``node`` with its local ``$ref`` (``"#/definitions/x"``) followed."""
    while isinstance(node, Mapping) and "$ref" in node:
        node = functools.reduce(lambda n, p: n[p], node["$ref"].removeprefix("#/").split("/"), root)
    return node


def _described(err: jsonschema.ValidationError, root: Mapping) -> tuple[Mapping, int]:
    """The deepest schema node with a ``description`` on ``err``'s schema path, and the depth of
    the instance it describes: errors are reported on the field a reader knows (an array of
    numbers, not its third number)."""
    node, depth = _resolve(root, root), 0
    best = (node, depth)
    keys = list(err.absolute_schema_path)
    i = 0
    while i < len(keys) - 1:
        k = keys[i]
        if k == "properties":
            node, depth, i = node["properties"][keys[i + 1]], depth + 1, i + 2
        elif k == "items":
            node, depth, i = node["items"], depth + 1, i + 1
        elif k in ("allOf", "anyOf", "oneOf"):
            node, i = node[k][keys[i + 1]], i + 2
        elif k in ("if", "then", "else"):
            node, i = node[k], i + 1
        else:
            break
        node = _resolve(node, root)
        if isinstance(node, Mapping) and "description" in node:
            best = (node, depth)
    return best


def _message(err: jsonschema.ValidationError, raw: Any, root: Mapping) -> ModelPackageError:
    path = list(err.absolute_path)
    if err.validator == "required":
        missing = next(k for k in err.validator_value if k not in err.instance)
        prop = _resolve(err.schema.get("properties", {}).get(missing, {}), root)
        if not path and err.schema is root:
            return ModelPackageError("is missing (required by WSInfer's config spec 1.0)", field=missing)
        want = f"; must be {prop['description']}" if "description" in prop else ""
        return ModelPackageError(f"is missing{want}", field=field_name([*path, missing]))
    if err.validator == "additionalProperties":
        allowed = list(err.schema.get("properties", {}))
        unknown = sorted((k for k in err.instance if k not in allowed), key=str)
        return ModelPackageError(f"unknown key(s) {unknown}; allowed: {', '.join(allowed)}", field=field_name(path))
    node, depth = _described(err, root)
    if "description" not in node:  # a schema node without one: jsonschema's own words
        return ModelPackageError(err.message, field=field_name(path))
    value = functools.reduce(lambda v, p: v[p], path[:depth], raw)
    return ModelPackageError(f"must be {node['description']}; got {_got(value)}", field=field_name(path[:depth]))


def _schema_problem(raw: Any, definition: str | None) -> ModelPackageError | None:
    validator = _validator(definition)
    err = next(validator.iter_errors(raw), None)
    return None if err is None else _message(err, raw, validator.schema)


# --------------------------------------------------------------------------------------------
# 4: cross-field rules


def _step_problem(step: Mapping, prefix: list[str | int]) -> ModelPackageError | None:
    size = (step.get("arguments") or {}).get("size") if step["name"] == "Resize" else None
    if isinstance(size, list) and size[0] != size[1]:
        return ModelPackageError(f"must be an int in [8, 4096] px or a square [s, s] (patches are square); got {size}",
                                 field=field_name([*prefix, "arguments", "size"]))
    return None


def _config_problem(raw: Mapping) -> ModelPackageError | None:
    names, n = raw["class_names"], raw["num_classes"]
    if len(names) != n:
        return ModelPackageError(f"has {len(names)} name(s) {names} but num_classes is {n}; give one name per model "
                                 "output", field="class_names")
    steps = raw["transform"]
    for i, step in enumerate(steps):
        problem = _step_problem(step, ["transform", i])
        if problem is not None:
            return problem
    kinds = [s["name"] for s in steps]
    if kinds.count("ToTensor") != 1:
        return ModelPackageError(f"needs exactly one ToTensor step (uint8 image -> float tensor); got steps {kinds}",
                                 field="transform")
    for i, k in enumerate(kinds):
        if k == "Normalize" and i < kinds.index("ToTensor"):
            return ModelPackageError("Normalize must come after ToTensor (it works on float tensors)",
                                     field=f"transform[{i}]")
    ours = raw.get(NAMESPACE) or {}
    for key in ("tumor_class", "tumour_class"):
        if key in ours and ours[key] not in names:
            return ModelPackageError(f"{ours[key]!r} is not one of class_names {names}", field=f"{NAMESPACE}.{key}")
    return None


def _first(*checks) -> None:
    for check in checks:
        problem = check()
        if problem is not None:
            raise problem


def check_config(raw: Any) -> None:
    """Raise :class:`ModelPackageError` (naming the field) for the first problem of ``raw``, a
    config as plain JSON values (``dict``/``list``; what ``json.loads`` gives)."""
    try:
        _first(lambda: next(_json_values(raw, finite=False), None),
               lambda: _schema_problem(raw, None),
               lambda: next(_json_values(raw, finite=True), None),
               lambda: _config_problem(raw))
    except RecursionError:
        raise ModelPackageError("nested too deeply to be a model config") from None


def check_step(raw: Any) -> None:
    """:func:`check_config` for one ``transform`` item (fields named from the item:
    ``"arguments.size"``)."""
    _first(lambda: next(_json_values(raw, finite=False), None),
           lambda: _schema_problem(raw, "transform_step"),
           lambda: next(_json_values(raw, finite=True), None),
           lambda: _step_problem(raw, []))
