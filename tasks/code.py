"""
The code domain: the last fenced code block of the answer, run on every test's stdin in the sandbox.

    {"domain": "code", "messages": [...], "tests": [{"input": "1 2\\n", "output": "3\\n"}, ...]}
"""

import re

from .core import ExampleError
from .sandbox import run_program

_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


def extract_code(answer: str):
    """The last ```fenced``` block's body (any language tag), or None."""
    blocks = _FENCE.findall(answer)
    return blocks[-1] if blocks else None


def normalise_output(text: str) -> list[str]:
    """Whitespace-normalised lines: runs of spaces/tabs collapsed, lines stripped, leading/trailing blank lines
    dropped. "3 4 \\n\\n" and "3  4" compare equal; "3\\n4" and "3 4" do not."""
    return [" ".join(line.split()) for line in text.strip().splitlines()]


def code_reward(tests, answer: str, limits=None) -> float:
    """1.0 only if the program exits 0 on every test with stdout matching the expected output (normalised); the
    expected outputs stay in this process. Tests run one after another and stop at the first failure."""
    program = extract_code(answer)
    if program is None or not program.strip():
        return 0.0
    for test in tests:
        result = run_program(program, test["input"], limits)
        if result.status != "ok" or normalise_output(result.stdout) != normalise_output(test["output"]):
            return 0.0
    return 1.0


def check(example: dict, where: str):
    tests = example.get("tests")
    if not isinstance(tests, list) or not tests:
        raise ExampleError(where, "tests", "missing or empty: expected a list of {input, output}")
    for i, t in enumerate(tests):
        if not isinstance(t, dict) or not isinstance(t.get("input"), str) or not isinstance(t.get("output"), str):
            raise ExampleError(where, f"tests[{i}]", "expected {\"input\": str, \"output\": str}")


def reward(example: dict, answer: str, *, limits=None, **_) -> float:
    return code_reward(example["tests"], answer, limits=limits)
