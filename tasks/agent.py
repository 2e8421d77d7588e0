"""
The agent domain: a tiny warehouse, operated through tools that are really executed, over several turns.

    {"domain": "agent",
     "messages": [{"role": "user", "content": "Ana asks: what does the item in bin 3 cost?"}],
     "tools": [TOOLS["bin_item"], TOOLS["price"]],          # the offered tools: OpenAI function specs
     "state": {"bins": {"3": "pear", "5": "fig", ...},      # bin number (1-9, as a string) -> the item in it
               "prices": {"pear": 4, "fig": 2, ...}},       # item -> its price (every item in a bin has one)
     "goal": {"answer": "4"}}                               # and/or {"bins": {...the whole bins after the task}}
     (optional "max_turns": assistant turns per episode, default 4)

The state is hidden: the prompt only asks, and the answer needs two or more dependent calls (the second call's
argument is the first call's result: bin_item(bin=3) -> "pear", then price(item="pear") -> 4). The tools:

    bin_item(bin: integer)             the item in a bin, or "empty"
    find_bin(item: string)             the bin that holds an item
    price(item: string)                an item's price
    sell(item: string)                 sell an item: it leaves its bin (changes the state)
    move(item: string, bin: integer)   move an item to an empty bin (changes the state)
    calculate(expression: string)      + - * / ( ) on small integers

Items may have any names; the shipped rows name them by two-digit codes ("47"), so that what the second call
copies out of the first call's result is a number (data/generate.py says why).

Each assistant turn is parsed with tokenizer.parse_response(response, thinking=True, tools=example["tools"]),
which types the arguments by the offered tools' schemas. A turn with calls gets one "tool" observation per call,
in order (parallel calls are all executed); a call to a tool that is not offered, a missing, extra or mistyped
argument, or call markup that does not parse gets an observation starting "error:" and the episode goes on. A
turn without calls is the final answer and ends the episode: reward 1 if the goal holds, else 0. The goal's
"answer": the last \\boxed{} of the final answer equals it (numbers by value, names case-insensitively); its
"bins": the warehouse ended in exactly that state. Only the executed state and the answer are graded, never the
text of the calls.
"""

import ast
import copy
import re

from .core import ExampleError
from .env import Environment, check_max_turns
from .math import last_boxed

BINS = range(1, 10)


def _fn(name, properties, required):
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


# The tools an example may offer, as their specs. No descriptions: every offered spec is in the prompt, after the
# template's tool-use reminder of about 200 tokens, and the tiny model's conversations must fit 512 tokens (the
# names say what the tools do). An example's "tools" holds some of these (descriptions may be added).
TOOLS = {
    "bin_item": _fn("bin_item", {"bin": {"type": "integer"}}, ["bin"]),
    "find_bin": _fn("find_bin", {"item": {"type": "string"}}, ["item"]),
    "price": _fn("price", {"item": {"type": "string"}}, ["item"]),
    "sell": _fn("sell", {"item": {"type": "string"}}, ["item"]),
    "move": _fn("move", {"item": {"type": "string"}, "bin": {"type": "integer"}}, ["item", "bin"]),
    "calculate": _fn("calculate", {"expression": {"type": "string"}}, ["expression"]),
}
_CALL_MARKUP = ("<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=", "</parameter>")
_TYPES = {"integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "string": lambda v: isinstance(v, str)}


def _name(tool: dict) -> str:
    return tool.get("function", tool).get("name")


def _parameters(tool: dict) -> dict:
    return tool.get("function", tool).get("parameters") or {}


# -----------------------------------------------------------------------------
# Validation (load_examples calls check for every row of the domain)

def check(example: dict, where: str):
    tools = example.get("tools")
    if not isinstance(tools, list) or not tools:
        raise ExampleError(where, "tools", "missing or empty: expected a list of function specs")
    for i, tool in enumerate(tools):
        name = _name(tool) if isinstance(tool, dict) and isinstance(tool.get("function", tool), dict) else None
        if name not in TOOLS:
            raise ExampleError(where, f"tools[{i}]", f"expected one of the warehouse's tools {sorted(TOOLS)}, "
                               f"got {tool!r:.80}")
        want, got = _parameters(TOOLS[name]), _parameters(tool)
        if not isinstance(got, dict) or _signature(got) != _signature(want):
            raise ExampleError(where, f"tools[{i}].parameters", f"{name} takes {_signature(want)}, "
                               f"the spec says {_signature(got) if isinstance(got, dict) else got!r:.80}")
    state = example.get("state")
    if not isinstance(state, dict) or set(state) != {"bins", "prices"}:
        raise ExampleError(where, "state", f"expected {{\"bins\": {{...}}, \"prices\": {{...}}}}, got {state!r:.80}")
    _check_bins(state["bins"], where, "state.bins")
    prices = state["prices"]
    if not isinstance(prices, dict) or not all(isinstance(k, str) and _TYPES["number"](v) for k, v in prices.items()):
        raise ExampleError(where, "state.prices", f"expected {{item: number}}, got {prices!r:.80}")
    missing = sorted(set(state["bins"].values()) - set(prices))
    if missing:
        raise ExampleError(where, "state.prices", f"no price for {missing}")
    goal = example.get("goal")
    if not isinstance(goal, dict) or not goal or set(goal) - {"answer", "bins"}:
        raise ExampleError(where, "goal", f"expected {{\"answer\": str}} and/or {{\"bins\": {{...}}}}, "
                           f"got {goal!r:.80}")
    if "answer" in goal and (not isinstance(goal["answer"], str) or not goal["answer"].strip()):
        raise ExampleError(where, "goal.answer", f"expected a non-empty string, got {goal['answer']!r:.80}")
    if "bins" in goal:
        _check_bins(goal["bins"], where, "goal.bins")
        if set(goal["bins"].values()) - set(state["bins"].values()):
            raise ExampleError(where, "goal.bins", "no tool adds items: the goal may only hold the state's items")
    check_max_turns(example, where)


def _signature(parameters: dict) -> dict:
    properties = parameters.get("properties") or {}
    return {"args": {k: (v.get("type") if isinstance(v, dict) else None) for k, v in sorted(properties.items())},
            "required": sorted(parameters.get("required") or [])}


def _check_bins(bins, where, field):
    if not isinstance(bins, dict) or not all(isinstance(k, str) and k.isdigit() and int(k) in BINS
                                             and isinstance(v, str) and v for k, v in bins.items()):
        raise ExampleError(where, field, f"expected {{\"1\".. \"9\": item name}}, got {bins!r:.80}")
    if len(set(bins.values())) != len(bins):
        raise ExampleError(where, field, "an item is in two bins")


def reward(example: dict, answer: str, **_) -> float:
    raise ValueError("the agent domain is graded by its environment (tasks.make_env(example): reset, then step each "
                     "assistant turn): a single answer cannot be graded")


# -----------------------------------------------------------------------------
# The environment

class AgentEnvironment(Environment):
    """The warehouse of one episode: example["state"] copied at reset, changed by move()."""

    max_turns = 4

    def _reset(self):
        self.bins = {int(k): v for k, v in copy.deepcopy(self.example["state"]["bins"]).items()}
        self.prices = dict(self.example["state"]["prices"])
        self.offered = {_name(t): _parameters(t) for t in self.example["tools"]}

    def _step(self, response: str):
        from tokenizer import parse_response
        parsed = parse_response(response, thinking=True, tools=self.example["tools"])
        if not parsed["thinking_closed"]:
            return [], True, 0.0
        if any(tag in parsed["answer"] for tag in _CALL_MARKUP):  # markup that did not parse as a call
            return ["error: malformed tool call (write <tool_call>, <function=NAME>, <parameter=ARG>)"], False, 0.0
        if parsed["tool_calls"]:
            return [self.call(c["name"], c["arguments"]) for c in parsed["tool_calls"]], False, 0.0
        return [], True, self.grade(parsed["answer"])

    def grade(self, answer: str) -> float:
        """1.0 if the goal holds for this final answer and the current state."""
        goal = self.example["goal"]
        if "bins" in goal and self.bins != {int(k): v for k, v in goal["bins"].items()}:
            return 0.0
        if "answer" in goal and not _same_answer(last_boxed(answer), goal["answer"]):
            return 0.0
        return 1.0

    def call(self, name: str, arguments: dict) -> str:
        """Execute one call against the state: its result, or an error text."""
        parameters = self.offered.get(name)
        if parameters is None:
            return f"error: no tool named {name}"[:80]
        properties, required = parameters.get("properties") or {}, parameters.get("required") or []
        for key in arguments:
            if key not in properties:
                return f"error: {name} has no argument {key}"[:80]
        for key in required:
            if key not in arguments:
                return f"error: {name} needs the argument {key}"
        for key, value in arguments.items():
            kind = properties[key].get("type")
            if kind in _TYPES and not _TYPES[kind](value):
                return f"error: {key} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {value!r:.20}"
        return getattr(self, "_" + name)(**arguments)

    # the tools
    def _bin_item(self, bin):
        if bin not in BINS:
            return f"error: no bin {bin}"
        return self.bins.get(bin, "empty")

    def _find_bin(self, item):
        for number, held in self.bins.items():
            if held == item.strip():
                return str(number)
        return f"error: no item named {item:.20}"

    def _price(self, item):
        if item.strip() not in self.prices:
            return f"error: no item named {item:.20}"
        return _number_text(self.prices[item.strip()])

    def _sell(self, item):
        item = item.strip()
        source = next((number for number, held in self.bins.items() if held == item), None)
        if source is None:
            return f"error: no item named {item:.20}"
        del self.bins[source]
        return f"ok: sold {item}"

    def _move(self, item, bin):
        item = item.strip()
        if bin not in BINS:
            return f"error: no bin {bin}"
        source = next((number for number, held in self.bins.items() if held == item), None)
        if source is None:
            return f"error: no item named {item:.20}"
        if bin != source and bin in self.bins:
            return f"error: bin {bin} is not empty"
        del self.bins[source]
        self.bins[bin] = item
        return f"ok: {item} is in bin {bin}"

    def _calculate(self, expression):
        try:
            return _number_text(_evaluate(expression))
        except (ValueError, SyntaxError, ZeroDivisionError, RecursionError) as e:
            return f"error: {e}"[:80] if isinstance(e, ValueError) else "error: not an arithmetic expression"


def _evaluate(expression: str):
    """+ - * / and parentheses on numbers, by walking the syntax tree (nothing is eval'd); small values only."""
    if len(expression) > 60:
        raise ValueError("expression too long")
    operators = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
                 ast.Div: lambda a, b: a / b}

    def value(node):
        if isinstance(node, ast.Constant) and _TYPES["number"](node.value):
            result = node.value
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            result = -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        elif isinstance(node, ast.BinOp) and type(node.op) in operators:
            result = operators[type(node.op)](value(node.left), value(node.right))
        else:
            raise ValueError("only numbers and + - * / ( ) are allowed")
        if abs(result) > 1e9:
            raise ValueError("number too large")
        return result
    return value(ast.parse(expression.strip(), mode="eval").body)


def _number_text(x) -> str:
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    return str(round(x, 4) if isinstance(x, float) else x)


def _same_answer(got, want: str) -> bool:
    if got is None:
        return False
    got, want = got.strip(), want.strip()
    number = re.compile(r"-?\d+(\.\d+)?")
    if number.fullmatch(got) and number.fullmatch(want):
        return float(got) == float(want)
    return got.lower() == want.lower()
