"""
The tool domain (tool calling): the calls in the answer against the acceptable sets of calls, in the style of
BFCL's AST checker. Nothing the response writes is ever executed.

    {"domain": "tool", "messages": [...], "tools": [{"type": "function", "function": {...}}, ...],
     "tool_calls": [[{"name": "convert", "arguments": {"value": 5, "unit": "km"}}], ...]}

`tools` are OpenAI-style function specs (as the chat template renders them); `tool_calls` is a list of acceptable
answers, each a list of calls (parallel calls: their order does not matter); an empty list as an answer means
"no call: reply in prose". The fields describe the example's last assistant turn: for RL and evaluation the turn
the model writes; in SFT data that ends in a tool result and a final answer, that final answer (usually prose).

The answer's calls are parsed with tokenizer.parse_response, typed by the tools' schemas, and the answer scores 1
only if they equal one acceptable set: the same functions, every required argument present, no argument the
function does not have, values equal after type coercion (numbers by value, strings exactly or after BFCL's
normalisation, lists in order, objects key by key), an optional argument left out or given its default alike.
A call to a function not in `tools`, call markup that does not parse, prose where a call is expected, or a call
where prose is expected: 0.
"""

import re

from .core import ExampleError, json_field

_CALL_MARKUP = ("<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=", "</parameter>")


def _function(tool: dict) -> dict:
    return tool.get("function", tool)  # {"type": "function", "function": {...}} or the bare function


def _schemas(tools) -> dict:
    """function name -> its parameters schema ({"properties": {...}, "required": [...]})."""
    return {_function(t)["name"]: _function(t).get("parameters") or {} for t in tools}


def check(example: dict, where: str):
    tools = example.get("tools")
    if not isinstance(tools, list) or not tools:
        raise ExampleError(where, "tools", "missing or empty: expected a list of function specs")
    for i, tool in enumerate(tools):
        fn = _function(tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ExampleError(where, f"tools[{i}]", f"expected a function spec with a name, got {tool!r:.80}")
        if not isinstance(fn.get("parameters") or {}, dict):
            raise ExampleError(where, f"tools[{i}].parameters", "expected a JSON Schema object")
    schemas = _schemas(tools)
    answers = example.get("tool_calls")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, list) for a in answers):
        raise ExampleError(where, "tool_calls", f"expected a non-empty list of answers (lists of calls), "
                           f"got {answers!r:.80}")
    cleaned = []
    for i, answer in enumerate(answers):
        calls = []
        for j, call in enumerate(answer):
            at = f"tool_calls[{i}][{j}]"
            call = _function(call) if isinstance(call, dict) else call
            if not isinstance(call, dict) or call.get("name") not in schemas:
                raise ExampleError(where, at, f"expected a call {{name, arguments}} of one of the tools "
                                   f"{sorted(schemas)}, got {call!r:.80}")
            arguments = json_field(call.get("arguments") or {}, where, f"{at}.arguments")  # OpenAI: a JSON string
            if not isinstance(arguments, dict):
                raise ExampleError(where, f"{at}.arguments", f"expected an object, got {arguments!r:.80}")
            known = schemas[call["name"]].get("properties") or {}
            unknown = [k for k in arguments if k not in known]
            if unknown:
                raise ExampleError(where, f"{at}.arguments", f"{unknown} are not parameters of {call['name']}")
            calls.append({"name": call["name"], "arguments": arguments})
        cleaned.append(calls)
    example["tool_calls"] = cleaned


def reward(example: dict, answer: str, **_) -> float:
    return tool_reward(example["tools"], example["tool_calls"], answer)


def tool_reward(tools, acceptable, answer: str) -> float:
    """1.0 if the calls in `answer` (the text after </think>) equal one of the `acceptable` lists of calls."""
    from tokenizer import parse_response
    parsed = parse_response(answer, thinking=False, tools=tools)
    if any(tag in parsed["answer"] for tag in _CALL_MARKUP):
        return 0.0  # call markup that did not parse as a call: malformed
    calls = parsed["tool_calls"]
    schemas = _schemas(tools)
    if any(call["name"] not in schemas for call in calls):
        return 0.0
    if not calls:
        return float([] in acceptable and bool(parsed["answer"]))
    return float(any(_same_calls(calls, expected, schemas) for expected in acceptable))


def _same_calls(calls, expected, schemas) -> bool:
    """A one-to-one matching of calls with expected calls (any order), by backtracking: lists are short."""
    if len(calls) != len(expected):
        return False
    if not calls:
        return True
    first, rest = calls[0], calls[1:]
    return any(_same_call(first, e, schemas[e["name"]]) and _same_calls(rest, expected[:i] + expected[i + 1:], schemas)
               for i, e in enumerate(expected))


def _same_call(call, expected, schema) -> bool:
    if call["name"] != expected["name"]:
        return False
    properties, required = schema.get("properties") or {}, schema.get("required") or []
    got, want = call["arguments"], expected["arguments"]
    if any(key not in properties for key in got) or any(key not in got for key in required):
        return False
    for key, fields in properties.items():
        default = fields.get("default") if isinstance(fields, dict) else None
        if key in got and key in want:
            if not _same_value(got[key], want[key], fields):
                return False
        elif key in got or key in want:  # given on one side only: fine only if it is the default value
            value = got[key] if key in got else want[key]
            if default is None or not _same_value(value, default, fields):
                return False
    return True


def _normalise_string(s: str) -> str:
    """BFCL's string normalisation: no spaces, commas, periods, slashes, hyphens, underscores, asterisks or
    carets; lower case; single quotes as double."""
    return re.sub(r"[ ,./\-_*^]", "", s).lower().replace("'", '"')


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _same_value(got, want, schema) -> bool:
    """got (parsed from the response, typed by the schema) equals want (the reference) as the schema's type."""
    schema = schema if isinstance(schema, dict) else {}
    if _is_number(want):
        return _is_number(got) and float(got) == float(want)
    if isinstance(want, str):
        return isinstance(got, str) and (got == want or _normalise_string(got) == _normalise_string(want))
    if isinstance(want, bool) or want is None:
        return got is want
    if isinstance(want, list):
        items = schema.get("items")
        return isinstance(got, list) and len(got) == len(want) and all(
            _same_value(g, w, items) for g, w in zip(got, want))
    if isinstance(want, dict):
        properties = schema.get("properties") or {}
        return isinstance(got, dict) and set(got) == set(want) and all(
            _same_value(got[k], want[k], properties.get(k)) for k in want)
    return got == want
