"""Model metadata checked against ``resources/ModelSpec.schema.json``.

``jsonschema`` does the check where it is installed; Slicer's Python may
lack it, so a built-in checker covering the keywords the schema uses
(type, enum, oneOf, $ref, required, properties, additionalProperties,
propertyNames, items, min/maxItems, minimum/maximum and their exclusive
forms, minLength, pattern) gives the same verdict there. Either way a bad
field becomes one sentence naming the file and the field.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Tuple

from .errors import PTQError

SCHEMA_PATH = Path(__file__).resolve().parent / "resources" / "ModelSpec.schema.json"
DOCS = "docs/model-metadata.md"

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool,
          "integer": int, "number": (int, float), "null": type(None)}


@lru_cache(maxsize=1)
def spec_schema() -> dict:
    """The ModelSpec JSON Schema shipped inside the package."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def check_spec_data(data: Any, where: str, use_jsonschema: Optional[bool] = None) -> None:
    """Raise PTQError when ``data`` (parsed metadata JSON) breaks the schema.

    ``where`` names the file in the message. ``use_jsonschema`` forces one
    checker (tests compare both); None uses jsonschema when importable.
    """
    if use_jsonschema is None:
        try:
            import jsonschema  # noqa: F401
            use_jsonschema = True
        except ImportError:
            use_jsonschema = False
    problem = _jsonschema_problem(data) if use_jsonschema else first_problem(data, spec_schema())
    if problem is not None:
        field, text = problem
        raise PTQError(f"Model metadata {where}: field '{field}' {text}; fix it as {DOCS} describes.")


def _jsonschema_problem(data: Any) -> Optional[Tuple[str, str]]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(spec_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is None:
        return None
    if "propertyNames" in error.absolute_schema_path:
        # jsonschema reports a bad key at its object; name the key itself, as the built-in checker does.
        return _path_text(list(error.absolute_path) + [error.instance]), f"is not an allowed key ({error.message})"
    if error.validator == "additionalProperties" and error.validator_value is False:
        known = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(known))[0]
        return _path_text(list(error.absolute_path) + [extra]), f"is not a known field; known fields are {known}"
    return _path_text(error.absolute_path), _jsonschema_text(error)


def _jsonschema_text(error) -> str:
    """jsonschema's message reworded to read like the built-in checker's."""
    if error.validator == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return f"must be {_article(expected)}, got {_shown(error.instance)}"
    if error.validator == "enum":
        return f"is {_shown(error.instance)}, not one of {error.validator_value}"
    return f"is wrong: {error.message}"


def _path_text(parts) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _article(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _shown(value: Any) -> str:
    return json.dumps(value)[:60]


def resolve_ref(ref: str, root: dict) -> dict:
    """The part of ``root`` a local ``"$ref"`` such as ``"#/definitions/label"`` points to."""
    target = root
    for part in ref.lstrip("#/").split("/"):
        target = target[part]
    return target


def first_problem(value: Any, schema: dict, path: Tuple = (), root: Optional[dict] = None
                  ) -> Optional[Tuple[str, str]]:
    """``(field, problem)`` for the first place ``value`` breaks ``schema``, else None."""
    root = schema if root is None else root
    if "$ref" in schema:
        return first_problem(value, resolve_ref(schema["$ref"], root), path, root)
    where = _path_text(path)
    expected = schema.get("type")
    if expected is not None:
        kinds = expected if isinstance(expected, list) else [expected]
        if not any(_is_type(value, kind) for kind in kinds):
            return where, f"must be {_article(' or '.join(kinds))}, got {_shown(value)}"
    if "enum" in schema and value not in schema["enum"]:
        return where, f"is {_shown(value)}, not one of {schema['enum']}"
    if "oneOf" in schema:
        problems = [first_problem(value, option, path, root) for option in schema["oneOf"]]
        if sum(problem is None for problem in problems) != 1:
            return next((problem for problem in problems if problem is not None),
                        (where, "matches more than one allowed form"))
    if isinstance(value, dict):
        return _object_problem(value, schema, path, root)
    if isinstance(value, list):
        return _array_problem(value, schema, path, root)
    if _is_type(value, "number"):
        return _number_problem(value, schema, where)
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            return where, "must not be empty"
        if "pattern" in schema and not re.search(schema["pattern"], value):
            return where, f"is {_shown(value)}, which does not match {schema['pattern']}"
    return None


def _object_problem(value: dict, schema: dict, path: Tuple, root: dict) -> Optional[Tuple[str, str]]:
    missing = [key for key in schema.get("required", []) if key not in value]
    if missing:
        return _path_text(path + (missing[0],)), "is missing"
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if "propertyNames" in schema:
            problem = first_problem(key, schema["propertyNames"], path + (key,), root)
            if problem is not None:
                return _path_text(path + (key,)), f"is not an allowed key ({problem[1]})"
        if key in properties:
            problem = first_problem(item, properties[key], path + (key,), root)
        elif extra is False:
            return _path_text(path + (key,)), f"is not a known field; known fields are {sorted(properties)}"
        elif isinstance(extra, dict):
            problem = first_problem(item, extra, path + (key,), root)
        else:
            problem = None
        if problem is not None:
            return problem
    return None


def _array_problem(value: list, schema: dict, path: Tuple, root: dict) -> Optional[Tuple[str, str]]:
    low, high = schema.get("minItems", 0), schema.get("maxItems")
    if len(value) < low or (high is not None and len(value) > high):
        count = f"{low}" if low == high else f"{low} to {high if high is not None else 'any number of'}"
        return _path_text(path), f"has {len(value)} items, expected {count}"
    if "items" in schema:
        for index, item in enumerate(value):
            problem = first_problem(item, schema["items"], path + (index,), root)
            if problem is not None:
                return problem
    return None


def _number_problem(value, schema: dict, where: str) -> Optional[Tuple[str, str]]:
    if "minimum" in schema and value < schema["minimum"]:
        return where, f"is {value}, below the minimum {schema['minimum']}"
    if "maximum" in schema and value > schema["maximum"]:
        return where, f"is {value}, above the maximum {schema['maximum']}"
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        return where, f"is {value}, must be above {schema['exclusiveMinimum']}"
    if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
        return where, f"is {value}, must be below {schema['exclusiveMaximum']}"
    return None


def _is_type(value, expected: str) -> bool:
    if isinstance(value, bool) and expected in ("integer", "number"):
        return False
    if expected == "integer" and isinstance(value, float):
        return value.is_integer()  # JSON Schema counts 96.0 as an integer
    return isinstance(value, _TYPES[expected])
