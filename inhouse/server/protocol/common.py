"""Pieces both APIs share: function tool definitions with validated JSON schemas."""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, field_validator

FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_parameters_schema(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return value
    try:
        Draft202012Validator.check_schema(value)
    except SchemaError as e:
        raise ValueError(f"'parameters' is not a valid JSON schema: {e.message}") from None
    if value.get("type", "object") != "object":
        raise ValueError("'parameters' must describe a JSON object (type: object)")
    return value


class FunctionDefinition(Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    _check = field_validator("parameters")(classmethod(lambda cls, v: check_parameters_schema(v)))
