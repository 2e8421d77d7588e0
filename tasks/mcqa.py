"""
The mcqa domain: the letter in the last \\boxed{X} against the answer letter.

    {"domain": "mcqa", "messages": [...], "answer": "C", "options": [{"A": "..."}, {"B": "..."}, ...]}
"""

import re

from .core import ExampleError
from .math import last_boxed

_BOXED_LETTER = re.compile(r"\\boxed\{\s*[^A-Za-z{}]*([A-Z])[^A-Za-z{}]*\s*\}")  # \boxed{C}, \boxed{(C)}, \boxed{ [C] }
_ANSWER_COLON = re.compile(r"(?i)answer\s*:\s*(.+)")


def _option_letters(options) -> set:
    return {k.strip().upper() for o in options or [] for k in o}


def _normalise_text(s: str) -> str:
    return " ".join(s.lower().split())


def mcqa_letter(answer: str, options=None, mode="strict"):
    """The chosen letter, or None. strict: the last \\boxed{X} with one capital letter (NeMo-Gym's strict mode,
    but the last box rather than the first). lenient, when strict finds none: an option's text inside the last
    \\boxed{} (exactly one option matching), then "Answer: X" or "Answer: <option text>"."""
    allowed = _option_letters(options) or set("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    boxed = [m.group(1) for m in _BOXED_LETTER.finditer(answer)]
    if boxed:
        return boxed[-1] if boxed[-1] in allowed else None
    if mode == "strict":
        return None
    if mode != "lenient":
        raise ValueError(f"mcqa mode must be 'strict' or 'lenient', got {mode!r}")
    texts = {k.strip().upper(): _normalise_text(v) for o in options or [] for k, v in o.items()}
    inner = last_boxed(answer)
    if inner is not None:
        inner = _normalise_text(re.sub(r"\\text\{(.*?)\}", r"\1", inner))
        matched = {letter for letter, text in texts.items() if text and text in inner}
        if len(matched) == 1:
            return matched.pop()
    colon = _ANSWER_COLON.findall(answer)
    if colon:
        candidate = re.sub(r"\\text\{(.*?)\}", r"\1", colon[-1]).strip().strip(".*()[] ")
        if len(candidate) == 1 and candidate.upper() in allowed:
            return candidate.upper()
        for letter, text in texts.items():
            if text == _normalise_text(candidate):
                return letter
    return None


def mcqa_reward(gold: str, answer: str, options=None, mode="strict") -> float:
    return float(mcqa_letter(answer, options, mode) == gold.strip().upper())


def check(example: dict, where: str):
    options = example.get("options")
    if options is not None:
        if not isinstance(options, list) or not all(isinstance(o, dict) and len(o) == 1 for o in options):
            raise ExampleError(where, "options", 'expected a list of one-key dicts like {"A": "text"}')
    answer = example.get("answer")
    if not isinstance(answer, str) or len(answer.strip()) != 1 or not answer.strip().isalpha():
        raise ExampleError(where, "answer", f"expected one letter, got {answer!r}")
    example["answer"] = answer.strip().upper()
    if options is not None and example["answer"] not in _option_letters(options):
        letters = sorted(_option_letters(options))
        raise ExampleError(where, "answer", f"'{example['answer']}' is not one of the options {letters}")


def reward(example: dict, answer: str, *, mcqa_mode="strict", **_) -> float:
    return mcqa_reward(example["answer"], answer, options=example.get("options"), mode=mcqa_mode)
