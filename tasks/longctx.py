"""
The longctx domain (long-context reasoning): a question about a long document whose answer needs facts from
several places in it, graded by the exact answer: the last \\boxed{...} against `answer`, both normalised.

    {"domain": "longctx", "messages": [...], "answer": "8"}

Normalised as QA exact match is (SQuAD, HotpotQA): case, spacing, punctuation and the articles a / an / the do not
count; and two numbers compare by value ("1,000" = "1000.0"). No \\boxed{} in the answer scores 0.

Released rows: NeMo-Gym's long-context rows (the AA-LCR resources server's layout: the documents and the question
in `responses_create_params.input`, the reference in `answer`, with `question`, `document_set_id`,
`input_tokens_band`, ...) map into this domain (`from_nemo_gym` below, called by tasks/core.py's loader); there an
LLM judge grades the answer, here the exact match above does (docs/tasks.md says what that changes).
"""

import re

from .core import ExampleError
from .math import _as_number, last_boxed

_WORDS = re.compile(r"\d+(?:[.,]\d+)*|[^\W_]+|%")   # numbers (1,000 and 6.5 whole), words, percent signs
_ARTICLES = {"a", "an", "the"}
_TEXT = re.compile(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}")
# a long-context row in NeMo-Gym: the grader's name, or a field only its long-context rows have
LONG_CONTEXT_AGENTS = ("lcr", "long_context", "longcontext", "long-context")
LONG_CONTEXT_FIELDS = ("input_tokens_band", "document_set_id")
BOXED_INSTRUCTION = "Put your final answer within \\boxed{}."


def normalise_answer(text: str) -> str:
    """The answer as exact match compares it: its words and numbers in lower case, without LaTeX text wrappers,
    punctuation (but percent signs) and the articles (unless that is all); each number as its value (1,000 ->
    1000, 8.0 -> 8), and a whole answer that is one plain number (1/2, \\frac{1}{2}) as its value."""
    text = _TEXT.sub(r"\1", text)
    number = _as_number(text.strip())
    if number is not None:
        return str(number)        # a Fraction: "8", "1/2"
    words = _WORDS.findall(text.lower())
    words = [w for w in words if w not in _ARTICLES] or words      # an answer "A" stays an answer
    return " ".join(str(_as_number(w)) if w[0].isdigit() and _as_number(w) is not None else w for w in words)


def longctx_reward(gold: str, answer: str) -> float:
    predicted = last_boxed(answer)
    predicted = normalise_answer(predicted) if predicted is not None else ""
    return float(bool(predicted) and predicted == normalise_answer(gold))


def is_long_context_row(field, agent: str) -> bool:
    """Whether a NeMo-Gym row (field(key) reads its verifier fields, agent is its agent_ref name) is a
    long-context question: a reference `answer` and a long-context grader or field."""
    return field("answer") is not None and (any(name in agent.lower() for name in LONG_CONTEXT_AGENTS)
                                            or any(field(key) is not None for key in LONG_CONTEXT_FIELDS))


def from_nemo_gym(messages: list, field) -> dict:
    """A NeMo-Gym long-context row as an example: its prompt with the \\boxed{} instruction appended to the last
    user turn (the row's own prompt asks for a free-form answer, which its judge reads), its `answer`."""
    messages = [dict(m) for m in messages]
    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last is not None and isinstance(messages[last].get("content"), str):
        messages[last]["content"] = messages[last]["content"].rstrip() + "\n\n" + BOXED_INSTRUCTION
    return {"domain": "longctx", "messages": messages, "answer": field("answer")}


def check(example: dict, where: str):
    answer = example.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not normalise_answer(str(answer)):
        raise ExampleError(where, "answer", f"expected a non-empty string or number, got {answer!r:.80}")
    example["answer"] = str(answer).strip()


def reward(example: dict, answer: str, **_) -> float:
    return longctx_reward(example["answer"], answer)
