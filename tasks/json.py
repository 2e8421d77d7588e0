"""
The json domain: the whole answer parses and validates against the example's JSON Schema made strict.

    {"domain": "json", "messages": [...], "schema": {...JSON Schema...}}
"""

import json

from .core import ExampleError, json_field

def strict_schema(schema):
    """A copy where every object with properties requires all of them and allows no others (NeMo-Gym's rule)."""
    if isinstance(schema, dict):
        schema = {k: strict_schema(v) for k, v in schema.items()}
        if isinstance(schema.get("properties"), dict):
            schema["required"] = list(schema["properties"])
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict_schema(v) for v in schema]
    return schema


def json_reward(schema: dict, answer: str) -> float:
    """1.0 if json.loads(answer) (the whole answer, no code fence) validates against strict_schema(schema)."""
    import jsonschema
    try:
        value = json.loads(answer)
    except (json.JSONDecodeError, RecursionError):
        return 0.0
    schema = strict_schema(schema)
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)(schema)
    try:
        return float(validator.is_valid(value))
    except (jsonschema.exceptions.SchemaError, RecursionError):
        return 0.0


def check(example: dict, where: str):
    schema = json_field(example.get("schema"), where, "schema")
    if not isinstance(schema, dict):
        raise ExampleError(where, "schema", f"expected a JSON Schema object, got {type(schema).__name__}")
    import jsonschema
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ExampleError(where, "schema", f"not a valid JSON Schema ({e.message})") from None
    example["schema"] = schema


def reward(example: dict, answer: str, **_) -> float:
    return json_reward(example["schema"], answer)
