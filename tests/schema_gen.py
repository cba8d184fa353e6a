"""Seeded JSON Schemas for the structured-output tests (issue 19): nested objects, arrays, enums,
anyOf, numbers with and without bounds, string patterns and formats, required and optional keys;
unbounded strings and numbers too, which a weak model never closes by itself."""

from __future__ import annotations

import random

# the formats jsonschema can check (date-time and time through rfc3339-validator)
FORMATS = ("date", "date-time", "time", "email", "uuid", "ipv4", "ipv6")
PATTERNS = ("^[A-Z]{3}-[0-9]{2,4}$", "^[a-z]+$", "^\\d{5}$", "^(yes|no)$", "^[a-f0-9]{8}$")
NAMES = ("name", "city", "age", "tags", "ok", "score", "when", "id", "items", "note", "kind")
KINDS = ("string", "integer", "number", "boolean", "null", "enum", "const", "pattern", "format",
         "array", "object", "anyOf")


def _value(rng: random.Random, depth: int) -> dict:
    kind = rng.choice(KINDS if depth < 3 else KINDS[:9])
    if kind == "string":
        s: dict = {"type": "string"}
        if rng.random() < 0.4:
            s["maxLength"] = rng.randint(1, 30)
        if rng.random() < 0.3:
            s["minLength"] = rng.randint(0, 3)
        return s
    if kind == "integer":
        s = {"type": "integer"}
        if rng.random() < 0.6:
            s["minimum"] = rng.randint(-100, 0)
        if rng.random() < 0.6:
            s["maximum"] = rng.randint(1, 10**6)
        return s
    if kind == "number":
        s = {"type": "number"}
        if rng.random() < 0.5:
            s["minimum"] = round(rng.uniform(-10, 0), 3)
        if rng.random() < 0.5:
            s["exclusiveMaximum"] = round(rng.uniform(1, 1000), 3)
        return s
    if kind in ("boolean", "null"):
        return {"type": kind}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, None, True, "x y"],
                                   rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice(["fixed", 7, False])}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(PATTERNS)}
    if kind == "format":
        return {"type": "string", "format": rng.choice(FORMATS)}
    if kind == "array":
        s = {"type": "array", "items": _value(rng, depth + 1)}
        if rng.random() < 0.5:
            s["maxItems"] = rng.randint(1, 5)
        if rng.random() < 0.3:
            s["minItems"] = min(rng.randint(0, 2), s.get("maxItems", 2))
        return s
    if kind == "object":
        return schema(rng, depth + 1)
    return {"anyOf": [_value(rng, depth + 1) for _ in range(rng.randint(2, 3))]}


def schema(rng: random.Random, depth: int = 0) -> dict:
    """An object schema; OpenAI's strict shape (every key required, no others) half the time."""
    names = rng.sample(NAMES, rng.randint(1, 4))
    props = {k: _value(rng, depth) for k in names}
    strict = rng.random() < 0.5
    out = {"type": "object", "properties": props,
           "required": names if strict else [k for k in names if rng.random() < 0.7]}
    if strict or rng.random() < 0.5:
        out["additionalProperties"] = False
    return out


def schemas(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [schema(rng) for _ in range(n)]


def validator(s: dict):
    import jsonschema

    return jsonschema.Draft202012Validator(
        s, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
