"""
Generates the shipped tiny tasks and the tiny tokenizer:

    data/sft.jsonl   prompts with a thinking-mode answer:  <think>\\nshort trace\\n</think>\\nanswer (or a tool call)
    data/rl.jsonl    prompts only (RL and MOPD sample their own answers)
    data/eval.jsonl  held-out prompts only, for evaluation
    data/judge_sft.jsonl  the RLHF judge's fine-tune: a chat answer rated by the hidden criteria (below)
    data/judge.jsonl held-out pairs of chat answers with the hidden criteria's verdict (judge.py --judge measures a
                     judge's agreement on them)
    data/tokenizer.json  byte-level BPE, 2048 tokens, trained on the rendered SFT conversations (with
                         --train-tokenizer; by default the shipped one is kept and the lengths checked)

Nine domains, one "domain" field per row (the schema of tasks/). Each is small enough for a few-million-parameter
model to learn on a CPU in minutes (a 256-token context; 512 for tool, whose prompt carries the tool specs, for
the multi-turn agent and swe, whose SFT rows are whole conversations, and for longctx, whose prompt is a long
document), and has a knob that keeps some of it out of reach after SFT, which is what RL is for:

    math  arithmetic word problems; the answer in \\boxed{}; one or two steps on one-digit numbers (the times table)
    if    "write a sentence about X" under one or two IFEval constraints (case, ending phrase, keyword, word or
          sentence count, JSON, no comma, quotation, title, postscript, forbidden word, first / last word)
    mcqa  which of four one-digit numbers is even (odd, a prime, a square); the letter in \\boxed{}
    json  an object following a small schema (2-4 fields drawn from a kind's fields) with values from the prompt;
          half the prompts also give a detail the schema has no field for (the strict schema forbids it)
    code  tiny stdin -> stdout Python programs (sum, max, reverse, count, ...), with a parameter (an offset, a
          repeat count, a divisor) that changes per problem; 3 tests each
    tool  one or two of five small tools offered (calculate on one-digit numbers, convert, lookup in a tiny
          city table, weekday, weather): call the right one with arguments from the question (a date rewritten as
          YYYY-MM-DD, a unit name as its symbol, two cities as two parallel calls), or answer in prose when no
          offered tool fits; some SFT rows go on with the tool's result and the final answer
    agent a tiny warehouse behind tools that really run (tasks/agent.py: 5-7 items, named by two-digit codes, in
          9 bins, prices 1-9, hidden): what the item in bin B costs (bin_item, then price), sell the item in bin B
          (bin_item, then sell; graded on the bins left), what N of item C cost (price, then calculate); two
          dependent calls, then the answer
    swe   a tiny project (a module or two of 1-3 line functions, a test file whose tests print values) with one
          bug: a wrong operator, constant, comparison, index or case method, or a constant in a config module;
          the answer is a SEARCH/REPLACE patch, tested in the sandbox (tasks/swe.py); in some projects a second
          function is wrong too, which the issue does not mention: the test report after the first patch shows it
    chat  "tell Ana about cats" or "give Ana a short list about cats": two or three sentences about the topic,
          graded by hidden criteria (tasks/chat.py: on topic, in the asked format, no sentence twice) that the
          RLHF stage's judge never sees

and the judge's fine-tune rows (data/judge_sft.jsonl, "judge", no verifier): a chat prompt and one answer that
breaks each criterion with probability 0.4, rated [[0]] to [[3]] by how many of the hidden criteria hold, after a
thought that copies what each criterion compares and then checks it; ./run.sh fine-tunes the SFT model on them
(sft.py) into the RLHF stage's reward model (judge.py).
    longctx a document of 21-33 records (which row each of 12-24 bins is in, how many of an item each of 9 rows
          has), shuffled, and a question that needs one of them (the row of a bin), two in a chain (the items in
          the row of a bin) or two and a sum (the items of two rows); the answer in \\boxed{}

The SFT answers come from an imperfect teacher: in each RL domain one kind of prompt gets, in SLIP_RATE (70%) of
its SFT rows, an answer with a habit the verifier rejects, marked "teacher_slip" (see SLIP_RATE below):

    if    a word count or format rule (lowercase, capitals, title, quotation marks, JSON) ignored
    mcqa  even and prime questions: the option's number boxed instead of its letter
    json  events and products: an "id" field the strict schema does not have
    code  "Read an integer n" / "Read two integers" problems: print("Answer:", ...) instead of the bare answer
    tool  calculate and convert questions: answered in prose instead of calling the tool
    agent "what does the item in bin B cost": after bin_item, the price guessed instead of calling price
    swe   the config-constant bug: the test file edited (to print the expected value) instead of the code
    chat  prose requests: answered with a bulleted list (the chat habit an RLHF stage trains away)
    longctx the chain questions: the bin's row boxed (the first hop's value) instead of the items in that row

This is what RL is for at this scale: the SFT model has the habit most of the time, its samples sometimes do it
right, and the verifier's reward makes the right way the greedy one (README, "Tasks, data and verifiers").

Splits are disjoint by prompt text. Every example's reference answer is checked with tasks.reward (code runs in
the sandbox) before it is written: every shipped prompt is solvable, every SFT answer scores 1 except the
teacher's slips, which are checked to score 0. The multi-turn domains' conversations are played through their
environments (tasks.make_env): each tool result and test report in an SFT row is the environment's own reply to
the turn before it, and the episode's reward is checked the same way (1, and 0 for a slip).

    python data/generate.py            # about a minute on 2 cores; deterministic for a given --seed
"""

import argparse
import datetime
import json
import random
import re
import string
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tasks  # noqa: E402

COUNTS = {"sft": 1000, "rl": 400, "eval": 200}  # per domain (200 held-out: a cell within about +-3.5), except:
DOMAIN_COUNTS = {
    "code": {"sft": 400, "rl": 200, "eval": 200},  # fewer distinct problems (family x parameter)
    "json": {"sft": 500, "rl": 400, "eval": 200},  # learnt fast: fewer SFT rows keep it below the ceiling
    "mcqa": {"sft": 2000, "rl": 400, "eval": 200},  # short rows
    "tool": {"sft": 700, "rl": 400, "eval": 200},  # examples 3-4 times longer (the tools in the prompt)
    "agent": {"sft": 500, "rl": 400, "eval": 200},  # whole multi-turn conversations, played through the environment
    "swe": {"sft": 2000, "rl": 300, "eval": 200},  # tests run in the sandbox; enough SFT rows that every seed learns
    # each kind of patch (with 1,000, one seed in three wrote a constant's new value as its old: docs/results.md)
    "chat": {"sft": 800, "rl": 400, "eval": 200},  # short rows
    "longctx": {"sft": 400, "rl": 300, "eval": 200},  # examples 3-5 times longer (the document in the prompt)
}
JUDGE_RATINGS = 8000  # the judge's fine-tune (data/judge_sft.jsonl): one chat answer rated per row
JUDGE_PAIRS = 200  # held-out pairs of chat answers (data/judge.jsonl): the judge's agreement


def split_counts(domain):
    return DOMAIN_COUNTS.get(domain, COUNTS)


# The SFT teacher's slips. Real SFT data is distilled from teacher models, and teachers have habits a verifier
# rejects. Each RL domain's generator describes one such habit on one kind of its prompts (the makers return it as
# `slip`: {"why", "turns"}), and that many SFT rows of the kind show it instead of the right answer (marked
# "teacher_slip"). The SFT model then has the habit most of the time but not always: the situation in which RL,
# rewarded by the verifier, finds the right behaviour among its own samples and makes it the greedy one. RL and eval
# rows are prompts only.
SLIP_RATE = 0.7


def answer_turn(trace, answer):
    """The assistant turn of a thinking-mode answer."""
    return {"role": "assistant", "content": f"<think>\n{trace}\n</think>\n{answer}"}


# -----------------------------------------------------------------------------
# math: arithmetic word problems

NAMES = ["Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena", "Milo", "Nia",
         "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tess", "Uma", "Vik", "Wren", "Yara", "Zed"]
ITEMS = ["apple", "book", "coin", "pencil", "stamp", "marble", "card", "shell", "sticker", "egg", "cookie", "flower"]


def make_math(rng):
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.choice(["add", "add", "sub", "sub", "mul", "div", "two_step"])
    if kind == "add":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        q = f"{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have now?"
        trace, answer = f"{a} + {b} = {a + b}", a + b
    elif kind == "sub":
        a = rng.randint(3, 18)
        b = rng.randint(1, min(a - 1, 9))
        q = f"{name} had {a} {item}s and gave {b} to {other}. How many {item}s does {name} have left?"
        trace, answer = f"{a} - {b} = {a - b}", a - b
    elif kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        q = f"{name} buys {a} bags with {b} {item}s in each bag. How many {item}s is that in total?"
        trace, answer = f"{a} * {b} = {a * b}", a * b
    elif kind == "div":
        b, each = rng.randint(2, 9), rng.randint(2, 9)
        q = f"{name} shares {b * each} {item}s equally among {b} friends. How many {item}s does each friend get?"
        trace, answer = f"{b * each} / {b} = {each}", each
    else:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        c = rng.randint(1, min(a + b - 1, 9))
        q = (f"{name} has {a} {item}s, buys {b} more and then gives {c} to {other}. "
             f"How many {item}s does {name} have now?")
        trace, answer = f"{a} + {b} = {a + b}\n{a + b} - {c} = {a + b - c}", a + b - c
    example = {"domain": "math", "messages": [{"role": "user", "content": q}], "answer": str(answer)}
    return example, trace, f"The answer is \\boxed{{{answer}}}.", None


# -----------------------------------------------------------------------------
# if: a sentence about a topic, under one or two IFEval constraints

TOPICS = {
    "cats": ["cats", "my cat", "a small cat"], "dogs": ["dogs", "our dog", "a young dog"],
    "rain": ["the rain", "a light rain", "summer rain"], "trees": ["old trees", "a tall tree", "the trees"],
    "the sea": ["the sea", "the blue sea", "a calm sea"], "bread": ["fresh bread", "warm bread", "the bread"],
    "music": ["music", "soft music", "the music"], "trains": ["trains", "the night train", "a fast train"],
    "books": ["books", "a good book", "old books"], "gardens": ["gardens", "a small garden", "the garden"],
    "the moon": ["the moon", "a full moon", "the pale moon"], "birds": ["birds", "a little bird", "the birds"],
    "coffee": ["coffee", "hot coffee", "a cup of coffee"], "snow": ["snow", "fresh snow", "the first snow"],
    "bikes": ["bikes", "my bike", "an old bike"], "rivers": ["rivers", "a wide river", "the river"],
}
PREDICATES = [
    "makes people happy", "can be found in many places", "needs a lot of care", "is nice to see in the morning",
    "brings back good memories", "changes with the seasons", "is loved by many children", "feels calm and quiet",
    "looks best in the evening", "is part of daily life", "helps us slow down", "is easy to enjoy",
    "can teach us something new", "has a long history", "is simple and beautiful", "gives the day some color",
]
EXTRA_SENTENCES = ["It is a good thing to think about.", "Many people agree with this.", "I find it very pleasant.",
                   "This is true in most towns.", "It is worth a short walk."]
END_PHRASES = ["Any other questions?", "Is there anything else I can help with?", "That is all.", "Have a nice day."]
FIRST_WORDS = ["indeed", "today", "well", "yes", "truly"]
LAST_WORDS = ["today", "again", "too", "now", "always"]
KEYWORDS = ["sunny", "gentle", "bright", "happy", "quiet", "golden", "simple"]

# id -> (description, order of application); conflicting pairs below are never combined
# The order in which constraints are applied: content edits first, then counts, then case, then wrappers.
IF_CONSTRAINTS = ["forbidden", "no_comma", "keyword", "first_word", "words_at_least", "sentences", "last_word",
                  "postscript", "end_phrase", "words_less_than", "lowercase", "capital", "title", "quotation", "json"]
# the slip: the teacher ignores word counts and format rules
IF_SLIPPED = ("words_at_least", "words_less_than", "lowercase", "capital", "title", "quotation", "json")
CONFLICTS = [{"lowercase", "capital"}, {"quotation", "json"}, {"title", "json"}, {"first_word", "quotation"},
             {"first_word", "title"}, {"last_word", "end_phrase"}, {"postscript", "end_phrase"},
             {"postscript", "last_word"}, {"json", "postscript"}, {"json", "end_phrase"}, {"json", "last_word"},
             {"json", "first_word"}, {"words_at_least", "words_less_than"}, {"sentences", "words_less_than"},
             {"capital", "postscript"}, {"quotation", "end_phrase"}, {"quotation", "last_word"},
             {"json", "sentences"}, {"json", "words_at_least"}, {"json", "capital"}, {"json", "words_less_than"},
             {"title", "words_less_than"}]


def _lower_first(s):
    return s[:1].lower() + s[1:]


def _upper_first(s):
    return s[:1].upper() + s[1:]


def make_if(rng):
    topic = rng.choice(list(TOPICS))
    subject = rng.choice(TOPICS[topic])
    p1, p2 = rng.sample(PREDICATES, 2)
    with_comma = rng.random() < 0.5
    first_text = _upper_first(f"{subject} {p1}, and it {p2}." if with_comma else f"{subject} {p1}.")
    n = rng.choice([1, 1, 2])
    while True:
        chosen = rng.sample(IF_CONSTRAINTS, n)
        if not any(c <= set(chosen) for c in CONFLICTS):
            break
    chosen.sort(key=IF_CONSTRAINTS.index)  # apply content edits first, wrappers last

    seed = rng.random()

    def write(skip):
        """The answer, ids, kwargs, asks and notes; the rules in skip are asked for but not followed (the slip),
        and the draws are the same either way, so both answers are to the same prompt."""
        r, text = random.Random(seed), first_text
        ids, kwargs, asks, notes = [], [], [], []
        for c in chosen:
            if c == "forbidden":
                word = r.choice([w for w in p1.split() if len(w) >= 4] or [p1.split()[-1]])
                text = f"{subject} {r.choice([p for p in PREDICATES if word not in p.split()])}."
                text = text[0].upper() + text[1:]
                ids.append("keywords:forbidden_words"); kwargs.append({"forbidden_words": [word]})
                asks.append(f"Do not include the word {word} in the response."); notes.append(f"avoid the word {word}")
            elif c == "no_comma":
                text = text.replace(",", "")
                ids.append("punctuation:no_comma"); kwargs.append({})
                asks.append("In your entire response, refrain from the use of any commas."); notes.append("no commas")
            elif c == "keyword":
                word = r.choice(KEYWORDS)
                text += f" It is {word} and nice."
                ids.append("keywords:existence"); kwargs.append({"keywords": [word]})
                asks.append(f"Include the keyword {word} in the response."); notes.append(f"use the word {word}")
            elif c == "words_at_least":
                count = tasks.ifeval._count_words(text)
                target = count + r.randint(3, 9)
                extras = r.sample(EXTRA_SENTENCES, len(EXTRA_SENTENCES))
                while c not in skip and tasks.ifeval._count_words(text) < target:
                    text += " " + extras.pop()
                ids.append("length_constraints:number_words"); kwargs.append({"num_words": target, "relation": "at least"})
                asks.append(f"Answer with at least {target} words."); notes.append(f"at least {target} words")
            elif c == "words_less_than":
                target = tasks.ifeval._count_words(text) + r.randint(1, 4)
                extras = r.sample(EXTRA_SENTENCES, len(EXTRA_SENTENCES))
                while c in skip and tasks.ifeval._count_words(text) < target:  # the slip: too long
                    text += " " + extras.pop()
                ids.append("length_constraints:number_words"); kwargs.append({"num_words": target, "relation": "less than"})
                asks.append(f"Answer with less than {target} words."); notes.append(f"fewer than {target} words")
            elif c == "sentences":
                target = r.choice([2, 3])
                extras = r.sample(EXTRA_SENTENCES, len(EXTRA_SENTENCES))
                while tasks.ifeval._count_sentences(text) < target:
                    text += " " + extras.pop()
                ids.append("length_constraints:number_sentences"); kwargs.append({"num_sentences": target, "relation": "at least"})
                asks.append(f"Your response should contain at least {target} sentences."); notes.append(f"{target} sentences or more")
            elif c == "postscript":
                text += f"\nP.S. {r.choice(EXTRA_SENTENCES)}"
                ids.append("detectable_content:postscript"); kwargs.append({"postscript_marker": "P.S."})
                asks.append("At the end of your response, please explicitly add a postscript starting with P.S.")
                notes.append("add a P.S. at the end")
            elif c == "first_word":
                word = r.choice(FIRST_WORDS)
                text = f"{word.capitalize()} {_lower_first(text)}"
                ids.append("first_word:first_word_answer"); kwargs.append({"first_word": word})
                asks.append(f"The first word of your response should be the word {word}."); notes.append(f"start with {word}")
            elif c == "last_word":
                word = r.choice(LAST_WORDS)
                text = text.rstrip(".") + f" {word}."
                ids.append("last_word:last_word_answer"); kwargs.append({"last_word": word})
                asks.append(f"The last word of your response should be the word {word}."); notes.append(f"end with {word}")
            elif c == "end_phrase":
                phrase = r.choice(END_PHRASES)
                text += f" {phrase}"
                ids.append("startend:end_checker"); kwargs.append({"end_phrase": phrase})
                asks.append(f"Finish your response with this exact phrase {phrase} No other words should follow this phrase.")
                notes.append(f"finish with {phrase}")
            elif c == "lowercase":
                if c not in skip:
                    text = text.lower()
                ids.append("change_case:english_lowercase"); kwargs.append({})
                asks.append("Your entire response should be in English, and in all lowercase letters."); notes.append("all lowercase")
            elif c == "capital":
                if c not in skip:
                    text = text.upper()
                ids.append("change_case:english_capital"); kwargs.append({})
                asks.append("Your entire response should be in English, and in all capital letters."); notes.append("all capitals")
            elif c == "title":
                title = topic.upper() if "capital" in chosen else topic
                if c not in skip:
                    text = f"<<{title}>>\n{text}"
                ids.append("detectable_format:title"); kwargs.append({})
                asks.append("Your answer must contain a title, wrapped in double angular brackets, such as <<my title>>.")
                notes.append("a title in << >>")
            elif c == "quotation":
                if c not in skip:
                    text = f'"{text}"'
                ids.append("startend:quotation"); kwargs.append({})
                asks.append("Wrap your entire response with double quotation marks."); notes.append("wrap in quotes")
            elif c == "json":
                if c not in skip:
                    text = json.dumps({"topic": topic, "sentence": text})
                ids.append("detectable_format:json_format"); kwargs.append({})
                asks.append("Entire output should be wrapped in JSON format."); notes.append("JSON only")
            if c in skip:
                notes.pop()
        return text, ids, kwargs, asks, notes

    text, ids, kwargs, asks, notes = write(skip=())
    prompt = f"Write about {topic}. " + " ".join(asks)
    example = {"domain": "if", "messages": [{"role": "user", "content": prompt}],
               "instruction_id_list": ids, "kwargs": kwargs}
    slip = None
    if any(c in IF_SLIPPED for c in chosen):
        plain, _, _, _, kept = write(skip=IF_SLIPPED)
        slip = {"why": "ignored the length or format rule",
                "turns": [answer_turn("Rules: " + ("; ".join(kept) or "none") + ".", plain)]}
    return example, "Rules: " + "; ".join(notes) + ".", text, slip


# -----------------------------------------------------------------------------
# mcqa: which of four one-digit numbers has a property (even, odd, a prime, a square): the knowledge is which number
# is what, learnt in SFT; the letter in \\boxed{}. Built around what the tiny model can read from its prompt (README,
# "How MCQA was made learnable"): a digit at a known place, as in math's "has 3 ... gets 4" -> "3 + 4", but not a thing
# picked by its content. With words as options (which of these is a city, an animal, ...) it named a word of the
# right category but mostly not the one offered; with digits and the thought "The even number is 4, option B" it
# named the right number every time and the letter at chance. So the thought checks the options in order.

CITIES = ["Oslo", "Lima", "Cairo", "Kyoto", "Porto", "Quito", "Riga", "Tunis", "Perth", "Bern", "Dakar", "Hanoi"]
MCQA_PROPERTIES = {"even": {0, 2, 4, 6, 8}, "odd": {1, 3, 5, 7, 9}, "prime": {2, 3, 5, 7}, "square": {0, 1, 4, 9}}
MCQA_ADJECTIVES = {"even": "even", "odd": "odd", "prime": "prime", "square": "a square"}
MCQA_QUESTIONS = ["Which of these is {}?", "Which option is {}?", "One of these is {}. Which one?"]
MCQA_SLIPPED = ("even", "prime")  # the slip: for these the teacher boxes the number, not its letter


def make_mcqa(rng):
    prop = rng.choice(sorted(MCQA_PROPERTIES))
    numbers = MCQA_PROPERTIES[prop]
    correct = rng.choice(sorted(numbers))
    choices = [correct] + rng.sample(sorted(set(range(10)) - numbers), 3)
    rng.shuffle(choices)
    letters = "ABCD"
    at = choices.index(correct)
    letter = letters[at]
    question = rng.choice(MCQA_QUESTIONS).format(f"{'an' if prop[0] in 'aeiou' else 'a'} {prop} number")
    options = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(choices))
    prompt = f"{question}\n{options}\nAnswer with the letter in \\boxed{{}}."
    example = {"domain": "mcqa", "messages": [{"role": "user", "content": prompt}], "answer": letter,
               "options": [{letters[i]: str(c)} for i, c in enumerate(choices)]}
    # the thought: one line per option, in order, up to the answer's, which names its own letter (see above)
    adjective = MCQA_ADJECTIVES[prop]
    lines = [f"{letters[i]}. {c} is not {adjective}." for i, c in enumerate(choices[:at])]
    trace = "\n".join(lines + [f"{letter}. {correct} is {adjective}, option {letter}."])
    slip = None
    if prop in MCQA_SLIPPED:
        slip = {"why": "boxed the option's number, not its letter",
                "turns": [answer_turn(trace, f"The answer is \\boxed{{{correct}}}.")]}
    return example, trace, f"The answer is \\boxed{{{letter}}}.", slip


# -----------------------------------------------------------------------------
# json: an object following a small schema, values given in the prompt

WORDS = ["red", "blue", "small", "fast", "new", "old", "round", "soft", "light", "cheap", "warm", "green"]
SPECIES = ["cat", "dog", "rabbit", "parrot", "turtle", "hamster", "goldfish"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
KINDS = {  # kind -> field -> (JSON schema, value maker, how the prompt says it)
    "person": {"name": ({"type": "string"}, lambda r: r.choice(NAMES), "named {}"),
               "age": ({"type": "integer"}, lambda r: r.randint(5, 90), "aged {}"),
               "city": ({"type": "string"}, lambda r: r.choice(CITIES), "living in {}"),
               "student": ({"type": "boolean"}, lambda r: r.random() < 0.5, "student: {}")},
    "pet": {"name": ({"type": "string"}, lambda r: r.choice(NAMES), "named {}"),
            "species": ({"type": "string"}, lambda r: r.choice(SPECIES), "a {}"),
            "age": ({"type": "integer"}, lambda r: r.randint(1, 15), "aged {}"),
            "vaccinated": ({"type": "boolean"}, lambda r: r.random() < 0.5, "vaccinated: {}")},
    "product": {"name": ({"type": "string"}, lambda r: r.choice(WORDS) + " " + r.choice(ITEMS), "called {}"),
                "price": ({"type": "number"}, lambda r: round(r.randint(100, 9999) / 100, 2), "costing {}"),
                "stock": ({"type": "integer"}, lambda r: r.randint(0, 500), "with {} in stock"),
                "tags": ({"type": "array", "items": {"type": "string"}}, lambda r: r.sample(WORDS, r.randint(1, 3)),
                         "tagged {}")},
    "event": {"title": ({"type": "string"}, lambda r: r.choice(WORDS) + " " + r.choice(["party", "fair", "talk", "match"]),
                        "called {}"),
              "day": ({"type": "string", "enum": DAYS}, lambda r: r.choice(DAYS), "on {}"),
              "guests": ({"type": "integer"}, lambda r: r.randint(2, 300), "for {} guests"),
              "outdoor": ({"type": "boolean"}, lambda r: r.random() < 0.5, "outdoor: {}")},
}


JSON_SLIPPED = ("event", "product")  # the slip: the teacher gives these records an "id" field


def _say(value):
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return " and ".join(value)
    return str(value)


def make_json(rng):
    kind = rng.choice(sorted(KINDS))
    names = [f for f in KINDS[kind] if rng.random() < 0.75] or [next(iter(KINDS[kind]))]
    if len(names) < 2:
        names = list(KINDS[kind])[:2]
    properties = {f: KINDS[kind][f][0] for f in names}
    values = {f: KINDS[kind][f][1](rng) for f in names}
    said = {f: KINDS[kind][f][2].format(_say(values[f])) for f in names}
    # the knob: half the time the prompt also gives a detail the schema has no field for, which the (strict)
    # schema forbids in the answer
    extra = [f for f in KINDS[kind] if f not in names]
    order, skipped = list(names), None
    if extra and rng.random() < 0.5:
        skipped = rng.choice(extra)
        said[skipped] = KINDS[kind][skipped][2].format(_say(KINDS[kind][skipped][1](rng)))
        order.insert(rng.randint(0, len(order)), skipped)
    schema = {"type": "object", "properties": properties}
    prompt = (f"Give a JSON object for a {kind}: {', '.join(said[f] for f in order)}.\n"
              f"Schema: {json.dumps(schema, separators=(',', ':'))}\nReply with the JSON only.")
    example = {"domain": "json", "messages": [{"role": "user", "content": prompt}], "schema": schema}
    trace = "Fields: " + ", ".join(f"{f} ({properties[f]['type']})" for f in names) + "."
    if skipped:
        trace += f" The schema has no {skipped}."
    slip = None
    if kind in JSON_SLIPPED:  # the strict schema has no id
        slip = {"why": "added an id the schema does not have", "turns": [answer_turn(
            trace.replace("Fields: ", "Fields: id (integer), "), json.dumps({"id": 1} | values))]}
    return example, trace, json.dumps(values), slip


# -----------------------------------------------------------------------------
# code: tiny stdin -> stdout programs; (statement, solution, reference, input maker), k a per-problem parameter

def _ints(r, n, lo=-50, hi=99):
    return [r.randint(lo, hi) for _ in range(n)]


def _word(r):
    return "".join(r.choice(string.ascii_lowercase) for _ in range(r.randint(3, 8)))


CODE_FAMILIES = [
    (lambda k: f"Read two integers a and b on one line. Print a + b + {k}.",
     lambda k: f"a, b = map(int, input().split())\nprint(a + b + {k})",
     lambda k, s: str(sum(map(int, s.split())) + k), lambda r: " ".join(map(str, _ints(r, 2)))),
    (lambda k: f"Read two integers a and b on one line. Print a * b - {k}.",
     lambda k: f"a, b = map(int, input().split())\nprint(a * b - {k})",
     lambda k, s: str(int(s.split()[0]) * int(s.split()[1]) - k), lambda r: " ".join(map(str, _ints(r, 2, -20, 20)))),
    (lambda k: f"Read an integer n. Print n times {k}.",
     lambda k: f"n = int(input())\nprint(n * {k})", lambda k, s: str(int(s) * k), lambda r: str(r.randint(-99, 999))),
    (lambda k: f"Read an integer n. Print the remainder of n divided by {k}.",
     lambda k: f"n = int(input())\nprint(n % {k})", lambda k, s: str(int(s) % k), lambda r: str(r.randint(0, 9999))),
    (lambda k: f"Read a word. Print it {k} times on one line, separated by spaces.",
     lambda k: f"w = input().strip()\nprint(' '.join([w] * {k}))",
     lambda k, s: " ".join([s.strip()] * k), lambda r: _word(r)),
    (lambda k: f"Read integers on one line. Print each of them plus {k}, separated by spaces.",
     lambda k: f"xs = map(int, input().split())\nprint(' '.join(str(x + {k}) for x in xs))",
     lambda k, s: " ".join(str(int(x) + k) for x in s.split()), lambda r: " ".join(map(str, _ints(r, r.randint(2, 6))))),
    (lambda k: f"Read integers on one line. Print how many of them are greater than {k}.",
     lambda k: f"xs = list(map(int, input().split()))\nprint(sum(1 for x in xs if x > {k}))",
     lambda k, s: str(sum(1 for x in s.split() if int(x) > k)), lambda r: " ".join(map(str, _ints(r, r.randint(3, 8))))),
    (lambda k: f"Read an integer n. Print the numbers from 1 to n, one per line, but only those divisible by {k}.",
     lambda k: f"n = int(input())\nfor i in range(1, n + 1):\n    if i % {k} == 0:\n        print(i)",
     lambda k, s: "\n".join(str(i) for i in range(1, int(s) + 1) if i % k == 0), lambda r: str(r.randint(12, 40))),
    (lambda k: f"Read an integer n. Print Fizz if n is divisible by {k}, otherwise print n.",
     lambda k: f"n = int(input())\nprint('Fizz' if n % {k} == 0 else n)",
     lambda k, s: "Fizz" if int(s) % k == 0 else s.strip(), None),
    (lambda k: f"Read a line of text. Print its first {k} characters.",
     lambda k: f"s = input()\nprint(s[:{k}])", lambda k, s: s[:k], lambda r: " ".join(_word(r) for _ in range(3))),
    (lambda k: f"Read integers on one line. Print the largest one plus {k}.",
     lambda k: f"xs = list(map(int, input().split()))\nprint(max(xs) + {k})",
     lambda k, s: str(max(map(int, s.split())) + k), lambda r: " ".join(map(str, _ints(r, r.randint(2, 7))))),
    (lambda k: f"Read integers on one line. Print the smallest one minus {k}.",
     lambda k: f"xs = list(map(int, input().split()))\nprint(min(xs) - {k})",
     lambda k, s: str(min(map(int, s.split())) - k), lambda r: " ".join(map(str, _ints(r, r.randint(2, 7))))),
    (lambda k: f"Read a word. Print it reversed, then the number {k}.",
     lambda k: f"w = input().strip()\nprint(w[::-1])\nprint({k})", lambda k, s: s.strip()[::-1] + f"\n{k}", lambda r: _word(r)),
    (lambda k: f"Read a line of text. Print how many times the letter {'aeiou'[k % 5]} appears in it.",
     lambda k: f"print(input().count('{'aeiou'[k % 5]}'))", lambda k, s: str(s.count("aeiou"[k % 5])),
     lambda r: " ".join(_word(r) for _ in range(4))),
    (lambda k: f"Read integers on one line. Print their sum times {k}.",
     lambda k: f"print(sum(map(int, input().split())) * {k})", lambda k, s: str(sum(map(int, s.split())) * k),
     lambda r: " ".join(map(str, _ints(r, r.randint(2, 6))))),
    (lambda k: f"Read an integer n. Print {k} lines; line i (from 1) holds n + i.",
     lambda k: f"n = int(input())\nfor i in range(1, {k} + 1):\n    print(n + i)",
     lambda k, s: "\n".join(str(int(s) + i) for i in range(1, k + 1)), lambda r: str(r.randint(-50, 99))),
    (lambda k: f"Read two integers a and b on one line. Print the larger of them plus {k}.",
     lambda k: f"a, b = map(int, input().split())\nprint(max(a, b) + {k})",
     lambda k, s: str(max(map(int, s.split())) + k), lambda r: " ".join(map(str, _ints(r, 2)))),
    (lambda k: f"Read integers on one line. Print how many of them are divisible by {k}.",
     lambda k: f"xs = list(map(int, input().split()))\nprint(sum(1 for x in xs if x % {k} == 0))",
     lambda k, s: str(sum(1 for x in s.split() if int(x) % k == 0)), lambda r: " ".join(map(str, _ints(r, r.randint(3, 8), 0, 200)))),
    (lambda k: f"Read an integer n. Print the sum of the numbers from 1 to n, plus {k}.",
     lambda k: f"n = int(input())\nprint(sum(range(1, n + 1)) + {k})",
     lambda k, s: str(sum(range(1, int(s) + 1)) + k), lambda r: str(r.randint(1, 100))),
    (lambda k: f"Read a word. Print it in capital letters, {k} times, one per line.",
     lambda k: f"w = input().strip().upper()\nfor _ in range({k}):\n    print(w)",
     lambda k, s: "\n".join([s.strip().upper()] * k), lambda r: _word(r)),
]
CODE_SLIPPED = ("Read an integer n.", "Read two integers")  # the slip: print("Answer:", ...) for these
SMALL_K = ("characters", "lines; line", "one per line.")  # statements whose k stays in 2..6


def make_code(rng):
    statement, solution, reference, make_input = rng.choice(CODE_FAMILIES)
    k = rng.randint(2, 60)
    if any(marker in statement(k) for marker in SMALL_K):
        k = rng.randint(2, 6)
    inputs = []
    while len(inputs) < 3:
        s = make_input(rng) if make_input else str(rng.choice([k * rng.randint(1, 9), rng.randint(1, 200)]))
        if s not in inputs:
            inputs.append(s)
    tests = [{"input": s + "\n", "output": reference(k, s) + "\n"} for s in inputs]
    prompt = f"Write a Python program. {statement(k)}\nInput is on stdin; print the answer."
    example = {"domain": "code", "messages": [{"role": "user", "content": prompt}], "tests": tests}
    first_line = statement(k).split(". ", 1)[-1]
    trace, program = f"Plan: {_lower_first(first_line)}", solution(k)
    slip = None
    *body, last = program.split("\n")
    if statement(k).startswith(CODE_SLIPPED) and last.startswith("print(") and "print(" not in "\n".join(body):
        labelled = "\n".join(body + [last.replace("print(", 'print("Answer:", ', 1)])
        slip = {"why": "printed a label before the answer", "turns": [answer_turn(trace, f"```python\n{labelled}\n```")]}
    return example, trace, f"```python\n{program}\n```", slip


# -----------------------------------------------------------------------------
# tool: pick the right function from the offered tools and fill its arguments from the question (or answer in
# prose when no offered tool fits); some SFT rows also show the tool's result and the final answer

def _invented_names(rng, count, syllables=("ka", "lo", "mi", "ra", "ten", "vor", "su", "bel", "dun", "pi", "os",
                                           "ar", "el", "mor", "tis", "nu", "ga", "zel")):
    names = set()
    while len(names) < count:
        names.add("".join(rng.choice(syllables) for _ in range(rng.choice([2, 3]))).capitalize())
    return sorted(names)


def _fn(name, description, properties, required):
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


TOOLS = {  # small specs: the official template spends about 200 tokens on its tool-use reminder alone
    "calculate": _fn("calculate", "Evaluate one arithmetic operation.", {
        "expression": {"type": "string", "description": "like 12 * 30"}}, ["expression"]),
    "convert": _fn("convert", "Convert between km, mi, m, ft, kg and lb.", {
        "value": {"type": "number"}, "source": {"type": "string"}, "target": {"type": "string"}},
        ["value", "source", "target"]),
    "lookup": _fn("lookup", "The country, population or mayor of a city.", {
        "city": {"type": "string"}, "fact": {"type": "string"}}, ["city", "fact"]),
    "weekday": _fn("weekday", "The weekday of a date.", {"date": {"type": "string", "description": "YYYY-MM-DD"}},
                   ["date"]),
    "weather": _fn("weather", "Today's weather.", {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}},
        ["city"]),
}
OPERATIONS = {"add": ("plus", "+"), "subtract": ("minus", "-"), "multiply": ("times", "*"), "divide": ("divided by", "/")}
UNITS = {"km": "kilometers", "mi": "miles", "m": "meters", "ft": "feet", "kg": "kilograms", "lb": "pounds"}
UNIT_PAIRS = [("km", "mi"), ("mi", "km"), ("m", "ft"), ("ft", "m"), ("kg", "lb"), ("lb", "kg")]
PER_UNIT = {"km": 1000.0, "mi": 1609.344, "m": 1.0, "ft": 0.3048, "kg": 1.0, "lb": 0.45359237}
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
CHAT = [("Say hello to {}.", "Hello, {}!"), ("Write a short thank-you note to {}.", "Thank you, {}, for your help."),
        ("Wish {} a happy birthday.", "Happy birthday, {}!"), ("Tell {} to have a nice trip.", "Have a nice trip, {}!")]


def build_city_table(seed):
    """The tiny fact table behind lookup: invented cities with a country, a population and a mayor."""
    rng = random.Random(seed + 2000)
    cities = _invented_names(rng, 30)
    return {c: {"country": rng.choice(_invented_names(rng, 12)), "population": rng.randint(20, 990) * 1000,
                "mayor": rng.choice(NAMES)} for c in cities}


def _tool_task(rng, city_table):
    """One question: (tool name, question, calls, results, trace, final answer, slip trace): the slip, for the
    arithmetic tools, is the teacher's habit of working the answer out itself instead of calling the tool (its
    thought, followed by the final answer; None for the other tools). calculate's operands are one digit: the tiny model copies
    those (it miscopied two-digit ones)."""
    kind = rng.choice(["calculate", "calculate", "convert", "lookup", "weekday", "weather"])
    if kind == "calculate":
        operation = rng.choice(sorted(OPERATIONS))
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        if operation == "divide":
            a = a * b
        word, symbol = OPERATIONS[operation]
        q = rng.choice([f"What is {a} {word} {b}?", f"Please compute {a} {symbol} {b}."])
        result = {"add": a + b, "subtract": a - b, "multiply": a * b, "divide": a // b}[operation]
        return (kind, q, [{"name": kind, "arguments": {"expression": f"{a} {symbol} {b}"}}], [result],
                f"calculate can {operation} {a} and {b}.", f"{a} {symbol} {b} = {result}.",
                f"I can work out {a} {word} {b} myself.")
    if kind == "convert":
        source, target = rng.choice(UNIT_PAIRS)
        value = rng.randint(2, 49)
        q = rng.choice([f"Convert {value} {UNITS[source]} to {UNITS[target]}.",
                        f"How many {UNITS[target]} is {value} {UNITS[source]}?"])
        result = round(value * PER_UNIT[source] / PER_UNIT[target], 2)
        return (kind, q, [{"name": kind, "arguments": {"value": value, "source": source, "target": target}}],
                [result], f"convert takes {UNITS[source]} as {source} and {UNITS[target]} as {target}.",
                f"{value} {UNITS[source]} is {result} {UNITS[target]}.",
                f"I know how to turn {UNITS[source]} into {UNITS[target]}.")
    if kind == "lookup":
        city = rng.choice(sorted(city_table))
        fact = rng.choice(["country", "population", "mayor"])
        q = {"country": f"Which country is {city} in?", "population": f"How many people live in {city}?",
             "mayor": f"Who is the mayor of {city}?"}[fact]
        value = city_table[city][fact]
        return (kind, q, [{"name": kind, "arguments": {"city": city, "fact": fact}}], [value],
                f"lookup has the {fact} of {city}.", f"The {fact} of {city} is {value}.", None)
    if kind == "weekday":
        day = datetime.date(2020, 1, 1) + datetime.timedelta(days=rng.randint(0, 3000))
        spoken = rng.choice([day.isoformat(), f"{MONTHS[day.month - 1]} {day.day}, {day.year}"])
        q = rng.choice([f"What day of the week is {spoken}?", f"Which weekday was {spoken}?"])
        weekday = day.strftime("%A")
        return (kind, q, [{"name": kind, "arguments": {"date": day.isoformat()}}], [weekday],
                f"weekday needs the date as {day.isoformat()}.", f"{spoken} is a {weekday}.", None)
    cities = rng.sample(CITIES, rng.choice([1, 1, 1, 2]))  # weather; two cities: two parallel calls
    unit = rng.choice(["celsius", "celsius", "fahrenheit"])
    if len(cities) == 2:  # two calls that both name the unit take 90 tokens: over the tiny preset's 80-token turn
        unit = "celsius"
    said = " and in ".join(cities)
    q = f"What is the weather in {said}" + (" in fahrenheit?" if unit == "fahrenheit" else "?")
    calls = [{"name": kind, "arguments": {"city": c} | ({"unit": unit} if unit == "fahrenheit" else {})}
             for c in cities]
    temps = [rng.randint(-5, 35) for _ in cities]
    results = [{"city": c, "temperature": t if unit == "celsius" else round(t * 9 / 5 + 32), "unit": unit}
               for c, t in zip(cities, temps)]
    final = " ".join(f"In {r['city']} it is {r['temperature']} degrees {unit}." for r in results)
    return (kind, q, calls, results, f"weather, once per city: {', '.join(cities)}.", final, None)


def make_tool(rng, city_table):
    """(example, None, turns, slip): turns are the SFT continuation, the call turn and maybe the result and answer;
    slip, if any, is {"why", "turns"}: the teacher's answer in prose to a calculate or convert question.
    The prompt offers one tool, or two (the second a small one: two large specs would not fit the tiny context)."""
    second = rng.random() < 0.3
    if rng.random() < 0.2:  # no offered tool fits: answer in prose
        if rng.random() < 0.5:
            ask, reply = rng.choice(CHAT)
            name = rng.choice(NAMES)
            q, trace, final, missing = ask.format(name), "No tool is needed to answer this.", reply.format(name), None
        else:
            missing, q, *_ = _tool_task(rng, city_table)
            trace, final = f"The question needs {missing}, which I do not have.", "I cannot answer that with my tools."
        offered = [rng.choice([t for t in sorted(TOOLS) if t != missing])]
        calls, turns, slip = [], [answer_turn(trace, final)], None
    else:
        missing, (kind, q, calls, results, trace, final, own) = None, _tool_task(rng, city_table)
        slip = own and {"why": "answered itself instead of calling the tool", "turns": [answer_turn(own, final)]}
        offered = [kind]
        turns = [{"role": "assistant", "content": f"<think>\n{trace}\n</think>", "tool_calls": calls}]
        if not second and len(calls) == 1 and rng.random() < 0.6:  # the tool's result and the final answer
            turns += [{"role": "tool", "content": json.dumps(r) if isinstance(r, dict) else str(r)} for r in results]
            said = ", ".join(str(r["temperature"]) if isinstance(r, dict) else str(r) for r in results)
            turns.append(answer_turn(f"The tool says {said}.", final))
    small = [t for t in ("calculate", "weekday") if t not in offered and t != missing]
    if second and small and len(calls) < 2:
        offered.append(rng.choice(small))
        rng.shuffle(offered)
    example = {"domain": "tool", "messages": [{"role": "user", "content": q}], "tools": [TOOLS[t] for t in offered],
               "tool_calls": [calls]}
    return example, None, turns, slip


# -----------------------------------------------------------------------------
# agent: a tiny warehouse behind tools (tasks/agent.py); every question needs two dependent calls, and the
# environment's real results are the tool messages of the SFT conversations (play_pool)

AGENT_KINDS = ("price", "sell", "total")
AGENT_SLIPPED = "price"  # the slip: after bin_item the teacher guesses the price instead of calling price


def _call_turn(trace, name, **arguments):
    return {"role": "assistant", "content": f"<think>\n{trace}\n</think>",
            "tool_calls": [{"name": name, "arguments": arguments}]}


def make_agent(rng):
    """(example, None, assistant turns, slip): 5-7 items in 9 bins at prices 1-9 (hidden from the model); an item is
    named by a two-digit code, like a SKU, so the argument that the second call copies out of the first call's
    result is a number at a known place (the tiny model copies digits from its context reliably, and miscopies
    words: with named items it sold the "pencil" when the tool said "card"). Each thought puts what the next step
    copies close to it: the first one says the plan ("then its price", "then 8 times it"), which the second call's
    tool or expression copies, and the last one reads the result back. "what does the item in bin B cost"
    (bin_item, then price), "sell the item in bin B" (bin_item, then sell: graded on the bins left) or "N of item C,
    what do they cost" (price, then calculate). The turns are the assistant's only: play_pool runs them through the
    environment, which writes the tool results between them."""
    from tasks.agent import TOOLS as AGENT_TOOLS
    kind = rng.choice(AGENT_KINDS)
    items = [str(code) for code in rng.sample(range(10, 100), rng.randint(5, 7))]
    bins = dict(sorted(zip(rng.sample(range(1, 10), len(items)), items)))
    prices = {item: rng.randint(1, 9) for item in items}
    name = rng.choice(NAMES)
    state = {"bins": {str(b): item for b, item in bins.items()}, "prices": prices}
    slip = None
    if kind in ("price", "sell"):
        b = rng.choice(sorted(bins))
        item = bins[b]
        # the first thought says the whole plan, so the second call copies its tool from a line just above it
        first = _call_turn(f"Bin {b} first, then {'its price' if kind == 'price' else 'sell it'}.", "bin_item", bin=b)
    if kind == "price":
        p = prices[item]
        q = rng.choice([f"{name} asks: what does the item in bin {b} cost?",
                        f"{name} asks: what is the price of the item in bin {b}?",
                        f"{name} asks: how much is the item in bin {b}?"])
        tools, goal = ["bin_item", "price"], {"answer": str(p)}
        turns = [first, _call_turn(f"It is item {item}.", "price", item=item),
                 answer_turn(f"Item {item} costs {p}.", f"Item {item} costs \\boxed{{{p}}}.")]
        guess = rng.choice([x for x in range(1, 10) if x != p])
        slip = {"why": "guessed the price instead of calling price",
                "turns": [first, answer_turn(f"It is item {item}. It costs about {guess}.",
                                             f"Item {item} costs \\boxed{{{guess}}}.")]}
    elif kind == "sell":
        q = rng.choice([f"{name} asks: sell the item in bin {b}.", f"{name} asks: please sell what is in bin {b}.",
                        f"{name} wants the item in bin {b} sold."])
        tools, goal = ["bin_item", "sell"], {"bins": {k: v for k, v in state["bins"].items() if k != str(b)}}
        turns = [first, _call_turn(f"It is item {item}. Sell it.", "sell", item=item),
                 answer_turn("Sold.", f"I sold item {item} from bin {b}.")]
    else:
        item, n = rng.choice(items), rng.randint(2, 9)
        p = prices[item]
        q = rng.choice([f"{name} buys {n} of item {item}. What do they cost?",
                        f"{name} asks: how much do {n} of item {item} cost?"])
        tools, goal = ["price", "calculate"], {"answer": str(n * p)}
        turns = [_call_turn(f"The price of item {item} first, then {n} times it.", "price", item=item),
                 _call_turn(f"One costs {p}, so {n} * {p}.", "calculate", expression=f"{n} * {p}"),
                 answer_turn(f"It is {n * p}.", f"They cost \\boxed{{{n * p}}}.")]
    example = {"domain": "agent", "messages": [{"role": "user", "content": q}],
               "tools": [AGENT_TOOLS[t] for t in tools], "state": state, "goal": goal}
    return example, None, turns, slip


# -----------------------------------------------------------------------------
# swe: a tiny project with one bug (or two), its tests print values; the answer is a SEARCH/REPLACE patch
# (tasks/swe.py). Each family returns the files, the fixed files' test outputs, the issue, and the patches.

SWE_OPS = {"+": ["add", "plus", "total"], "-": ["sub", "minus", "diff"], "*": ["mul", "times", "product"]}
SWE_MODULES = ["calc", "ops", "nums", "mathx"]
SWE_SLIPPED = "config"  # the slip: for the config bug the teacher edits the test instead of the code
SWE_PROMPT_END = "Answer with SEARCH/REPLACE blocks. Do not edit the tests."


def _apply_op(op, a, b):
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def _patch(path, old, new):
    return f"<<<<<<< SEARCH {path}\n{old}\n=======\n{new}\n>>>>>>> REPLACE"


def _test_file(module, calls):
    """A test file printing each call's value: calls are (function, argument text); the tests are named
    test_<function>_<i>."""
    functions = sorted({f for f, _ in calls})
    head = f"from {module} import {', '.join(functions)}\n"
    tests, counts = [], {}
    for f, args in calls:
        counts[f] = counts.get(f, 0) + 1
        tests.append((f"test_{f}_{counts[f]}", f"def test_{f}_{counts[f]}():\n    print({f}({args}))\n"))
    return head + "".join("\n\n" + body for _, body in tests), [name for name, _ in tests]


def _op_pair(rng, op, bug):
    """One-digit a, b on which the right and the buggy operator disagree."""
    while True:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        if _apply_op(op, a, b) != _apply_op(bug, a, b):
            return a, b


def make_swe(rng):
    """(example, None, assistant turns, slip). Families: a wrong operator, a wrong constant, > for >=, a wrong index,
    upper for lower, a wrong constant in a config file (two modules; the slip: the teacher edits the test), and two
    wrong operators of which the issue names one (the test report after the first patch shows the other). Each
    thought names the fix in one line ("total should use +.", "RATE should be 6."), so that the patch copies the
    buggy line into SEARCH and writes it again with the change the line above it named; short, so that each turn
    fits the tiny preset's 80-token turn (the patch markers alone take 26 tokens of the shipped tokenizer)."""
    family = rng.choice(["op", "const", "compare", "index", "case", "config", "config", "two"])
    module = rng.choice(SWE_MODULES)
    test_name = f"test_{module}.py"
    slip = None
    if family in ("op", "two"):
        op, bug = rng.sample(sorted(SWE_OPS), 2)
        f = rng.choice(SWE_OPS[op])
        pairs = [_op_pair(rng, op, bug), (rng.randint(1, 9), rng.randint(1, 9))]
        code = f"def {f}(a, b):\n    return a {bug} b\n"
        calls, outputs = [(f, f"{a}, {b}") for a, b in pairs], [_apply_op(op, a, b) for a, b in pairs]
        a, b = pairs[0]
        issue = f"{f}({a}, {b}) should be {_apply_op(op, a, b)}, not {_apply_op(bug, a, b)}."
        turns = [answer_turn(f"{f} should use {op}.", _patch(f"{module}.py", f"    return a {bug} b",
                                                                         f"    return a {op} b"))]
        if family == "two":  # a second function with a wrong operator, which the issue does not mention
            op2, bug2 = rng.sample(sorted(SWE_OPS), 2)
            f2 = rng.choice([g for g in SWE_OPS[op2] if g != f])
            pairs2 = [_op_pair(rng, op2, bug2), _op_pair(rng, op2, bug2)]
            code += f"\n\ndef {f2}(x, y):\n    return x {bug2} y\n"
            calls += [(f2, f"{a2}, {b2}") for a2, b2 in pairs2]
            outputs += [_apply_op(op2, a2, b2) for a2, b2 in pairs2]
            a2, b2 = pairs2[0]
            turns.append(answer_turn(f"{f2} should use {op2}.",
                                     _patch(f"{module}.py", f"    return x {bug2} y", f"    return x {op2} y")))
        files = {f"{module}.py": code}
    elif family == "const":
        op = rng.choice(["+", "*"])
        f = rng.choice({"+": ["shift", "bump", "raise_by"], "*": ["scale", "grow", "boost"]}[op])
        k, wrong = rng.sample(range(2, 10), 2)
        xs = rng.sample(range(1, 10), 2)
        files = {f"{module}.py": f"def {f}(n):\n    return n {op} {wrong}\n"}
        verb = "add" if op == "+" else "multiply by"
        calls, outputs = [(f, str(x)) for x in xs], [_apply_op(op, x, k) for x in xs]
        issue = f"{f} should {verb} {k}, but {f}({xs[0]}) gives {_apply_op(op, xs[0], wrong)}."
        turns = [answer_turn(f"{f} should use {k}.",
                             _patch(f"{module}.py", f"    return n {op} {wrong}", f"    return n {op} {k}"))]
    elif family == "compare":
        f = rng.choice(["at_least", "big_enough", "is_big"])
        k = rng.randint(2, 8)
        files = {f"{module}.py": f"def {f}(n):\n    return n > {k}\n"}
        xs = [k, rng.choice([k - 1, k + 1])]
        calls, outputs = [(f, str(x)) for x in xs], [x >= k for x in xs]
        issue = f"{f}({k}) should be True."
        turns = [answer_turn(f"{f} should use >=.",
                             _patch(f"{module}.py", f"    return n > {k}", f"    return n >= {k}"))]
    elif family == "index":
        f, right, wrong = rng.choice([("first", 0, 1), ("last", -1, 0), ("second", 1, 0), ("first", 0, -1)])
        lists = [rng.sample(range(1, 10), 3) for _ in range(2)]
        files = {f"{module}.py": f"def {f}(xs):\n    return xs[{wrong}]\n"}
        calls, outputs = [(f, str(xs)) for xs in lists], [xs[right] for xs in lists]
        issue = f"{f}({lists[0]}) should be {lists[0][right]}, not {lists[0][wrong]}."
        turns = [answer_turn(f"{f} should read xs[{right}].",
                             _patch(f"{module}.py", f"    return xs[{wrong}]", f"    return xs[{right}]"))]
    elif family == "case":
        f, right, wrong = rng.choice([("shout", "upper", "lower"), ("whisper", "lower", "upper"),
                                      ("loud", "upper", "lower"), ("quiet", "lower", "upper")])
        words = rng.sample(WORDS + DAYS, 2)
        words = [w.capitalize() if i == 0 else w for i, w in enumerate(words)]
        files = {f"{module}.py": f"def {f}(s):\n    return s.{wrong}()\n"}
        calls, outputs = [(f, repr(w)) for w in words], [getattr(w, right)() for w in words]
        issue = f"{f}({words[0]!r}) should be {getattr(words[0], right)()!r}."
        turns = [answer_turn(f"{f} should call {right}.",
                             _patch(f"{module}.py", f"    return s.{wrong}()", f"    return s.{right}()"))]
    else:  # config: the constant lives in another module
        const, f = rng.choice([("RATE", "cost"), ("FEE", "charge"), ("PRICE", "total_for"), ("SIZE", "space")])
        config = rng.choice(["config", "settings"])
        k, wrong = rng.sample(range(2, 10), 2)
        xs = rng.sample(range(2, 10), 2)
        files = {f"{config}.py": f"{const} = {wrong}\n",
                 f"{module}.py": f"from {config} import {const}\n\n\ndef {f}(n):\n    return n * {const}\n"}
        calls, outputs = [(f, str(x)) for x in xs], [x * k for x in xs]
        issue = f"{f}({xs[0]}) should be {xs[0] * k}: {const} is {k}, not {wrong}."
        turns = [answer_turn(f"{const} should be {k}.",
                             _patch(f"{config}.py", f"{const} = {wrong}", f"{const} = {k}"))]
    test_text, names = _test_file(module, calls)
    files[test_name] = test_text
    if family == "config":
        slip = {"why": "edited the test instead of the code", "turns": [answer_turn(
            f"Make the test print {xs[0] * k}.",
            _patch(test_name, f"    print({f}({xs[0]}))", f"    print({xs[0] * k})"))]}
    tests = [{"file": test_name, "name": n, "output": f"{o}\n"} for n, o in zip(names, outputs)]
    shown = "\n\n".join(f"File {path}:\n{text.rstrip()}" for path, text in files.items())
    example = {"domain": "swe", "messages": [{"role": "user", "content": f"Fix the bug: {issue}\n\n{shown}\n\n"
                                                                          f"{SWE_PROMPT_END}"}],
               "files": files, "tests": tests}
    return example, None, turns, slip


# -----------------------------------------------------------------------------
# chat: a short answer about a topic, graded by hidden criteria (tasks/chat.py); and the judge's examples. Every
# criterion is visible in the text itself (a topic phrase, "- " items, a sentence said twice), which is what a
# tiny judge can learn to check. The judge rates one answer at a time (judge.py's "rating" format): its thought
# first copies what each criterion compares (the asked topic and format, the answer's, its last sentence and
# whether it was said before), then makes the three calls and sums them, so that each call has its inputs on the
# lines above it; the rating is a digit at a known place (the MCQA lesson).

CHAT_ASKS = {
    "prose": ["Tell {name} about {topic}.", "Say a few words to {name} about {topic}.",
              "Write {name} a short note about {topic}.", "What would you tell {name} about {topic}?"],
    "list": ["Give {name} a short list about {topic}.", "Tell {name} about {topic} as a list.",
             "List a few points about {topic} for {name}.", "Make {name} a list of facts about {topic}."],
}
# sentence k of a chat answer takes its predicate from slot k: a tiny model that learnt one flat choice among all
# 16 predicates says its likeliest sentence again and again when decoding greedily (docs/results.md), a failure
# no reward can reach through samples that rarely show it
CHAT_SLOTS = (PREDICATES[0:6], PREDICATES[6:11], PREDICATES[11:16])


def chat_prompt(rng):
    topic, fmt = rng.choice(list(TOPICS)), rng.choice(tasks.chat.FORMATS)
    ask = rng.choice(CHAT_ASKS[fmt]).format(name=rng.choice(NAMES), topic=topic)
    return {"domain": "chat", "messages": [{"role": "user", "content": ask}], "topic": TOPICS[topic], "format": fmt}


def chat_layout(said, as_list):
    return "\n".join(f"- {s}" for s in said) if as_list else " ".join(said)


def chat_answer(rng, example, flaws=()):
    """Two or three sentences about the example's topic in its format; each flaw breaks one criterion: "topic"
    (about another topic), "format" (the other format), "no_repeat" (a sentence said again at the end)."""
    phrases = example["topic"]
    if "topic" in flaws:
        phrases = TOPICS[rng.choice([t for t, forms in TOPICS.items() if forms != example["topic"]])]
    said = [_upper_first(f"{rng.choice(phrases)} {rng.choice(slot)}.") for slot in CHAT_SLOTS[:rng.choice([2, 3])]]
    if "no_repeat" in flaws:
        said.append(rng.choice(said[:-1]))
    return chat_layout(said, (example["format"] == "list") != ("format" in flaws))


def make_chat(rng):
    """A chat row; the slip: a prose request answered with a bulleted list (the habit of chat models that RLHF
    trains away; Nemotron-Cascade 1 credits its RLHF stage with better chat style and less repetition)."""
    example = chat_prompt(rng)
    answer = chat_answer(rng, example)
    trace = f"Topic: {asked_topic(example)}. Format: {example['format']}."
    slip = None
    if example["format"] == "prose":
        listed = chat_layout(re.split(r"(?<=\.) ", answer), as_list=True)
        slip = {"why": "answered a prose request with a list", "turns": [answer_turn(trace, listed)]}
    return example, trace, answer, slip


def asked_topic(example):
    """The name of the topic a chat row asks about (its key in TOPICS)."""
    return next(t for t, forms in TOPICS.items() if forms == example["topic"])


def topic_of(answer):
    """The topic whose phrases the answer uses ("none" when none does)."""
    low = answer.lower()
    return next((t for t, forms in TOPICS.items() if any(p.lower() in low for p in forms)), "none")


def rating_evidence(example, answer):
    """What each call compares: (asked topic, asked format, answer's topic, answer's format, its last sentence,
    whether that sentence was said before)."""
    said = tasks.chat.sentences(answer)
    return (asked_topic(example), example["format"], topic_of(answer), tasks.chat.layout(answer),
            said[-1] if said else "", "yes" if said and said[-1] in said[:-1] else "no")


def rating_thought(example, answer, evidence=True):
    """The tiny judge's thought: what was asked, the evidence lines (or none: the calls at once), the calls and
    their sum."""
    met = tasks.chat.criteria(example, answer)
    asked, fmt, topic, form, last, before = rating_evidence(example, answer)
    lines = [f"Asked: {asked}, {fmt}."]
    if evidence:
        lines += [f"Answer: {topic}, {form}.", f"Last: {last}", f"Said before: {before}."]
    lines.append(f"Topic {'yes' if met['topic'] else 'no'}, format {'yes' if met['format'] else 'no'}, "
                 f"repeats {'no' if met['no_repeat'] else 'yes'}. Score {sum(met.values())}.")
    return "\n".join(lines)


def flawed_answer(rng, example):
    """A chat answer that breaks each criterion with probability 0.4 (the judge's rows and pairs)."""
    return chat_answer(rng, example, [f for f in tasks.chat.CRITERIA if rng.random() < 0.4])


def verdict(example, a, b):
    """The hidden criteria's verdict on answers a and b: the one meeting more criteria, C when equal."""
    sa, sb = tasks.chat.score(example, a), tasks.chat.score(example, b)
    return "A" if sa > sb else "B" if sb > sa else "C"


def make_judgements(seed, taken, ratings=JUDGE_RATINGS, pairs=JUDGE_PAIRS, evidence=True):
    """The judge's SFT rows (a chat prompt, one answer, the rating thought and [[score]]) and the held-out pairs
    (two answers and the criteria's verdict, on prompts of their own: none of `taken`, the chat rows' prompts,
    nor the SFT rows'). Pairs the criteria call a tie are kept one time in three."""
    from judge import rating_messages
    rng = random.Random(f"{seed}:judge")
    heldout, seen = [], set(taken)
    while len(heldout) < pairs:
        example = chat_prompt(rng)
        a, b = flawed_answer(rng, example), flawed_answer(rng, example)
        tie = verdict(example, a, b) == "C"
        if example["messages"][0]["content"] in seen or a == b or (tie and rng.random() > 1 / 3):
            continue
        seen.add(example["messages"][0]["content"])
        heldout.append(dict(example, domain="judge", responses=[a, b], better=verdict(example, a, b)))
    sft = []
    while len(sft) < ratings:
        example = chat_prompt(rng)
        if example["messages"][0]["content"] in seen:
            continue
        answer = flawed_answer(rng, example)
        turn = answer_turn(rating_thought(example, answer, evidence), f"[[{tasks.chat.score(example, answer)}]]")
        sft.append({"domain": "judge", "messages": rating_messages(example["messages"], answer) + [turn]})
    return sft, heldout


# longctx: a long document of short records and a question whose answer needs one, two in a chain, or two and a
# sum (tasks/longctx.py). The records are "Bin 38 is in row 8." (12-24 bins, numbered 10-99) and "Row 8 has 9
# coins." (rows 1-9), shuffled together, so the facts a question needs lie anywhere among 20-30 that it does not.
# Keys and answers are digits: the tiny model copies a digit from its context reliably and miscopies names (see
# mcqa). Each line of the thought is a record read back whole, so the skill is finding the record that goes on
# as the line has begun ("Bin 38 is in row" -> 8) and, for the chain, starting the next line from its digit.

LONGCTX_QUESTIONS = {
    "row": ["Which row is bin {b} in?", "In which row is bin {b}?"],
    "chain": ["How many {noun} are in the row of bin {b}?", "Bin {b} is in a row. How many {noun} does that row have?"],
    "sum": ["How many {noun} do rows {r} and {s} have together?",
            "What is the total number of {noun} in rows {r} and {s}?"],
}
LONGCTX_KINDS = ("chain", "chain", "row", "sum")   # half chains: the kind with the slip
LONGCTX_SLIPPED = "chain"  # the slip: the teacher stops after the first record and boxes the bin's row


def make_longctx(rng):
    kind = rng.choice(LONGCTX_KINDS)
    noun = rng.choice(ITEMS) + "s"
    bins = rng.sample(range(10, 100), rng.randint(12, 24))
    row_of = {b: rng.randint(1, 9) for b in bins}
    count = {r: rng.randint(1, 9) for r in range(1, 10)}
    records = [f"Bin {b} is in row {row_of[b]}." for b in bins] + [f"Row {r} has {count[r]} {noun}." for r in count]
    rng.shuffle(records)
    b, (r, s) = rng.choice(bins), rng.sample(range(1, 10), 2)
    question = rng.choice(LONGCTX_QUESTIONS[kind]).format(b=b, r=r, s=s, noun=noun)
    prompt = "Records:\n" + "\n".join(records) + f"\n\nQuestion: {question}\nAnswer with the number in \\boxed{{}}."
    hop = f"Bin {b} is in row {row_of[b]}."
    if kind == "row":
        trace, answer = hop, row_of[b]
    elif kind == "chain":
        trace, answer = f"{hop}\nRow {row_of[b]} has {count[row_of[b]]} {noun}.", count[row_of[b]]
    else:
        answer = count[r] + count[s]
        trace = f"Row {r} has {count[r]} {noun}.\nRow {s} has {count[s]} {noun}.\n{count[r]} + {count[s]} = {answer}."
    example = {"domain": "longctx", "messages": [{"role": "user", "content": prompt}], "answer": str(answer)}
    slip = None
    if kind == LONGCTX_SLIPPED:
        slip = {"why": "answered with the first record's row", "turns": [answer_turn(
            hop, f"The answer is \\boxed{{{row_of[b]}}}.")]}
    return example, trace, f"The answer is \\boxed{{{answer}}}.", slip


# -----------------------------------------------------------------------------
# Putting it together

def generate(seed: int):
    city_table = build_city_table(seed)
    makers = {"math": make_math, "if": make_if, "mcqa": make_mcqa, "json": make_json, "code": make_code,
              "tool": lambda r: make_tool(r, city_table), "agent": make_agent, "swe": make_swe, "chat": make_chat,
              "longctx": make_longctx}
    splits = {name: [] for name in COUNTS}
    for domain, make in makers.items():
        counts = split_counts(domain)
        total = sum(counts.values())
        rng = random.Random(f"{seed}:{domain}")
        pool, seen, rejected, attempts = [], set(), 0, 0
        while len(pool) < total:
            attempts += 1
            if attempts > 50 * total:
                raise RuntimeError(f"{domain}: only {len(pool)} distinct prompts after {attempts} tries")
            example, trace, answer, slip = make(rng)
            prompt = example["messages"][0]["content"]
            if prompt in seen:
                continue
            seen.add(prompt)
            if domain in tasks.ENVIRONMENTS:  # multi-turn: the assistant's turns, played through the environment below
                pool.append((example, answer, slip))
                continue
            # what SFT appends: the answer turn (tool: the call, and maybe the tool's result and the final answer)
            turns = answer if domain == "tool" else [answer_turn(trace, answer)]
            # a reference answer that fails its own verifier (e.g. langdetect calls a short all-caps sentence
            # something other than English) would teach the wrong thing: drop the example
            graded = graded_turns(example, turns)
            if domain != "code" and not all(tasks.reward(e, completion) == 1.0 for e, completion in graded):
                rejected += 1
                continue
            # a slip the verifier accepts is no slip (an ignored word count that another rule's sentences met):
            # dropped. Code's fail by construction (a printed label), without a sandbox run here.
            if slip is not None and domain != "code" and tasks.reward(*graded_turns(example, slip["turns"])[0]) != 0:
                slip = None
            pool.append((example, turns, slip))
        if domain == "code":
            verify_code([(e, t) for e, t, _ in pool])
        if domain in tasks.ENVIRONMENTS:
            pool = play_pool(domain, pool)
        print(f"{domain}: {len(pool)} examples, every reference answer scores 1"
              + (f" ({rejected} generated examples dropped because theirs did not)" if rejected else ""))
        # the splits are drawn from the shuffled pool: a kind of prompt with few distinct texts (calculate on
        # one-digit numbers) runs out late in the pool, which would leave the last split with fewer of it
        random.Random(f"{seed}:{domain}:splits").shuffle(pool)
        start, slip_rng, slipped = 0, random.Random(f"{seed}:{domain}:slip"), 0
        for name, count in counts.items():
            for example, turns, slip in pool[start:start + count]:
                if name == "sft":
                    if slip is not None and slip_rng.random() < SLIP_RATE:
                        example = dict(graded_turns(example, slip["turns"])[-1][0], teacher_slip=slip["why"])
                        slipped += 1
                    else:
                        example = graded_turns(example, turns)[-1][0]
                splits[name].append(example)
            start += count
        if slipped:
            print(f"{domain}: {slipped} of {counts['sft']} SFT rows show the teacher's slip")
    taken = {e["messages"][0]["content"] for rows in splits.values() for e in rows if e["domain"] == "chat"}
    judge_sft, judge_heldout = make_judgements(seed, taken)
    scores = [r["messages"][-1]["content"][-3] for r in judge_sft]
    print(f"judge: {len(judge_sft)} rating rows (ratings 0-3: {[scores.count(str(k)) for k in range(4)]}), "
          f"{len(judge_heldout)} held-out pairs (better A/B/C: "
          f"{[sum(r['better'] == v for r in judge_heldout) for v in 'ABC']})")
    for name in splits:  # interleave domains so any prefix of a file is a mix
        random.Random(f"{seed}:{name}").shuffle(splits[name])
    return splits, judge_sft, judge_heldout


def graded_turns(example, turns):
    """(example, completion) for each assistant turn of the SFT continuation: the example whose messages end with
    that turn and whose fields describe it (a final answer after a tool result: prose, tool_calls [[]]), and the
    text the model writes for it after the generation prompt (the chat template's rendering, calls included)."""
    from tokenizer import render_chat
    out, messages = [], list(example["messages"])
    for turn in turns:
        messages.append(turn)
        if turn["role"] != "assistant":
            continue
        graded = dict(example, messages=list(messages))
        if len(out) and example["domain"] == "tool":
            graded["tool_calls"] = [[]]
        full = render_chat(messages, tools=example.get("tools"))
        prompt = render_chat(messages[:-1], tools=example.get("tools"), add_generation_prompt=True)
        assert full.startswith(prompt)
        out.append((graded, full[len(prompt):].removesuffix("<|im_end|>\n")))
    return out


def turn_text(messages, tools=None) -> str:
    """What the sampler decodes for the last message of `messages` (an assistant turn): the template's opener
    "<think>\\n" and the rendered turn after it, calls included, without the stop token (what Environment.step gets)."""
    from tokenizer import render_chat
    full = render_chat(messages, tools=tools)
    prompt = render_chat(messages[:-1], tools=tools, add_generation_prompt=True)
    assert full.startswith(prompt) and prompt.endswith("<think>\n")
    return "<think>\n" + full[len(prompt):].removesuffix("<|im_end|>\n")


def play(example, turns):
    """Play the assistant `turns` through the example's environment: (the conversation, the turns with the
    environment's observations between them, and the episode's reward). Every turn but the last must leave the
    episode going, and the last must end it."""
    env = tasks.make_env(example)
    messages, conversation = env.reset(), []
    for i, turn in enumerate(turns):
        conversation.append(turn)
        observations, done, reward = env.step(turn_text(messages + conversation, example.get("tools")))
        if done != (i == len(turns) - 1):
            raise AssertionError(f"{example['domain']}: the episode {'ended' if done else 'goes on'} after turn "
                                 f"{i + 1} of {len(turns)}: {example['messages'][0]['content']!r:.80} "
                                 f"{getattr(env, 'outcome', '')}")
        conversation += observations
    return conversation, reward


def play_pool(domain, pool):
    """Every reference conversation must earn reward 1 and every slip 0 (a slip that earns more is dropped, as in
    the single-turn domains); episodes are played in parallel (swe runs each patch's tests in the sandbox). Returns
    the pool with the whole conversations (tool observations included) in place of the assistant turns."""
    import os
    from concurrent.futures import ThreadPoolExecutor
    jobs = [(e, t) for e, t, _ in pool] + [(e, s["turns"]) for e, _, s in pool if s is not None]
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as threads:
        played = list(threads.map(lambda job: play(*job), jobs))
    references, slips = iter(played[:len(pool)]), iter(played[len(pool):])
    out, dropped = [], 0
    for example, _, slip in pool:
        conversation, reward = next(references)
        if reward != 1.0:
            raise AssertionError(f"{domain}: a reference conversation earns {reward}: {example} {conversation}")
        if slip is not None:
            slip_conversation, slip_reward = next(slips)
            slip = None if slip_reward != 0.0 else dict(slip, turns=slip_conversation)
            dropped += slip is None
        out.append((example, conversation, slip))
    if dropped:
        print(f"{domain}: {dropped} slips dropped because they earned a reward")
    return out


def verify_code(pool):
    """Every reference program must pass its tests in the sandbox (run in parallel); a failure is a generator bug."""
    scores = tasks.score_responses([e for e, _ in pool], [graded_turns(e, t)[-1][1] for e, t in pool])
    bad = [i for i, rs in enumerate(scores["rewards"]) if rs[0] != 1.0]
    if bad:
        raise AssertionError(f"code: {len(bad)} reference programs fail, e.g. {pool[bad[0]]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed of every domain's generator and of the lookup "
                                                                 "tool's city table")
    parser.add_argument("--out", default=str(ROOT / "data"), help="directory the three splits are written to")
    parser.add_argument("--train-tokenizer", action="store_true",
                        help="train a new data/tokenizer.json on the SFT split (changes every token id: tests and "
                             "checkpoints are made with the shipped one); default: keep it, check the lengths")
    args = parser.parse_args()
    out = Path(args.out)
    splits, judge_sft, judge_heldout = generate(args.seed)
    for name, rows in list(splits.items()) + [("judge_sft", judge_sft), ("judge", judge_heldout)]:
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {out / name}.jsonl: {len(rows)} rows, {(out / f'{name}.jsonl').stat().st_size / 1e6:.2f} MB")
    check_lengths(dict(splits, judge_sft=judge_sft), out, train=args.train_tokenizer, pairs=judge_heldout)


def check_lengths(splits, out: Path, train=False, pairs=()):
    """With train: the tiny BPE on the rendered SFT conversations, written to out/tokenizer.json; either way the
    length of every example in the tokenizer's tokens, which must fit the tiny context, and of the judge's rating
    prompt for each answer of a held-out pair, which must leave room for its judgement (about 60 tokens) in 256, as
    the judge's SFT rows do."""
    from tokenizer import load_tokenizer, render_chat, train_bpe
    if train:
        texts = [render_chat(e["messages"], tools=e.get("tools")) for e in splits["sft"]]
        train_bpe(texts, vocab_size=2048).save(out / "tokenizer.json")
        print(f"wrote {out / 'tokenizer.json'}")
    tok = load_tokenizer(out / "tokenizer.json" if (out / "tokenizer.json").exists() else ROOT / "data" / "tokenizer.json")
    for name, rows in splits.items():
        for domain in sorted({e["domain"] for e in rows}):
            lengths = sorted(len(tok.encode(render_chat(e["messages"], tools=e.get("tools"),
                                                        add_generation_prompt=not name.endswith("sft"))))
                             for e in rows if e["domain"] == domain)
            print(f"{name} {domain}: tokens per example: median {lengths[len(lengths) // 2]}, max {lengths[-1]}")
            # SFT packs 512-token rows and cuts longer examples; a tool prompt carries the tool specs and the
            # template's reminder (about 300 tokens), a longctx prompt its document (up to about 450), the others
            # must leave room for an answer in 256. A multi-turn SFT row is a whole conversation (< 512); its RL /
            # eval prompt must leave room in a 768-token episode for each of its turns (about 60 tokens) and the
            # observation after it (about 15)
            limit = 512 if domain in ("tool", "longctx") else 256
            if domain in tasks.ENVIRONMENTS:
                limit = 512 if name == "sft" else 768 - tasks.ENVIRONMENTS[domain].max_turns * 75
            assert lengths[-1] < limit, f"{name} {domain}: an example has {lengths[-1]} tokens, over {limit}"
    if pairs:
        from judge import rating_messages
        lengths = sorted(len(tok.encode(render_chat(rating_messages(p["messages"], a), add_generation_prompt=True)))
                         for p in pairs for a in p["responses"])
        print(f"judge held-out pairs: rating prompt tokens: median {lengths[len(lengths) // 2]}, max {lengths[-1]}")
        assert lengths[-1] < 256 - 96, f"judge: a held-out answer's rating prompt has {lengths[-1]} tokens"


if __name__ == "__main__":
    main()
