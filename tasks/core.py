"""
The core of tasks/: the example schema, the loaders, the final answer, reward() (dispatch to the domain's
verifier) and scoring. The domains themselves are the other files of the package, registered in __init__.py.
Only the standard library is imported at the top: `datasets` is imported where it is used.
"""

import atexit
import collections
import json
import os
import queue
import select
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent  # where `python -m tasks` finds the package
DATA_DIR = _REPO_ROOT / "data"
ROLES = ("system", "user", "assistant", "tool")


class ExampleError(ValueError):
    """A malformed row: the message names where it is (file:line, or dataset index) and the bad field."""

    def __init__(self, where: str, field: str, problem: str):
        super().__init__(f"{where}: field '{field}': {problem}")
        self.where, self.field, self.problem = where, field, problem


def json_field(value, where: str, field: str):
    """A field that a row may hold as a JSON string (messages, schemas, tool-call arguments): decoded, or as it is
    when it is not a string; a string that is not JSON is an ExampleError naming the field."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ExampleError(where, field, f"a string that is not JSON ({e})") from None


# -----------------------------------------------------------------------------
# Loading examples

def load_examples(path_or_name, split=None, *, config=None, domains=None, limit=None, verbose=True) -> list[dict]:
    """Examples in the schema above, from any of:

    - "tiny" with split "sft" | "rl" | "eval": the shipped data (data/{split}.jsonl);
    - a .jsonl / .json / .parquet file, in our schema or in a released format (mapped row by row);
    - a local copy of a HF dataset (a directory): its *.jsonl / *.parquet files under `config` (a sub-directory,
      e.g. "IF-RL") whose names contain `split` when given;
    - a HF hub name, e.g. "nvidia/Nemotron-Cascade-2-RL-data" with config "IF-RL", loaded with `datasets`.

    Rows we cannot grade (SWE, non-JSON structured output, tool calling that needs a live environment, ...) are
    skipped and counted; the counts are printed. A malformed row raises ExampleError naming where it is and the
    bad field. `domains` keeps only those domains; `limit` stops after that many examples."""
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
              f"skipped {sum(skipped.values())} rows we cannot grade here: {reasons}")
    return examples


def _without_nulls(value):
    """A parquet row as it was written. Parquet stores dicts as structs holding the union of every row's keys,
    the absent ones null (pandas does the same with columns), so an mcqa option {"A": ..} comes back as
    {"A": .., "B": None, ...} and a JSON schema grows null keywords: drop every null again, at every depth."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _file_rows(path: Path):
    """(where, row) pairs of one file; `where` is path:line (1-based) or path:row N for parquet."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # installed with datasets
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row {i}", _without_nulls(row)
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
      fields present (tools -> tool, instruction_id_list -> if, options + expected_answer -> mcqa, schema_str ->
      json, answer + a long-context grader or field -> longctx), which may sit at the top level, under
      "verifier_metadata" or under "metadata";
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
        messages = json_field(row["messages"], where, "messages")
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
    swe = _swe_row(row, params)
    if swe is not None:  # before the prompt check: a SWE row's input may be empty (the agent harness writes it)
        return swe
    if not isinstance(params, dict) or not isinstance(params.get("input"), (list, str)):
        raise ExampleError(where, "responses_create_params.input", "missing: the prompt messages")
    messages = params["input"]
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    messages = _responses_messages(messages)
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
        return _tool_example(row, params["tools"], messages, agent, where)
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
    elif _verifiers()["longctx"].is_long_context_row(field, agent):
        example = _verifiers()["longctx"].from_nemo_gym(messages, field)
    else:
        return f"no verifier for agent '{agent}'"
    return _check_example(example, where)


def _swe_row(row: dict, params):
    """The skip reason of a SWE-RL row (Nemotron-Cascade-2-RL-data's SWE-RL config), None for any other row.

    These rows are made for NeMo-Gym's swe_agents harness (SWE-Gym / R2E-Gym instances): the instance sits in
    responses_create_params.metadata (instance_id, base_commit, dataset_name, split, problem_statement and an
    "instance_dict", a JSON string with repo, patch, test_patch, FAIL_TO_PASS, PASS_TO_PASS, ...), and the
    harness runs an agent in the instance's container image, then the repository's own tests. The tiny "swe"
    environment (tasks/swe.py) holds its projects in the row; a real row only names a repository and a commit,
    so it is skipped (one reason for all of them, so that load_examples' summary counts them as one kind)."""
    metadata = params.get("metadata") if isinstance(params, dict) else None
    holders = [row, metadata, row.get("verifier_metadata"), row.get("metadata")]
    holders = [json.loads(h) if isinstance(h, str) and h.lstrip().startswith("{") else h for h in holders]
    holders = [h for h in holders if isinstance(h, dict)]
    has = lambda key: any(isinstance(h.get(key), str) and h[key].strip() for h in holders)
    agent_ref = row.get("agent_ref") if isinstance(row.get("agent_ref"), dict) else {}
    agent = str(agent_ref.get("name") or "")
    if not has("instance_id") or not ("swe" in agent.lower() or has("base_commit") or has("problem_statement")):
        return None
    return "SWE-RL row (needs its repository at base_commit and the repository's test environment)"


def _responses_messages(items) -> list[dict]:
    """Responses-API input items -> chat messages: messages keep role and text; a function_call item becomes an
    assistant turn with that tool call (joined to the turn before it when that is one), a function_call_output
    item a tool message."""
    messages = []
    for item in items:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "function_call":
            call = {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}
            if not (messages and messages[-1]["role"] == "assistant"):
                messages.append({"role": "assistant", "content": ""})
            messages[-1].setdefault("tool_calls", []).append(call)
        elif item.get("type") == "function_call_output":
            messages.append({"role": "tool", "content": _responses_text(item.get("output"))})
        else:
            messages.append({"role": item.get("role"), "content": _responses_text(item.get("content"))})
    return messages


def _tool_example(row: dict, tools, messages, agent: str, where: str):
    """A tool-calling row: its ground-truth calls become the one acceptable answer, where the prompt alone
    determines them. NeMo-Gym's workplace_assistant rows (the tool calling of Nemotron-Cascade-2-RL-data) keep
    `ground_truth`: [{"name", "arguments": "<JSON>"}, ...], graded there by running the policy's calls and these
    against live databases and comparing their state. A call whose argument values are not all in the prompt
    (an email id, a date worked out from "next Monday") needs a tool result first: the row is skipped."""
    truth = json_field(row.get("ground_truth"), where, "ground_truth")
    if not truth:
        return f"tool-calling without ground-truth calls ({agent})"
    if not isinstance(truth, list) or not all(isinstance(c, dict) for c in truth):
        raise ExampleError(where, "ground_truth", f"expected a list of calls {{name, arguments}}, got {truth!r:.80}")
    calls = []
    for i, call in enumerate(truth):
        arguments = json_field(call.get("arguments") or {}, where, f"ground_truth[{i}].arguments")
        calls.append({"name": call.get("name"), "arguments": arguments})
    prompt = "\n".join(m["content"] for m in messages if isinstance(m.get("content"), str)).lower()

    def in_prompt(value) -> bool:
        if isinstance(value, dict):
            return all(in_prompt(v) for v in value.values())
        if isinstance(value, list):
            return all(in_prompt(v) for v in value)
        if isinstance(value, (bool, type(None))):
            return True
        return str(value).lower() in prompt
    if not all(in_prompt(call["arguments"]) for call in calls):
        return f"tool-calling that needs a live environment ({agent})"
    # the Responses API's flat tool {"type": "function", "name", ...} -> the chat form the template renders
    tools = [t if not isinstance(t, dict) or "function" in t or "name" not in t else
             {"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in tools]
    return _check_example({"domain": "tool", "messages": messages, "tools": tools, "tool_calls": [calls]}, where)


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
        if not m["content"].isascii():
            try:
                m["content"].encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate (JSON "\ud800"): no tokenizer can encode it
                raise ExampleError(where, f"messages[{i}].content", f"invalid character "
                                   f"{m['content'][e.start]!r} at offset {e.start} (not encodable as UTF-8)") from None

    verifier = _verifiers().get(domain)
    if verifier is not None:  # a graded domain checks its own fields; others (e.g. "sft/chat") need none
        verifier.check(example, where)
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
    verifier = _verifiers().get(example["domain"])
    if verifier is None:
        raise ValueError(f"no verifier for domain '{example['domain']}' (graded domains: {', '.join(_verifiers())})")
    if not isinstance(response, str):
        raise TypeError(f"reward: the response must be the decoded text (str), got {type(response).__name__} "
                        f"{response!r:.60}")
    answer = final_answer(response, thinking)
    if answer is None:
        return 0.0
    return verifier.reward(example, answer, if_loose=if_loose, if_fraction=if_fraction, mcqa_mode=mcqa_mode,
                           math_timeout=math_timeout, limits=limits)


def _verifiers() -> dict:
    """domain -> its module (with check(example, where) and reward(example, answer, **options)): VERIFIERS in
    tasks/__init__.py, imported here when first needed because the domain modules import this one."""
    from . import VERIFIERS
    return VERIFIERS


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
    return summarise_rewards(examples, rewards)


def summarise_rewards(examples, rewards) -> dict:
    """score_responses' summary of rewards[i], the K rewards of examples[i] (also what the multi-turn domains'
    episodes are summarised with: sample.evaluate)."""
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
    return {"k": max(map(len, rewards), default=0),
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


# ----------------------------------------------------------------------------------------------------------------
# Helper processes: work that must not run in the caller (math-verify's signal timeouts need a main thread; the
# sandbox forks its confined runs, which is cheap only from a small process)


class JsonWorker:
    """One `python -m tasks NAME` process, spoken to in JSON lines: one request in, one reply out."""

    def __init__(self, name: str, hint: str = ""):
        self.proc = subprocess.Popen([sys.executable, "-m", "tasks", name], cwd=_REPO_ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, bufsize=1, start_new_session=True)
        if self._read_line(120.0) != "ready":  # math's imports (sympy, math_verify) take a second or two
            self.kill()
            raise RuntimeError(f"the {name} worker process did not start{': ' + hint if hint else ''}")

    def _read_line(self, timeout: float):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().strip() if ready else None

    def request(self, message, timeout: float):
        """The reply, or None if the worker overran `timeout` or died (it is then killed)."""
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
        except OSError:  # the worker died (e.g. its memory limit)
            self.kill()
            return None
        line = self._read_line(timeout)
        if not line:
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


class WorkerPool:
    """Idle JsonWorkers of one kind: a thread takes one (or starts one) per request and puts it back after, so
    there are as many as there are concurrent callers. Stopped at exit."""

    def __init__(self, name: str, hint: str = ""):
        self.name, self.hint, self.idle = name, hint, queue.LifoQueue()
        atexit.register(self.stop)

    def request(self, message, timeout: float):
        """The reply, or None if the worker overran `timeout` or died (a new one serves the next request)."""
        try:
            worker = self.idle.get_nowait()
        except queue.Empty:
            worker = JsonWorker(self.name, self.hint)
        reply = worker.request(message, timeout)
        if reply is not None and worker.alive():
            self.idle.put(worker)
        return reply

    def stop(self):
        while not self.idle.empty():
            self.idle.get_nowait().kill()


def serve_json_lines(handle):
    """A worker's loop: "ready", then one JSON reply line per JSON request line, until stdin closes."""
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(handle(json.loads(line))), flush=True)
