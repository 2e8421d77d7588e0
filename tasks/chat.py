"""
The chat domain: a short answer to a chat request, graded by criteria the RLHF stage's judge never sees.

    {"domain": "chat", "messages": [{"role": "user", "content": "Give Ana a short list about cats."}],
     "topic": ["cats", "my cat", "a small cat"], "format": "list"}

The RLHF stage rewards chat rollouts with a generative reward model (judge.py), the way the paper's RLHF stage is
rewarded by a judge LLM rather than a verifier; the held-out score of the domain is this verifier, so a policy
that learns to please the judge without meeting the criteria (reward hacking) shows on the scoreboard. The
criteria are what a few-million-parameter judge can see locally in the text (data/generate.py trains one on
judgement examples labelled by them):

    topic      the answer mentions the asked topic: one of the row's `topic` phrases, as whole words
    format     "list": at least two lines, every one a "- " item; "prose": no "- " item at all
    no_repeat  no sentence is said twice (the habit the paper's RLHF stage is credited with reducing)

reward() is 1 only when all three hold, as IF's instructions are graded all together.
"""

import re

from .core import ExampleError

FORMATS = ("list", "prose")
CRITERIA = ("topic", "format", "no_repeat")


def sentences(answer: str) -> list[str]:
    """The answer's sentences, list markers dropped, lowercased and whitespace-normalised (how repeats compare)."""
    text = re.sub(r"(?m)^\s*-\s+", "", answer)
    return [" ".join(s.lower().split()) for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


def layout(answer: str) -> str:
    """"list" (at least two lines, every one a "- " item), "mixed" (some "- " items) or "prose" (none)."""
    lines = [ln.strip() for ln in answer.strip().splitlines() if ln.strip()]
    items = [ln for ln in lines if ln.startswith("- ")]
    return "list" if len(lines) >= 2 and len(items) == len(lines) else "mixed" if items else "prose"


def criteria(example: dict, answer: str) -> dict:
    """{criterion: holds} for the answer (the text after </think>); every criterion fails on an empty answer."""
    said = sentences(answer)
    topic = any(re.search(rf"(?<!\w){re.escape(p.lower())}(?!\w)", answer.lower()) for p in example["topic"])
    return {"topic": bool(said) and topic, "format": bool(said) and layout(answer) == example["format"],
            "no_repeat": bool(said) and len(set(said)) == len(said)}


def score(example: dict, answer: str) -> int:
    """How many of the criteria hold (0-3): what orders two answers in data/generate.py's judgement examples."""
    return sum(criteria(example, answer).values())


def check(example: dict, where: str):
    topic = example.get("topic")
    if not isinstance(topic, list) or not topic or not all(isinstance(p, str) and p.strip() for p in topic):
        raise ExampleError(where, "topic", f"expected a non-empty list of phrases, got {topic!r:.80}")
    if example.get("format") not in FORMATS:
        raise ExampleError(where, "format", f"expected one of {FORMATS}, got {example.get('format')!r:.80}")


def reward(example: dict, answer: str, **_) -> float:
    return float(all(criteria(example, answer).values()))
