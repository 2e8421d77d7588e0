"""
The tasks: what an example is, where examples come from, and how a response is graded.

    load_examples(...)        shipped JSONL, any local JSONL / parquet, or the Nemotron-Cascade-2 HF releases
    reward(example, response) a float in [0, 1]: the text after </think> graded by the example's domain
    score_responses(...)      per-domain pass@1 / avg@K / pass@K over many responses, graded in parallel
    run_program(...)          the code sandbox: one untrusted program, one stdin, in a confined process

One example is one JSON object (DESIGN.md section 8). `messages` is the conversation in chat form; for SFT it
ends with the assistant's answer, for RL and evaluation it ends with the user's turn. The other fields are what
the domain's verifier needs:

    {"domain": "math", "messages": [...], "answer": "42"}
    {"domain": "if",   "messages": [...], "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    {"domain": "mcqa", "messages": [...], "answer": "C", "options": [{"A": "..."}, {"B": "..."}, ...]}
    {"domain": "json", "messages": [...], "schema": {...JSON Schema...}}
    {"domain": "code", "messages": [...], "tests": [{"input": "1 2\\n", "output": "3\\n"}, ...]}

Rows of any other domain (e.g. "sft/chat" from the SFT release) load fine for SFT but have no verifier.

The file reads top to bottom: schema and loaders, the final answer, one section per verifier, the code sandbox,
then scoring. Only the standard library is imported at the top: `datasets`, `jsonschema`, `langdetect` and
`math_verify` are imported where they are used, so `import tasks` is cheap (and the math worker and the
sandbox start fast).
"""

import atexit
import collections
import ctypes
import fcntl
import json
import os
import queue
import random
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
GRADED_DOMAINS = ("math", "if", "mcqa", "json", "code")
ROLES = ("system", "user", "assistant", "tool")


class ExampleError(ValueError):
    """A malformed row: the message names where it is (file:line, or dataset index) and the bad field."""

    def __init__(self, where: str, field: str, problem: str):
        super().__init__(f"{where}: field '{field}': {problem}")
        self.where, self.field, self.problem = where, field, problem


# -----------------------------------------------------------------------------
# Loading examples

def load_examples(path_or_name, split=None, *, config=None, domains=None, limit=None, verbose=True) -> list[dict]:
    """Examples in the schema above, from any of:

    - "tiny" with split "sft" | "rl" | "eval": the shipped data (data/{split}.jsonl);
    - a .jsonl / .json / .parquet file, in our schema or in a released format (mapped row by row);
    - a local copy of a HF dataset (a directory): its *.jsonl / *.parquet files under `config` (a sub-directory,
      e.g. "IF-RL") whose names contain `split` when given;
    - a HF hub name, e.g. "nvidia/Nemotron-Cascade-2-RL-data" with config "IF-RL", loaded with `datasets`.

    Rows without a verifier we have (tool calling, SWE, non-JSON structured output, ...) are skipped and
    counted; the counts are printed. A malformed row raises ExampleError naming where it is and the bad field.
    `domains` keeps only those domains; `limit` stops after that many examples."""
    name = str(path_or_name)
    if name == "tiny":
        if split not in ("sft", "rl", "eval"):
            raise ValueError(f"the shipped data has splits sft, rl and eval, not {split!r}")
        sources = [_file_rows(DATA_DIR / f"{split}.jsonl")]
    elif os.path.isfile(name):
        sources = [_file_rows(Path(name))]
    elif os.path.isdir(name):
        root = Path(name) / config if config else Path(name)
        files = sorted(p for p in root.rglob("*") if p.suffix in (".jsonl", ".parquet", ".json") and p.is_file()
                       and (split is None or split in p.name))
        if not files:
            matching = f" matching '{split}'" if split else ""
            raise FileNotFoundError(f"no .jsonl/.parquet/.json files under {root}{matching}")
        sources = [_file_rows(p) for p in files]
    else:
        sources = [_hub_rows(name, config, split or "train")]

    examples, skipped = [], collections.Counter()
    for rows in sources:
        for where, row in rows:
            example = example_from_row(row, where, hint=config)
            if isinstance(example, str):  # a skip reason
                skipped[example] += 1
                continue
            if domains is None or example["domain"] in domains:
                examples.append(example)
                if limit is not None and len(examples) >= limit:
                    break
        if limit is not None and len(examples) >= limit:
            break
    if verbose and skipped:
        reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.most_common())
        print(f"load_examples({name}{'/' + config if config else ''}): kept {len(examples)}, "
              f"skipped {sum(skipped.values())} rows without a verifier here: {reasons}")
    return examples


def _file_rows(path: Path):
    """(where, row) pairs of one file; `where` is path:line (1-based) or path:row N for parquet."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # installed with datasets
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row {i}", row
        return
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        f.seek(0)
        if path.suffix == ".json" and head == "[":  # a JSON array of rows
            for i, row in enumerate(json.load(f)):
                yield f"{path}:item {i}", row
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ExampleError(f"{path}:{lineno}", "<row>", f"not valid JSON ({e})") from None
            yield f"{path}:{lineno}", row


def _hub_rows(name: str, config, split: str):
    import datasets
    dataset = datasets.load_dataset(name, config, split=split)
    for i, row in enumerate(dataset):
        yield f"{name}{'[' + config + ']' if config else ''}/{split} index {i}", row


def example_from_row(row, where: str = "<row>", hint=None):
    """One row in any supported format -> an example in our schema, or a string: the reason it is skipped.

    Formats, recognised by their fields:
    - ours: has "domain";
    - NeMo-Gym RL rows (Nemotron-Cascade-2-RL-data): have "responses_create_params"; the grader is picked by the
      fields present (instruction_id_list -> if, options + expected_answer -> mcqa, schema_str -> json), which
      may sit at the top level, under "verifier_metadata" or under "metadata";
    - AceReason-style math: "problem" and "answer";
    - SFT rows (Nemotron-Cascade-2-SFT-Data): "messages" (a list, or a JSON string), reasoning inline as
      <think>...</think> (a separate "reasoning_content" is moved inline); the domain is "sft/" + the dataset
      config (`hint`), e.g. "sft/math": these rows have no reference answer, so no verifier."""
    if not isinstance(row, dict):
        raise ExampleError(where, "<row>", f"expected a JSON object, got {type(row).__name__}")
    if "domain" in row:
        return _check_example(dict(row), where)
    if "responses_create_params" in row:
        return _from_nemo_gym(row, where)
    if "problem" in row and "answer" in row:
        problem = _need_str(row, "problem", where)
        prompt = problem.strip() + "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
        return _check_example({"domain": "math", "messages": [{"role": "user", "content": prompt}],
                               "answer": _answer_str(row["answer"], where)}, where)
    if "messages" in row:
        messages = row["messages"]
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as e:
                raise ExampleError(where, "messages", f"a string that is not JSON ({e})") from None
        # no reference answer to grade: the domain says where the row came from, e.g. "sft/math"
        source = row.get("category") or hint or "chat"
        example = {"domain": f"sft/{source}", "messages": _inline_reasoning(messages, where)}
        if row.get("tools"):
            example["tools"] = json.loads(row["tools"]) if isinstance(row["tools"], str) else row["tools"]
        return _check_example(example, where)
    raise ExampleError(where, "<row>", "unrecognised row: expected 'domain', 'responses_create_params', "
                       f"'problem' + 'answer' or 'messages'; got keys {sorted(row)}")


def _from_nemo_gym(row: dict, where: str):
    params = row["responses_create_params"]
    if isinstance(params, str):
        params = json.loads(params)
    if not isinstance(params, dict) or not isinstance(params.get("input"), (list, str)):
        raise ExampleError(where, "responses_create_params.input", "missing: the prompt messages")
    messages = params["input"]
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    messages = [{"role": m.get("role"), "content": _responses_text(m.get("content"))} for m in messages
                if isinstance(m, dict)]
    if params.get("instructions"):  # the Responses API's system prompt
        messages = [{"role": "system", "content": params["instructions"]}] + messages
    agent_ref = row.get("agent_ref") if isinstance(row.get("agent_ref"), dict) else {}
    agent = agent_ref.get("name") or "unknown"  # which NeMo-Gym grader the row was made for

    def field(key):  # verifier fields may sit at the top level, under verifier_metadata, or under metadata
        for holder in (row, row.get("verifier_metadata"), row.get("metadata")):
            if isinstance(holder, str):
                try:
                    holder = json.loads(holder)
                except json.JSONDecodeError:
                    continue
            if isinstance(holder, dict) and holder.get(key) is not None:
                return holder[key]
        return None

    if params.get("tools"):
        return f"tool-calling ({agent})"
    if field("instruction_id_list") is not None:
        ids, kwargs = field("instruction_id_list"), field("kwargs")
        if kwargs is None:
            kwargs = [{} for _ in ids] if isinstance(ids, list) else None
        example = {"domain": "if", "messages": messages, "instruction_id_list": ids, "kwargs": kwargs}
    elif field("options") is not None and field("expected_answer") is not None:
        example = {"domain": "mcqa", "messages": messages, "answer": str(field("expected_answer")).strip().upper(),
                   "options": field("options")}
    elif field("schema_str") is not None:
        schema_type = str(field("schema_type") or "json").lower()
        if schema_type != "json":
            return f"structured output in {schema_type}"
        try:
            schema = json.loads(field("schema_str"))
        except (TypeError, json.JSONDecodeError) as e:
            raise ExampleError(where, "schema_str", f"not a JSON schema string ({e})") from None
        example = {"domain": "json", "messages": messages, "schema": schema}
    else:
        return f"no verifier for agent '{agent}'"
    return _check_example(example, where)


def _responses_text(content) -> str:
    """Responses-API content is a string or a list of parts like {"type": "input_text", "text": "..."}."""
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return content


def _inline_reasoning(messages, where):
    """An assistant message whose thinking is a separate field gets it inline, as the SFT release has it."""
    if not isinstance(messages, list):
        raise ExampleError(where, "messages", f"expected a list of messages, got {type(messages).__name__}")
    out = []
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "assistant" and m.get("reasoning_content"):
            m = dict(m)
            m["content"] = f"<think>\n{m.pop('reasoning_content').strip()}\n</think>\n{m.get('content') or ''}"
        out.append(m)
    return out


def _need_str(row, key, where) -> str:
    if not isinstance(row.get(key), str) or not row[key].strip():
        raise ExampleError(where, key, "missing or not a non-empty string")
    return row[key]


def _answer_str(value, where) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not str(value).strip():
        raise ExampleError(where, "answer", f"missing or not a string/number: {value!r}")
    return str(value).strip()


def _check_example(example: dict, where: str):
    """Validate one example in our schema; returns it (normalised) or raises ExampleError."""
    domain = example.get("domain")
    if not isinstance(domain, str) or not domain:
        raise ExampleError(where, "domain", f"missing or not a string: {domain!r}")
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ExampleError(where, "messages", "missing or empty: expected a list of {role, content}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ExampleError(where, f"messages[{i}].role", f"expected one of {ROLES}, got {m!r:.80}")
        if m.get("content") is None and m.get("tool_calls"):
            continue
        if not isinstance(m.get("content"), str):
            kind = type(m.get("content")).__name__
            raise ExampleError(where, f"messages[{i}].content", f"expected a string, got {kind}")

    if domain == "math":
        example["answer"] = _answer_str(example.get("answer"), where)
    elif domain == "if":
        ids, kwargs = example.get("instruction_id_list"), example.get("kwargs")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise ExampleError(where, "instruction_id_list", f"expected a non-empty list of ids, got {ids!r:.80}")
        if not isinstance(kwargs, list) or len(kwargs) != len(ids):
            raise ExampleError(where, "kwargs", f"expected {len(ids)} dicts, one per instruction, got {kwargs!r:.80}")
        cleaned = []
        for i, (iid, kw) in enumerate(zip(ids, kwargs)):
            if iid not in INSTRUCTIONS:
                raise ExampleError(where, f"instruction_id_list[{i}]", f"unknown instruction id '{iid}'")
            if kw is not None and not isinstance(kw, dict):
                raise ExampleError(where, f"kwargs[{i}]", f"expected a dict or null, got {kw!r:.80}")
            cleaned.append({k: v for k, v in (kw or {}).items() if v is not None})  # null kwargs mean "not set"
        example["kwargs"] = cleaned
    elif domain == "mcqa":
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
    elif domain == "json":
        schema = example.get("schema")
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ExampleError(where, "schema", f"a string that is not JSON ({e})") from None
        if not isinstance(schema, dict):
            raise ExampleError(where, "schema", f"expected a JSON Schema object, got {type(schema).__name__}")
        import jsonschema
        try:
            jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
        except jsonschema.SchemaError as e:
            raise ExampleError(where, "schema", f"not a valid JSON Schema ({e.message})") from None
        example["schema"] = schema
    elif domain == "code":
        tests = example.get("tests")
        if not isinstance(tests, list) or not tests:
            raise ExampleError(where, "tests", "missing or empty: expected a list of {input, output}")
        for i, t in enumerate(tests):
            if not isinstance(t, dict) or not isinstance(t.get("input"), str) or not isinstance(t.get("output"), str):
                raise ExampleError(where, f"tests[{i}]", "expected {\"input\": str, \"output\": str}")
    return example


def prompt_messages(example: dict) -> list[dict]:
    """The conversation a model answers: the example's messages up to (not including) a final assistant turn."""
    messages = example["messages"]
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else list(messages)


# -----------------------------------------------------------------------------
# The final answer: what the verifiers grade

def final_answer(response: str, thinking=None):
    """The text after </think>, stripped; None if a thinking response never closed its thought (it scores 0).

    `thinking`: True when the response is in thinking mode (the chat template's generation prompt ends with
    "<think>\\n", so the sampled text itself has no <think>: pass thinking=True for it), False when it is not,
    None to infer it from the text (a <think> or </think> in it means thinking). A response with neither tag,
    graded with thinking=None, is graded whole. As in tokenizer.parse_response, everything from the first
    <|im_end|> / </s> is dropped and the thought ends at the first </think>."""
    for stop in ("<|im_end|>", "</s>"):
        response = response.split(stop, 1)[0]
    if response.lstrip().startswith("<think>"):
        response, thinking = response.lstrip()[len("<think>"):], True
    if thinking is None:
        thinking = "</think>" in response
    if not thinking:
        return response.strip()
    if "</think>" not in response:
        return None
    return response.partition("</think>")[2].strip()


def reward(example: dict, response: str, *, thinking=None, if_loose=False, if_fraction=False,
           mcqa_mode="strict", math_timeout=5.0, limits=None) -> float:
    """Grade one response to one example: a float in [0, 1].

    thinking     see final_answer; a thinking response that never writes </think> scores 0
    if_loose     IFEval's loose mode: an instruction holds if it holds on any of 8 variants of the answer
    if_fraction  the fraction of instructions that hold, instead of 1 only when all of them do
    mcqa_mode    "strict" (the last \\boxed{X}) or "lenient" (also the option's text in the box, "Answer: X")
    math_timeout seconds for one math equivalence check, a hard limit (the check runs in a worker process)
    limits       SandboxLimits for code; the defaults otherwise"""
    answer = final_answer(response, thinking)
    if answer is None:
        return 0.0
    domain = example["domain"]
    if domain == "math":
        return math_reward(example["answer"], answer, timeout=math_timeout)
    if domain == "if":
        return if_reward(example["instruction_id_list"], example["kwargs"], answer,
                         loose=if_loose, fraction=if_fraction)
    if domain == "mcqa":
        return mcqa_reward(example["answer"], answer, options=example.get("options"), mode=mcqa_mode)
    if domain == "json":
        return json_reward(example["schema"], answer)
    if domain == "code":
        return code_reward(example["tests"], answer, limits=limits)
    raise ValueError(f"no verifier for domain '{domain}' (graded domains: {', '.join(GRADED_DOMAINS)})")


# -----------------------------------------------------------------------------
# Math: the last \boxed{...} against the answer, by mathematical equivalence
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


class _MathWorker:
    """One `python tasks.py _math_worker` process: a JSON line in ({gold, predicted, timeout}), a JSON line out."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_math_worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, bufsize=1, start_new_session=True)
        if self._read_line(120.0) != "ready":  # importing sympy + math_verify takes a second or two
            self.kill()
            raise RuntimeError("the math-verify worker did not start: is math-verify installed? "
                               "(pip install math-verify)")

    def _read_line(self, timeout: float):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().strip() if ready else None

    def verify(self, gold: str, predicted: str, timeout: float):
        """True / False, or None if the worker overran `timeout` or died (it is then killed)."""
        try:
            self.proc.stdin.write(json.dumps({"gold": gold, "predicted": predicted, "timeout": timeout}) + "\n")
        except OSError:  # the worker died (e.g. its memory limit)
            self.kill()
            return None
        line = self._read_line(timeout)
        if line is None or not line:
            self.kill()
            return None
        return json.loads(line)

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def alive(self):
        return self.proc.poll() is None


_math_workers = queue.LifoQueue()  # idle workers; a thread takes one (or starts one) per request


def _math_verify(gold: str, predicted: str, timeout: float) -> float:
    try:
        worker = _math_workers.get_nowait()
    except queue.Empty:
        worker = _MathWorker()
    result = worker.verify(gold, predicted, timeout)
    if result is not None and worker.alive():
        _math_workers.put(worker)
    return 1.0 if result else 0.0


@atexit.register
def _stop_math_workers():
    while not _math_workers.empty():
        _math_workers.get_nowait().kill()


def _math_worker_main():
    """The worker's loop (python tasks.py _math_worker). Math-Verify's signal.alarm timeouts work here: this is the
    main thread. Its timeout exception is a BaseException, hence the broad except: any failure scores 0."""
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a runaway sympy computation fails, not the machine
    from math_verify import parse, verify
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        seconds = max(1, int(request["timeout"]))
        try:
            gold = parse("\\boxed{" + request["gold"] + "}", parsing_timeout=seconds)
            predicted = parse("\\boxed{" + request["predicted"] + "}", parsing_timeout=seconds)
            ok = bool(gold) and bool(predicted) and verify(gold, predicted, timeout_seconds=seconds)
        except BaseException:  # noqa: B036 -- math_verify's TimeoutException derives from BaseException
            ok = False
        print(json.dumps(bool(ok)), flush=True)


# -----------------------------------------------------------------------------
# Instruction following: IFEval's 25 instructions and the 29 open-instruct (IFEvalG) ones the IF-RL data adds
#
# Each checker is a function (answer, **kwargs) -> bool with IFEval's semantics, written from
# google-research/instruction_following_eval/instructions.py and allenai/open-instruct IFEvalG/instructions.py
# (their quirks kept: keywords are regular expressions, frequency counts substrings, ...). Relations are
# "less than" (strict) and "at least". Where the originals need NLTK data we approximate, deterministically:
#   - count_sentences: IFEval uses NLTK's Punkt model; we use IFEval's own rule-based splitter (_split_sentences),
#     which open-instruct's checkers use anyway. They agree on ordinary prose; they can differ on abbreviations.
#   - nltk.word_tokenize: a regex version of its Treebank rules (_word_tokenize): words, numbers, contractions
#     split off ("do", "n't"), every punctuation mark its own token.
#   - langdetect (language, english_capital / english_lowercase) is seeded, so a text always gets one answer.
# Kwargs are the dataset's, with nulls dropped; a missing required one raises (where IFEval would pick a random
# value), as does an unknown instruction id.

def _compare(count: int, relation: str, threshold: int) -> bool:
    if relation == "less than":
        return count < threshold
    if relation == "at least":
        return count >= threshold
    raise ValueError(f"relation must be 'less than' or 'at least', got {relation!r}")


def _regex(pattern: str) -> str:
    """IFEval uses keywords as regular expressions; one that does not compile is matched literally."""
    try:
        re.compile(pattern)
        return pattern
    except re.error:
        return re.escape(pattern)


def _split_sentences(text: str) -> list[str]:
    """IFEval's rule-based sentence splitter: protect the periods of abbreviations, decimals, acronyms and web
    addresses, then split after . ? ! (and after runs of dots)."""
    letter, digit = "([A-Za-z])", "([0-9])"
    starters = (r"(Mr|Mrs|Ms|Dr|Prof|Capt|Cpt|Lt|He\s|She\s|It\s|They\s|Their\s|Our\s|We\s|But\s|However\s|"
                r"That\s|This\s|Wherever)")
    text = (" " + text + "  ").replace("\n", " ")
    text = re.sub("(Mr|St|Mrs|Ms|Dr)[.]", r"\1<prd>", text)
    text = re.sub("[.](com|net|org|io|gov|edu|me)", r"<prd>\1", text)
    text = re.sub(digit + "[.]" + digit, r"\1<prd>\2", text)
    text = re.sub(r"\.{2,}", lambda m: "<prd>" * len(m.group(0)) + "<stop>", text)
    text = text.replace("Ph.D.", "Ph<prd>D<prd>")
    text = re.sub(r"\s" + letter + "[.] ", r" \1<prd> ", text)
    text = re.sub("([A-Z][.][A-Z][.](?:[A-Z][.])?) " + starters, r"\1<stop> \2", text)
    text = re.sub(letter + "[.]" + letter + "[.]" + letter + "[.]", r"\1<prd>\2<prd>\3<prd>", text)
    text = re.sub(letter + "[.]" + letter + "[.]", r"\1<prd>\2<prd>", text)
    text = re.sub(" (Inc|Ltd|Jr|Sr|Co)[.] " + starters, r" \1<stop> \2", text)
    text = re.sub(" (Inc|Ltd|Jr|Sr|Co)[.]", r" \1<prd>", text)
    text = re.sub(" " + letter + "[.]", r" \1<prd>", text)
    text = text.replace(".”", "”.").replace('."', '".').replace('!"', '"!').replace('?"', '"?')
    text = text.replace(".", ".<stop>").replace("?", "?<stop>").replace("!", "!<stop>").replace("<prd>", ".")
    sentences = [s.strip() for s in text.split("<stop>")]
    return sentences[:-1] if sentences and not sentences[-1] else sentences


def _count_sentences(text: str) -> int:
    return len(_split_sentences(text))


_CONTRACTIONS = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_WORD_TOKEN = re.compile(r"n't|N'T|'\w+|\w+(?:[-.']\w+)*|\.\.\.|--|[^\w\s]")


def _word_tokenize(text: str) -> list[str]:
    """Approximately nltk.word_tokenize: "Don't stop, OK?" -> Do n't stop , OK ?"""
    return _WORD_TOKEN.findall(_CONTRACTIONS.sub(r"\1 \2", text))


def _count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))  # nltk's RegexpTokenizer(r"\w+"), as IFEval


_langdetect_lock = threading.Lock()
_langdetect_factory = None  # ours, seeded; set only once every language profile is loaded


def _detect_language(text: str):
    """ISO 639-1 code by langdetect (seeded), or None when it cannot tell (IFEval then counts the check as passed).

    Not langdetect.detect(): its lazy global set-up (init_factory) is not thread-safe. It publishes the factory
    before loading the profiles, so a second thread (score_responses grades in a pool) can detect with some of the
    55 languages loaded ('en' missing: "af", "pl"), or two threads load into one factory and corrupt it for the
    rest of the process. Here the profiles load once, under a lock, into a factory of our own that is published
    only when complete; after that detection only reads it (each Detector has its own seeded Random)."""
    global _langdetect_factory
    from langdetect import PROFILES_DIRECTORY, DetectorFactory, LangDetectException
    if _langdetect_factory is None:
        with _langdetect_lock:
            if _langdetect_factory is None:
                factory = DetectorFactory()
                factory.load_profile(PROFILES_DIRECTORY)
                factory.set_seed(0)
                _langdetect_factory = factory
    try:
        detector = _langdetect_factory.create()
        detector.append(text)
        return detector.detect()
    except LangDetectException:
        return None


def _paragraphs_ok(parts: list[str]):
    """IFEval's paragraph count: empty parts are allowed only at the very start or end. None if one is inside."""
    count = len(parts)
    for i, part in enumerate(parts):
        if not part.strip():
            if i in (0, len(parts) - 1):
                count -= 1
            else:
                return None
    return count


# --- IFEval's 25 ---

def keywords_existence(answer, keywords):
    return all(re.search(_regex(k), answer, flags=re.IGNORECASE) for k in keywords)


def keywords_frequency(answer, keyword, frequency, relation):
    return _compare(len(re.findall(_regex(keyword.strip()), answer, flags=re.IGNORECASE)), relation, frequency)


def keywords_forbidden_words(answer, forbidden_words):
    return not any(re.search(r"\b" + _regex(w) + r"\b", answer, flags=re.IGNORECASE) for w in forbidden_words)


def keywords_letter_frequency(answer, letter, let_frequency, let_relation):
    if not isinstance(letter, str) or len(letter.strip()) != 1:
        raise ValueError(f"letter must be one character, got {letter!r}")
    return _compare(answer.lower().count(letter.strip().lower()), let_relation, let_frequency)


def language_response_language(answer, language):
    detected = _detect_language(answer)
    return detected is None or detected == language


def length_number_sentences(answer, num_sentences, relation):
    return _compare(_count_sentences(answer), relation, num_sentences)


def length_number_paragraphs(answer, num_paragraphs):
    count = _paragraphs_ok(re.split(r"\s?\*\*\*\s?", answer))
    return count is not None and count == num_paragraphs


def length_number_words(answer, num_words, relation):
    return _compare(_count_words(answer), relation, num_words)


def length_nth_paragraph_first_word(answer, num_paragraphs, nth_paragraph, first_word):
    paragraphs = re.split(r"\n\n", answer)
    count = sum(1 for p in paragraphs if p.strip())
    if nth_paragraph > count or not paragraphs[nth_paragraph - 1].strip():
        return False
    word = paragraphs[nth_paragraph - 1].strip().split()[0].strip().lstrip("'").lstrip('"')
    first = ""
    for ch in word:
        if ch in ".,?!'\"":
            break
        first += ch.lower()
    return count == num_paragraphs and first == first_word.lower()


def content_number_placeholders(answer, num_placeholders):
    return len(re.findall(r"\[.*?\]", answer)) >= num_placeholders


def content_postscript(answer, postscript_marker):
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + _regex(marker.lower()) + r".*$"
    return bool(re.findall(pattern, answer.lower(), flags=re.MULTILINE))


def format_number_bullet_lists(answer, num_bullets):
    stars = re.findall(r"^\s*\*[^\*].*$", answer, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", answer, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def format_constrained_response(answer):
    return any(option in answer.strip() for option in ("My answer is yes.", "My answer is no.", "My answer is maybe."))


def format_number_highlighted_sections(answer, num_highlights):
    single = [h for h in re.findall(r"\*[^\n\*]*\*", answer) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", answer) if h[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


def format_multiple_sections(answer, section_spliter, num_sections):
    sections = re.split(r"\s?" + _regex(section_spliter.strip()) + r"\s?\d+\s?", answer)
    return len(sections) - 1 >= num_sections


def format_json_format(answer):
    value = answer.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        value = value.removeprefix(prefix)
    value = value.removesuffix("```").strip()
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def format_title(answer):
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", answer))


def combination_two_responses(answer):
    responses = answer.split("******")
    valid = []
    for i, r in enumerate(responses):
        if not r.strip():
            if i not in (0, len(responses) - 1):
                return False
        else:
            valid.append(r)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def combination_repeat_prompt(answer, prompt_to_repeat):
    return answer.strip().lower().startswith(prompt_to_repeat.strip().lower())


def startend_end_checker(answer, end_phrase):
    return answer.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def change_case_capital_word_frequency(answer, capital_frequency, capital_relation):
    return _compare(sum(1 for w in _word_tokenize(answer) if w.isupper()), capital_relation, capital_frequency)


def change_case_english_capital(answer):
    return answer.isupper() and _detect_language(answer) in ("en", None)


def change_case_english_lowercase(answer):
    return answer.islower() and _detect_language(answer) in ("en", None)


def punctuation_no_comma(answer):
    return "," not in answer


def startend_quotation(answer):
    value = answer.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'


# --- open-instruct's IFEvalG additions (the ids the IF-RL data adds) ---

def copy_repeat_phrase(answer, phrase, small_n):
    reference = phrase.strip().split()
    found = re.findall(rf"{_regex(reference[0])} .*? {_regex(reference[-1])}", answer)
    if len(found) != small_n or not found:
        return False
    differences = 0
    for candidate in found:  # as in open-instruct, only the last phrase's count of changed words decides
        words = candidate.split()
        if len(words) != len(reference):
            return False
        differences = sum(a != b for a, b in zip(words, reference))
        if differences > 1:
            return False
    return differences == 1


def copy_copy(answer, prompt_to_repeat):
    return answer.strip().lower() == prompt_to_repeat.strip().lower()


def new_copy_span_idx(answer, prompt_to_repeat, n_start, n_end):
    return answer.strip().lower() == prompt_to_repeat[n_start:n_end].strip().lower()


def format_sentence_hyphens(answer):
    gold = _split_sentences(answer.replace("-", " "))
    return all(part.strip() == part and part == g for part, g in zip(answer.split("-"), gold))


def keywords_no_adjacent_consecutive(answer):
    words = answer.split()
    return not any(ord(b[0].lower()[0]) - ord(a[0].lower()[0]) == 1 for a, b in zip(words, words[1:]))


def format_square_brackets(answer):
    return all(w.startswith("[") and w.endswith("]") for w in answer.split())


def keywords_word_once(answer, keyword):
    return len(re.findall(_regex(keyword.strip()), answer, flags=re.IGNORECASE)) == 1


def keywords_exclude_word_harder(answer, keyword):
    return " " + keyword.strip() + " " not in answer


def paragraphs_paragraphs(answer):
    return _paragraphs_ok(re.split(r"\s?\*\*\*\s?", answer)) == 2


def paragraphs_paragraphs2(answer):
    return _paragraphs_ok(re.split(r"\n\n", answer)) == 2


def _one_word(word):
    return (word[0] if isinstance(word, list) else word).strip()


def first_word_first_word_sent(answer, first_word):
    target = _one_word(first_word).lower()
    return all(s.strip() and s.split()[0].lower() == target for s in _split_sentences(answer))


def first_word_first_word_answer(answer, first_word):
    return bool(answer.split()) and answer.split()[0].lower() == _one_word(first_word).lower()


def last_word_last_word_sent(answer, last_word):
    target = _one_word(last_word).lower()
    return all(s.strip() and re.sub(r"[^\w\s]", "", s.split()[-1]).lower() == target for s in _split_sentences(answer))


def last_word_last_word_answer(answer, last_word):
    words = answer.split()
    return bool(words) and re.sub(r"[^\w\s]", "", words[-1]).lower() == _one_word(last_word).lower()


def format_bigram_wrapping(answer):
    words = answer.split()
    return all(words[i].startswith("<<") and words[i + 1].endswith(">>") for i in range(0, len(words) - 1, 2))


def copy_copying_simple(answer, prompt_to_repeat):
    return answer.strip().lower() == prompt_to_repeat.strip().lower()


def copy_copying_multiple(answer, prompt_to_repeat, N):
    copies = answer.split("******")
    return len(copies) == N and all(c.strip().lower() == prompt_to_repeat.strip().lower() for c in copies)


def punctuation_punctuation_dot(answer):
    return "." not in answer


def punctuation_punctuation_exclamation(answer):
    return "!" not in answer


def count_lowercase_counting(answer, N):
    return len(re.findall(r"\b[a-z]+\b", answer)) <= N


def letters_letter_counting(answer, N, relation):
    return _compare(len(re.findall(r"[a-zA-Z]", answer)), relation, N)


def count_counting_composition(answer, n_sent, n_words):
    parts = re.split(r"\s?\*\*\*\s?", answer)
    count = len(parts)
    for i, part in enumerate(parts):
        if not part.strip():
            if i not in (0, len(parts) - 1):
                return False
            count -= 1
        sentences = _split_sentences(part)  # as in open-instruct, even an empty edge part must have n_sent
        if len(sentences) != n_sent or any(len(_word_tokenize(s)) != n_words for s in sentences):
            return False
    return count == 3


def count_count_unique(answer):
    words = _word_tokenize(answer)
    return len(words) == len(set(words))


def count_count_increment_word(answer, keyword1, keyword2):
    once = len(re.findall(_regex(keyword1.strip()), answer, flags=re.IGNORECASE))
    twice = len(re.findall(_regex(keyword2.strip()), answer, flags=re.IGNORECASE))
    return once == 1 and twice == 2


def keywords_palindrome(answer):
    return any(w == w[::-1] for w in answer.split())


def keywords_keyword_specific_position(answer, keyword, n, m):
    sentences = _split_sentences(answer)
    if len(sentences) < n:
        return False
    words = _word_tokenize(sentences[n - 1])
    return len(words) >= m and words[m - 1] == _one_word(keyword)


def keywords_start_end(answer):
    words = _word_tokenize(answer)
    return len(words) >= 2 and words[0].lower() == words[-1].lower()


INSTRUCTIONS = {
    # IFEval
    "keywords:existence": keywords_existence,
    "keywords:frequency": keywords_frequency,
    "keywords:forbidden_words": keywords_forbidden_words,
    "keywords:letter_frequency": keywords_letter_frequency,
    "language:response_language": language_response_language,
    "length_constraints:number_sentences": length_number_sentences,
    "length_constraints:number_paragraphs": length_number_paragraphs,
    "length_constraints:number_words": length_number_words,
    "length_constraints:nth_paragraph_first_word": length_nth_paragraph_first_word,
    "detectable_content:number_placeholders": content_number_placeholders,
    "detectable_content:postscript": content_postscript,
    "detectable_format:number_bullet_lists": format_number_bullet_lists,
    "detectable_format:constrained_response": format_constrained_response,
    "detectable_format:number_highlighted_sections": format_number_highlighted_sections,
    "detectable_format:multiple_sections": format_multiple_sections,
    "detectable_format:json_format": format_json_format,
    "detectable_format:title": format_title,
    "combination:two_responses": combination_two_responses,
    "combination:repeat_prompt": combination_repeat_prompt,
    "startend:end_checker": startend_end_checker,
    "change_case:capital_word_frequency": change_case_capital_word_frequency,
    "change_case:english_capital": change_case_english_capital,
    "change_case:english_lowercase": change_case_english_lowercase,
    "punctuation:no_comma": punctuation_no_comma,
    "startend:quotation": startend_quotation,
    # open-instruct IFEvalG
    "copy:repeat_phrase": copy_repeat_phrase,
    "copy:copy": copy_copy,
    "new:copy_span_idx": new_copy_span_idx,
    "detectable_format:sentence_hyphens": format_sentence_hyphens,
    "keywords:no_adjacent_consecutive": keywords_no_adjacent_consecutive,
    "detectable_format:square_brackets": format_square_brackets,
    "keywords:word_once": keywords_word_once,
    "keywords:word_count_different_numbers": keywords_frequency,  # the same check under another id
    "keywords:exclude_word_harder": keywords_exclude_word_harder,
    "paragraphs:paragraphs": paragraphs_paragraphs,
    "paragraphs:paragraphs2": paragraphs_paragraphs2,
    "first_word:first_word_sent": first_word_first_word_sent,
    "first_word:first_word_answer": first_word_first_word_answer,
    "last_word:last_word_sent": last_word_last_word_sent,
    "last_word:last_word_answer": last_word_last_word_answer,
    "detectable_format:bigram_wrapping": format_bigram_wrapping,
    "copy:copying_simple": copy_copying_simple,
    "copy:copying_multiple": copy_copying_multiple,
    "punctuation:punctuation_dot": punctuation_punctuation_dot,
    "punctuation:punctuation_exclamation": punctuation_punctuation_exclamation,
    "count:lowercase_counting": count_lowercase_counting,
    "letters:letter_counting": letters_letter_counting,
    "letters:letter_counting2": keywords_letter_frequency,  # the same check under another id
    "count:counting_composition": count_counting_composition,
    "count:count_unique": count_count_unique,
    "count:count_increment_word": count_count_increment_word,
    "keywords:palindrome": keywords_palindrome,
    "keywords:keyword_specific_position": keywords_keyword_specific_position,
    "keywords:start_end": keywords_start_end,
}


def check_instruction(instruction_id: str, answer: str, kwargs: dict) -> bool:
    """One instruction on one answer (strict: an empty answer follows nothing). Raises on an unknown id, or on
    kwargs the instruction cannot use (missing required ones; unknown ones are ignored, as NeMo-Gym's data
    carries some builder-only keys)."""
    check = INSTRUCTIONS.get(instruction_id)
    if check is None:
        raise ValueError(f"unknown instruction id '{instruction_id}'")
    params = check.__code__.co_varnames[1:check.__code__.co_argcount]
    missing = [p for p in params if p not in kwargs]
    if missing:
        raise ValueError(f"instruction '{instruction_id}' needs kwargs {missing}, got {sorted(kwargs)}")
    return bool(answer.strip()) and bool(check(answer, **{p: kwargs[p] for p in params}))


def _loose_variants(answer: str) -> list[str]:
    """IFEval's loose mode: the answer with and without '*', and without its first and/or last line."""
    lines = answer.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [answer, answer.replace("*", "")] + cut + [c.replace("*", "") for c in cut]


def if_reward(instruction_ids, kwargs_list, answer: str, loose=False, fraction=False) -> float:
    """1.0 if every instruction holds (or, with fraction=True, the fraction that do)."""
    variants = _loose_variants(answer) if loose else [answer]
    held = [any(check_instruction(iid, v, kwargs or {}) for v in variants)
            for iid, kwargs in zip(instruction_ids, kwargs_list)]
    if fraction:
        return sum(held) / len(held) if held else 0.0
    return float(bool(held) and all(held))


# -----------------------------------------------------------------------------
# MCQA: the letter in the last \boxed{X}

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


# -----------------------------------------------------------------------------
# JSON: the whole answer parses and validates against the schema made strict

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


# -----------------------------------------------------------------------------
# Code: the last fenced code block, run on every test's stdin in the sandbox

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


# -----------------------------------------------------------------------------
# The sandbox
#
# Threat model. The program is untrusted and may be adversarial: RL optimises against the grader, so whatever
# earns 1 without solving the task will be found. It must not (1) earn a reward it did not earn, (2) harm or
# read the machine, the trainer or other sandboxes, (3) outlive its run. Defences, each a kernel mechanism
# rather than something the program could undo from inside Python:
#
#   what it could try                            what stops it
#   ------------------------------------------   -------------------------------------------------------------
#   read the expected output / the test files    the expected output never leaves the parent; Landlock lets
#                                                the child read only the interpreter, system libraries and its
#                                                own temp dir (so not data/eval.jsonl, /root, /proc, /home)
#   sys.exit(0) / os._exit(0) before printing,   the parent compares what was printed, test by test, and needs
#   patch __eq__ / print / the test runner,      exit status 0; there is no runner or checker in the child to
#   hard-code the sample output                  patch, and every test is a fresh process
#   loop forever / sleep forever                 RLIMIT_CPU (then SIGKILL) and a wall-clock timeout
#   allocate memory without end                  RLIMIT_AS
#   fork bomb, threads without end               RLIMIT_NPROC, counted per uid: each concurrent run gets its
#                                                own throwaway uid, so the limit holds as root too (root
#                                                itself ignores RLIMIT_NPROC) and no run starves another
#   print 1 GB, fill the disk                    stdout/stderr go to files capped by RLIMIT_FSIZE (writes past
#                                                it fail); the parent reads at most that many bytes
#   escape the kill with setsid() / a daemon     after each run the parent kills the process group, then every
#                                                process left with the run's uid (kill(-1) as that uid)
#   read secrets from the environment            the environment is replaced: PATH, LANG, HOME, TMPDIR only
#   use the network                              a new, empty network namespace (no interface but a down lo);
#                                                Landlock denies TCP bind/connect; an audit hook in the child
#                                                refuses Python socket creation
#   signal or ptrace the trainer, other runs     a different uid (root's processes are out of reach), Landlock
#                                                scoping of signals and abstract unix sockets, no_new_privs
#
# What needs what. The uid switch (NPROC per run, the kill sweep, no access to root's files) needs root. The
# network namespace needs root or unprivileged user namespaces. Landlock needs Linux >= 5.13 (TCP rules 6.7,
# signal scoping 6.12). run_program uses whatever the machine allows and SANDBOX_FEATURES says what that was;
# where a layer is missing the others still hold, and what is then not cut is: without the uid switch (not
# root) RLIMIT_NPROC counts all of this user's processes, so it is set to their current count plus the limit,
# and a child that calls setsid() escapes the group kill (it still dies at its CPU limit); without a network
# namespace and without Landlock's TCP rules only the audit hook stands between Python code and the network,
# and code that calls the C library directly (ctypes) gets past it; without Landlock the child can read
# world-readable files and write world-writable directories (/tmp). Not defended: kernel exploits, and
# side channels such as timing. `python tasks.py sandbox` prints which layers are on.

@dataclass
class SandboxLimits:
    wall_s: float = 10.0         # wall-clock seconds for the whole run
    cpu_s: int = 4               # CPU seconds per process (SIGXCPU, then SIGKILL one second later)
    memory_mb: int = 1024        # address space per process
    nproc: int = 32              # processes + threads of the run's uid
    output_bytes: int = 1 << 20  # stdout (and any file it writes) capped at this size
    nofile: int = 64             # open file descriptors


@dataclass
class RunResult:
    status: str      # "ok" (exit 0), "exit" (non-zero exit), "signal" (killed: CPU, memory, ...), "timeout"
    exit_code: int   # the return code (negative: the signal number)
    stdout: str      # at most output_bytes of it, decoded as UTF-8 (bad bytes replaced)
    stderr: str      # its last 2000 characters, for debugging
    wall_s: float


# Runs the program with the audit hook installed first. Runs with -I -S: no site-packages, no user paths.
_CHILD_MAIN = """\
import sys
def _no_network(event, args):
    if event.startswith("socket."):
        raise PermissionError("the sandbox has no network")
sys.addaudithook(_no_network)
del _no_network
sys.argv = ["main.py"]
with open("main.py", encoding="utf-8") as f:
    _source = f.read()
_code = compile(_source, "main.py", "exec")
del f, _source
exec(_code, {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__})
"""

_libc = ctypes.CDLL(None, use_errno=True)
_IS_ROOT = os.geteuid() == 0
_UID_BASE, _UID_SLOTS = 1_900_000, 64  # throwaway uids for concurrent runs (no passwd entry needed)
_SLOT_DIR = Path(tempfile.gettempdir()) / "nanocascade-sandbox-uids"
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000
_PR_SET_NO_NEW_PRIVS = 38


def _sandbox_python() -> str:
    """An interpreter the sandbox uid can run: every directory above it world-searchable (a pyenv under /root,
    mode 700, is not). NANOCASCADE_SANDBOX_PYTHON overrides."""
    if os.environ.get("NANOCASCADE_SANDBOX_PYTHON"):
        return os.environ["NANOCASCADE_SANDBOX_PYTHON"]
    candidates = [getattr(sys, "_base_executable", None), sys.executable, shutil.which("python3"), "/usr/bin/python3",
                  "/usr/local/bin/python3"]
    for candidate in candidates:
        if not candidate or not os.path.exists(candidate):
            continue
        path = os.path.realpath(candidate)
        searchable = all(os.stat(p).st_mode & 0o001 for p in Path(path).parents)
        if not _IS_ROOT or searchable and os.stat(path).st_mode & 0o005 == 0o005:
            return path
    raise RuntimeError("no Python interpreter that other users can run (set NANOCASCADE_SANDBOX_PYTHON)")


# --- Landlock: the child may read/execute the interpreter and system libraries, and write only its own dir ---

_LL_EXECUTE, _LL_WRITE_FILE, _LL_READ_FILE, _LL_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_LL_FILE_RIGHTS = _LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | (1 << 14) | (1 << 15)  # + truncate, ioctl_dev
_LL_READ_ONLY = _LL_EXECUTE | _LL_READ_FILE | _LL_READ_DIR


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _landlock_abi() -> int:
    abi = _libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    return max(abi, 0)


_LANDLOCK_ABI = _landlock_abi() if sys.platform == "linux" else 0


def _landlock_read_paths(python: str) -> list[str]:
    prefix = Path(python).parent.parent
    paths = ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/etc/ld.so.cache", "/etc/localtime", str(prefix)]
    return [p for p in dict.fromkeys(paths) if os.path.exists(p)]


def _landlock_restrict(read_paths, write_dir):
    """Called in the child before exec. Raises OSError if the kernel refuses."""
    abi = _LANDLOCK_ABI
    handled = (1 << 13) - 1                     # ABI 1: execute .. make_sym
    handled |= (1 << 13) if abi >= 2 else 0     # refer
    handled |= (1 << 14) if abi >= 3 else 0     # truncate
    handled |= (1 << 15) if abi >= 5 else 0     # ioctl_dev
    network = 0b11 if abi >= 4 else 0  # TCP bind + connect
    scoped = 0b11 if abi >= 6 else 0   # abstract unix sockets + signals outside the sandbox
    attr = _RulesetAttr(handled, network, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _libc.syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    try:
        rules = [(p, _LL_READ_ONLY) for p in read_paths] + [("/dev/null", _LL_READ_FILE | _LL_WRITE_FILE),
                                                            (write_dir, handled)]
        for path, access in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                if not os.path.isdir(path):
                    access &= _LL_FILE_RIGHTS
                rule = _PathBeneathAttr(access & handled, fd)
                if _libc.syscall(445, ruleset, 1, ctypes.byref(rule), 0) < 0:  # LANDLOCK_RULE_PATH_BENEATH
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        if _libc.syscall(446, ruleset, 0) < 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(ruleset)


# --- uid slots: a run holds a lock file for its uid, so concurrent runs (any process) never share one ---

def _pids_of_uid(uid: int, live_only=False) -> list[int]:
    """The processes of uid; live_only leaves out zombies (dead, waiting for init to reap them)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid != uid:
                    continue
                if live_only:
                    with open(f"/proc/{name}/stat") as f:
                        if f.read().rpartition(")")[2].split()[0] in ("Z", "X"):
                            continue
                pids.append(int(name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return pids


def _kill_uid(uid: int, python: str):
    """SIGKILL every process of uid at once: kill(-1) sent as that uid reaches exactly them, atomically (no
    fork can slip between the scan and the kill)."""
    subprocess.run([python, "-I", "-S", "-c", "import os\ntry: os.kill(-1, 9)\nexcept OSError: pass"],
                   user=uid, group=uid, extra_groups=[], env={}, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)


def _acquire_uid(python: str):
    """(uid, lock file) for a free slot whose uid has no processes, not even zombies."""
    _SLOT_DIR.mkdir(mode=0o700, exist_ok=True)
    while True:
        for slot in random.sample(range(_UID_SLOTS), _UID_SLOTS):
            uid = _UID_BASE + slot
            lock = open(_SLOT_DIR / f"{uid}.lock", "w")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            if not _pids_of_uid(uid):
                return uid, lock
            if _pids_of_uid(uid, live_only=True):  # leftovers of a run that died before its cleanup
                _kill_uid(uid, python)
            lock.close()  # zombies count against RLIMIT_NPROC until init reaps them: use another slot
        time.sleep(0.05)


def _confine(uid, limits: SandboxLimits, box: str, python: str, nproc_base: int, features: dict):
    """The child's preexec: network namespace, Landlock, no_new_privs, the uid, then the rlimits (last, because
    RLIMIT_AS may be below what the forked copy of the parent already maps). A layer that the probe found
    working and that now fails raises, so the run fails rather than running less confined."""
    if features["network_namespace"]:
        _unshare_network()
    if sys.platform == "linux" and _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if features["landlock_abi"]:
        _landlock_restrict(_landlock_read_paths(python), box)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    rlimits = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, limits.nofile),
               (resource.RLIMIT_FSIZE, limits.output_bytes), (resource.RLIMIT_AS, limits.memory_mb << 20)]
    if nproc_base is not None:  # None: no /proc to count this user's processes with (macOS): no NPROC limit
        rlimits.insert(0, (resource.RLIMIT_NPROC, nproc_base + limits.nproc))
    for which, value in rlimits:
        resource.setrlimit(which, (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))


def _unshare_network():
    """A new network namespace: root can make one directly, anyone else inside a new user namespace."""
    flags = _CLONE_NEWNET if _IS_ROOT else _CLONE_NEWUSER | _CLONE_NEWNET
    if _libc.unshare(flags) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")


def _probe_features() -> dict:
    """Which layers work here: each is tried once on a child that runs `pass`."""
    python = _sandbox_python()

    def works(preexec) -> bool:
        try:
            return subprocess.run([python, "-I", "-S", "-c", "pass"], preexec_fn=preexec, env={},
                                  capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False
    landlock = _LANDLOCK_ABI > 0 and works(lambda: (_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                                                     _landlock_restrict(_landlock_read_paths(python), "/tmp")))
    return {"uid_per_run": _IS_ROOT, "network_namespace": works(_unshare_network),
            "landlock_abi": _LANDLOCK_ABI if landlock else 0}


SANDBOX_FEATURES = None  # filled on first use: which layers this machine allows (see the threat model)


def run_program(source: str, stdin: str, limits: SandboxLimits = None) -> RunResult:
    """Run one untrusted Python program on one stdin, confined (see the threat model above)."""
    global SANDBOX_FEATURES
    if SANDBOX_FEATURES is None:
        SANDBOX_FEATURES = _probe_features()
    limits = limits or SandboxLimits()
    python = _sandbox_python()
    uid, lock = _acquire_uid(python) if _IS_ROOT else (None, None)
    workdir = tempfile.mkdtemp(prefix="nanocascade-sandbox-")  # ours (mode 700); the child only gets box/
    box = os.path.join(workdir, "box")
    try:
        os.mkdir(box, 0o700)
        with open(os.path.join(box, "main.py"), "w", encoding="utf-8") as f:
            f.write(source)
        with open(os.path.join(workdir, "stdin"), "w", encoding="utf-8") as f:
            f.write(stdin)
        if uid is not None:
            for path in (box, os.path.join(box, "main.py")):
                os.chown(path, uid, uid)
        nproc_base = 0 if uid is not None else len(_pids_of_uid(os.getuid())) if os.path.isdir("/proc") else None
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": box, "TMPDIR": box}
        start = time.monotonic()
        with open(os.path.join(workdir, "stdin"), "rb") as fin, open(os.path.join(workdir, "stdout"), "wb") as fout, \
                open(os.path.join(workdir, "stderr"), "wb") as ferr:
            proc = subprocess.Popen([python, "-I", "-S", "-B", "-c", _CHILD_MAIN], cwd=box, env=env, stdin=fin,
                                    stdout=fout, stderr=ferr, start_new_session=True, close_fds=True,
                                    preexec_fn=lambda: _confine(uid, limits, box, python, nproc_base, SANDBOX_FEATURES))
            try:
                proc.wait(timeout=limits.wall_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_run(proc, uid, python)
        wall = time.monotonic() - start
        with open(os.path.join(workdir, "stdout"), "rb") as f:
            stdout = f.read(limits.output_bytes).decode("utf-8", errors="replace")
        with open(os.path.join(workdir, "stderr"), "rb") as f:
            stderr = f.read(limits.output_bytes).decode("utf-8", errors="replace")[-2000:]
        code = proc.returncode
        status = "timeout" if timed_out else "ok" if code == 0 else "signal" if code < 0 else "exit"
        return RunResult(status, code, stdout, stderr, wall)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if lock is not None:
            lock.close()  # releases the slot, now empty of processes


def _kill_run(proc, uid, python):
    """Kill the run's process group, then (as root) anything else left with its uid, and reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if uid is not None and _pids_of_uid(uid, live_only=True):
        _kill_uid(uid, python)


def run_programs(jobs, limits: SandboxLimits = None, workers: int = None) -> list[RunResult]:
    """run_program over (source, stdin) pairs, `workers` at a time (default: one per CPU)."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda job: run_program(job[0], job[1], limits), jobs))


# -----------------------------------------------------------------------------
# Scoring many responses: per-domain pass@1, avg@k, pass@k

def score_responses(examples, responses_per_example, *, workers=None, **reward_opts) -> dict:
    """Grade K responses per example in parallel and summarise per domain.

    responses_per_example[i] is a list of K responses to examples[i] (a single string counts as K=1). Per domain:
      pass@1  mean reward of each example's first response (what one sample scores)
      avg@k   mean reward over all K responses of every example (the same quantity with K times the samples,
              so a lower-variance estimate: the "avg@K" of the paper's tables)
      pass@k  fraction of examples with at least one response scoring 1
    "all" pools every example. reward_opts go to reward() (e.g. thinking=True, if_loose=True). Code runs in
    the sandbox and math in its worker processes, `workers` gradings at a time (default: one per CPU)."""
    responses = [[r] if isinstance(r, str) else list(r) for r in responses_per_example]
    if len(responses) != len(examples):
        raise ValueError(f"{len(examples)} examples but {len(responses)} lists of responses")
    jobs = [(i, j) for i, rs in enumerate(responses) for j in range(len(rs))]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        flat = list(pool.map(lambda ij: reward(examples[ij[0]], responses[ij[0]][ij[1]], **reward_opts), jobs))
    rewards = [[] for _ in examples]
    for (i, _), r in zip(jobs, flat):
        rewards[i].append(r)

    def summary(indices):
        graded = [rewards[i] for i in indices if rewards[i]]
        if not graded:
            return {"examples": 0, "samples": 0, "pass@1": 0.0, "avg@k": 0.0, "pass@k": 0.0}
        return {"examples": len(graded), "samples": sum(map(len, graded)),
                "pass@1": sum(rs[0] for rs in graded) / len(graded),
                "avg@k": sum(sum(rs) / len(rs) for rs in graded) / len(graded),
                "pass@k": sum(max(rs) >= 1.0 for rs in graded) / len(graded)}

    by_domain = collections.defaultdict(list)
    for i, example in enumerate(examples):
        by_domain[example["domain"]].append(i)
    return {"k": max(map(len, responses), default=0),
            "domains": {d: summary(idx) for d, idx in sorted(by_domain.items())},
            "all": summary(range(len(examples))),
            "rewards": rewards}


def format_score_table(scores: dict) -> str:
    """The summary of score_responses as a fixed-width table, one row per domain and one for all (the avg@k and
    pass@k columns only when there are k > 1 samples per example: with one they equal pass@1)."""
    k = scores["k"]
    columns = [("pass@1", "pass@1")] + ([(f"avg@{k}", "avg@k"), (f"pass@{k}", "pass@k")] if k > 1 else [])
    header = f"{'domain':<8} {'examples':>8} {'samples':>8} " + " ".join(f"{title:>8}" for title, _ in columns)
    rows = [header, "-" * len(header)]
    for name, s in list(scores["domains"].items()) + [("all", scores["all"])]:
        rows.append(f"{name:<8} {s['examples']:>8} {s['samples']:>8} " +
                    " ".join(f"{s[key]:>8.4f}" for _, key in columns))
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1:] == ["_math_worker"]:
        _math_worker_main()
    elif sys.argv[1:2] == ["check"] and len(sys.argv) > 2:
        # python tasks.py check FILE [SPLIT [CONFIG]]: load (validating every row) and count examples per domain
        loaded = load_examples(sys.argv[2], *(sys.argv[3:4] or [None]), config=(sys.argv[4:5] or [None])[0])
        print(dict(collections.Counter(e["domain"] for e in loaded)))
    elif sys.argv[1:] == ["sandbox"]:
        result = run_program("print(input()[::-1])", "olleh\n")
        print(f"sandbox layers: {SANDBOX_FEATURES}; python: {_sandbox_python()}; "
              f"test run: {result.status} {result.stdout!r}")
    else:
        print("usage: python tasks.py check FILE [SPLIT [CONFIG]]  |  python tasks.py sandbox")
