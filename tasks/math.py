"""
The math domain: the last \\boxed{...} of the answer against the reference answer, by mathematical equivalence.

    {"domain": "math", "messages": [...], "answer": "42"}
"""

import re
import resource
from fractions import Fraction

from .core import WorkerPool, _answer_str, serve_json_lines

#
# Most answers are plain numbers, and two numbers compare exactly with Fraction: that path costs microseconds.
# Anything else (LaTeX, expressions, sets, intervals) goes to HF Math-Verify. It parses with sympy, which can
# hang on hostile input (\boxed{9^{9^{9^9}}}), and its own timeouts use signal.alarm, which only works in a main
# thread. So it runs in worker processes, one request at a time each, and a worker that overruns its hard
# timeout is killed (a new one starts on the next request): the answer scores 0.

def last_boxed(text: str):
    """The content of the last \\boxed{...} (or \\fbox{...}) in text, braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] != "{":  # \boxed 5
        match = re.match(r"[^\s$]+", text[i:])
        return match.group(0) if match else None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None  # never closed


_LATEX_NOISE = re.compile(r"\\[,!;: ]|\\left|\\right|\$|\s|\\displaystyle|\^\{?\\circ\}?")
_FRAC = re.compile(r"^(-?)\\[dt]?frac(?:\{(-?\d+)\}|(\d))(?:\{(-?\d+)\}|(\d))$")


def _as_number(text: str):
    """A plain number (integer, decimal, a/b, \\frac{a}{b}, \\dfrac12, 1,000) as a Fraction, else None."""
    s = _LATEX_NOISE.sub("", text).rstrip(".")
    s = s.replace("{,}", ",")
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?", s) or re.fullmatch(r"[-+]?\d+/\d+", s):
        try:
            return Fraction(s)
        except (ValueError, ZeroDivisionError):
            return None
    m = _FRAC.match(s)
    if m:
        num, den = int(m.group(2) or m.group(3)), int(m.group(4) or m.group(5))
        if den != 0:
            return Fraction(-num if m.group(1) else num, den)
    return None


def math_reward(gold: str, answer: str, timeout: float = 5.0) -> float:
    """1.0 if the last \\boxed{} of answer equals gold mathematically; 0.0 if it differs, is missing, or the
    check takes longer than timeout seconds."""
    predicted = last_boxed(answer)
    if predicted is None or not predicted.strip():
        return 0.0
    if _LATEX_NOISE.sub("", predicted) == _LATEX_NOISE.sub("", gold):
        return 1.0
    a, b = _as_number(gold), _as_number(predicted)
    if a is not None and b is not None:
        return float(a == b)
    return _math_verify(gold, predicted, timeout)


def check(example: dict, where: str):
    example["answer"] = _answer_str(example.get("answer"), where)


def reward(example: dict, answer: str, *, math_timeout=5.0, **_) -> float:
    return math_reward(example["answer"], answer, timeout=math_timeout)


_math_workers = WorkerPool("_math_worker", hint="is math-verify installed? (pip install math-verify)")


def _math_verify(gold: str, predicted: str, timeout: float) -> float:
    return 1.0 if _math_workers.request({"gold": gold, "predicted": predicted, "timeout": timeout}, timeout) else 0.0


def _math_worker_main():
    """The worker's loop (python -m tasks _math_worker). Math-Verify's signal.alarm timeouts work here: this is the
    main thread. Its timeout exception is a BaseException, hence the broad except: any failure scores 0."""
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a runaway sympy computation fails, not the machine
    from math_verify import parse, verify

    def handle(request):
        seconds = max(1, int(request["timeout"]))
        try:
            gold = parse("\\boxed{" + request["gold"] + "}", parsing_timeout=seconds)
            predicted = parse("\\boxed{" + request["predicted"] + "}", parsing_timeout=seconds)
            return bool(gold and predicted and verify(gold, predicted, timeout_seconds=seconds))
        except BaseException:  # noqa: B036 -- math_verify's TimeoutException derives from BaseException
            return False
    serve_json_lines(handle)


