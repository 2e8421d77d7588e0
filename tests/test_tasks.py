"""tasks/: loaders (every released format, hand-written fixtures), the final answer, math / mcqa / json verifiers,
scoring, and the shipped tiny data."""

import json
import random
import time
from pathlib import Path

import pytest

import tasks

ROOT = Path(__file__).resolve().parent.parent


def user(text):
    return [{"role": "user", "content": text}]


# -----------------------------------------------------------------------------
# The final answer

def test_final_answer_is_the_text_after_think():
    assert tasks.final_answer("<think>\nhmm\n</think>\n 42 ") == "42"
    assert tasks.final_answer("hmm\n</think>\n42") == "42"                  # opener was in the prompt
    assert tasks.final_answer("<think>\nhmm, still thinking") is None       # never closed: scores 0
    assert tasks.final_answer("hmm, still thinking", thinking=True) is None
    assert tasks.final_answer("42") == "42"                                 # no thinking at all: graded whole
    assert tasks.final_answer("<think></think>42<|im_end|>junk") == "42"    # non-thinking opener, stop token
    assert tasks.final_answer("a</think>b</think>c") == "b</think>c"        # the thought ends at the first </think>


# -----------------------------------------------------------------------------
# Math

@pytest.mark.parametrize("predicted", ["1/2", "0.5", ".5", "0.50", "\\frac{1}{2}", "\\dfrac12", "\\tfrac{1}{2}",
                                       "\\frac12", "$\\frac{1}{2}$", "\\left(\\frac{1}{2}\\right)"])
def test_math_accepts_equivalent_forms(predicted):
    assert tasks.math_reward("1/2", f"The answer is \\boxed{{{predicted}}}.") == 1.0


def test_math_equivalence_beyond_plain_numbers_uses_math_verify():
    assert tasks.math_reward("1000", "\\boxed{1,000}") == 1.0
    assert tasks.math_reward("\\frac{\\sqrt{3}}{2}", "\\boxed{\\frac{\\sqrt3}{2}}") == 1.0
    assert tasks.math_reward("x^2+2x", "\\boxed{x(x+2)}") == 1.0
    assert tasks.math_reward("x^2+2x", "\\boxed{x(x+3)}") == 0.0


def test_math_rejects_wrong_and_missing_answers():
    assert tasks.math_reward("1/2", "\\boxed{0.6}") == 0.0
    assert tasks.math_reward("1/2", "the answer is 1/2") == 0.0     # no box
    assert tasks.math_reward("1/2", "\\boxed{}") == 0.0
    assert tasks.math_reward("1/2", "\\boxed{1/2") == 0.0           # never closed
    assert tasks.math_reward("1/2", "\\boxed{1/2} no wait \\boxed{3}") == 0.0   # the last box counts
    assert tasks.math_reward("3", "\\boxed{1/2} no wait \\boxed{3}") == 1.0
    assert tasks.last_boxed("x \\boxed{\\frac{1}{\\sqrt{2}}} y") == "\\frac{1}{\\sqrt{2}}"


def test_math_pathological_input_returns_0_within_its_timeout():
    tasks.math_reward("x+1", "\\boxed{1+x}")  # a worker is up (its start-up is not part of the timeout)
    start = time.monotonic()
    assert tasks.math_reward("1", "\\boxed{9^{9^{9^{9}}}}", timeout=1.0) == 0.0
    assert time.monotonic() - start < 2.0
    assert tasks.math_reward("x+1", "\\boxed{1+x}") == 1.0  # and the next answer is graded by a fresh worker


# -----------------------------------------------------------------------------
# MCQA and JSON

OPTIONS = [{"A": "Oslo"}, {"B": "Paris"}, {"C": "Rome"}, {"D": "Lima"}]


def test_mcqa_strict_takes_the_last_boxed_letter():
    assert tasks.mcqa_reward("B", "\\boxed{A} or rather \\boxed{B}", OPTIONS) == 1.0
    assert tasks.mcqa_reward("B", "\\boxed{(B)}", OPTIONS) == 1.0
    assert tasks.mcqa_reward("B", "\\boxed{B} or rather \\boxed{A}", OPTIONS) == 0.0
    assert tasks.mcqa_reward("B", "The answer is B.", OPTIONS) == 0.0
    assert tasks.mcqa_reward("E", "\\boxed{E}", OPTIONS) == 0.0           # not an option
    assert tasks.mcqa_reward("B", "\\boxed{Paris}", OPTIONS) == 0.0


def test_mcqa_lenient_forms():
    assert tasks.mcqa_reward("B", "\\boxed{Paris}", OPTIONS, mode="lenient") == 1.0
    assert tasks.mcqa_reward("B", "\\boxed{\\text{Paris}}", OPTIONS, mode="lenient") == 1.0
    assert tasks.mcqa_reward("B", "Answer: B", OPTIONS, mode="lenient") == 1.0
    assert tasks.mcqa_reward("B", "answer: paris", OPTIONS, mode="lenient") == 1.0
    assert tasks.mcqa_reward("B", "\\boxed{Paris or Rome}", OPTIONS, mode="lenient") == 0.0  # two options match


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "pet": {"type": "object", "properties": {"kind": {"type": "string"}}}}}


def test_json_validates_the_whole_answer_against_the_strict_schema():
    good = {"name": "Ana", "age": 3, "pet": {"kind": "cat"}}
    assert tasks.json_reward(SCHEMA, json.dumps(good)) == 1.0
    assert tasks.json_reward(SCHEMA, json.dumps({"name": "Ana", "age": 3})) == 0.0              # all required
    assert tasks.json_reward(SCHEMA, json.dumps(dict(good, extra=1))) == 0.0                    # no extras
    assert tasks.json_reward(SCHEMA, json.dumps(dict(good, pet={"kind": "cat", "x": 1}))) == 0.0  # nested too
    assert tasks.json_reward(SCHEMA, json.dumps(dict(good, age="3"))) == 0.0
    assert tasks.json_reward(SCHEMA, f"```json\n{json.dumps(good)}\n```") == 0.0                # no code fence
    assert tasks.json_reward(SCHEMA, "name: Ana") == 0.0
    assert "required" not in SCHEMA  # the caller's schema is not modified


# -----------------------------------------------------------------------------
# Scoring

def test_score_responses_per_domain():
    examples = [{"domain": "math", "messages": user("1+1?"), "answer": "2"},
                {"domain": "math", "messages": user("2+2?"), "answer": "4"},
                {"domain": "mcqa", "messages": user("?"), "answer": "B", "options": OPTIONS}]
    responses = [["\\boxed{2}", "\\boxed{3}"], ["\\boxed{5}", "no"], ["\\boxed{A}", "\\boxed{B}"]]
    scores = tasks.score_responses(examples, responses, workers=2)
    assert scores["k"] == 2 and scores["rewards"] == [[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]
    assert scores["domains"]["math"] == {"examples": 2, "samples": 4, "pass@1": 0.5, "avg@k": 0.25, "pass@k": 0.5}
    assert scores["domains"]["mcqa"] == {"examples": 1, "samples": 2, "pass@1": 0.0, "avg@k": 0.5, "pass@k": 1.0}
    assert scores["all"]["pass@k"] == pytest.approx(2 / 3)
    table = tasks.format_score_table(scores)
    assert "avg@2" in table and table.splitlines()[-1].startswith("all")
    single = tasks.format_score_table(tasks.score_responses(examples, [rs[0] for rs in responses]))
    assert single.splitlines()[0].split() == ["domain", "examples", "samples", "pass@1"]   # no repeated columns
    with pytest.raises(ValueError, match="3 examples but 2"):
        tasks.score_responses(examples, responses[:2])


# -----------------------------------------------------------------------------
# Loaders: hand-written rows in each released format

IF_ROW = {  # NeMo-Gym IF-RL row
    "id": 7, "agent_ref": {"type": "responses_api_agents", "name": "instruction_following_simple_agent"},
    "responses_create_params": {"input": [{"role": "user", "content": "Write a haiku. No commas."}]},
    "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
    "kwargs": [None, {"num_words": 5, "relation": "at least", "num_sentences": None}],
    "prompt": "Write a haiku. No commas.", "dataset": "if_rl"}
IF_ROW_NESTED = {
    "agent_ref": {"name": "instruction_following_simple_agent"},
    "responses_create_params": {"input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
                                "instructions": "Be brief."},
    "verifier_metadata": {"instruction_id_list": ["keywords:start_end"], "kwargs": [{}]}}
MCQA_ROW = {
    "agent_ref": {"name": "mcqa_simple_agent"},
    "responses_create_params": {"input": [{"role": "user", "content": "Capital of Peru? A: Lima B: Quito"}]},
    "options": [{"A": "Lima"}, {"B": "Quito"}], "expected_answer": "a", "uuid": "x"}
JSON_ROW = {
    "agent_ref": {"name": "structured_outputs_simple_agent"},
    "responses_create_params": {"input": [{"role": "user", "content": "A person as JSON."}]},
    "schema_str": json.dumps({"type": "object", "properties": {"name": {"type": "string"}}}), "schema_type": "json"}
YAML_ROW = dict(JSON_ROW, schema_type="yaml")
TOOL_ROW = {
    "agent_ref": {"name": "workplace_assistant_simple_agent"},
    "responses_create_params": {"input": [{"role": "user", "content": "Email Bob."}],
                                "tools": [{"type": "function", "name": "send_email", "parameters": {}}]},
    "ground_truth": [{"name": "send_email", "arguments": '{"to": "bob@atlas.com"}'}]}  # the address: a lookup
SWE_ROW = {"agent_ref": {"name": "swe_agent"}, "responses_create_params": {"input": [{"role": "user", "content": "Fix"}]}}
SFT_ROW = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "<think>\nadd\n</think>\n4"}], "license": "cc-by-4.0"}
SFT_ROW_STRING = {"messages": json.dumps(SFT_ROW["messages"])}
SFT_ROW_REASONING = {"messages": [{"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "hello", "reasoning_content": "greet back"}]}
MATH_ROW = {"problem": "What is 6*7?", "answer": 42}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_nemo_gym_rl_rows_map_into_the_schema(tmp_path, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", [IF_ROW, IF_ROW_NESTED, MCQA_ROW, JSON_ROW, YAML_ROW, TOOL_ROW, SWE_ROW])
    examples = tasks.load_examples(str(path))
    assert [e["domain"] for e in examples] == ["if", "if", "mcqa", "json"]
    if_example, nested, mcqa, structured = examples
    assert if_example["messages"] == user("Write a haiku. No commas.")
    assert if_example["kwargs"] == [{}, {"num_words": 5, "relation": "at least"}]  # nulls dropped
    assert nested["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert nested["instruction_id_list"] == ["keywords:start_end"]
    assert mcqa["answer"] == "A" and mcqa["options"] == MCQA_ROW["options"]
    assert structured["schema"] == json.loads(JSON_ROW["schema_str"])
    printed = capsys.readouterr().out
    assert "skipped 3" in printed and "1 tool-calling that needs a live environment (workplace_assistant_simple_agent)" \
        in printed  # (tests/test_tasks_tools.py loads the tool rows that need none)
    assert "1 structured output in yaml" in printed and "1 no verifier for agent 'swe_agent'" in printed
    # and they grade
    assert tasks.reward(if_example, "<think>\nx\n</think>\nfive words with no comma") == 1.0
    assert tasks.reward(mcqa, "\\boxed{A}") == 1.0 and tasks.reward(structured, '{"name": "Bo"}') == 1.0


def test_sft_rows_and_acereason_math_map_into_the_schema(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [SFT_ROW, SFT_ROW_STRING, SFT_ROW_REASONING, MATH_ROW])
    sft, from_string, with_reasoning, math = tasks.load_examples(str(path), config="math")
    assert sft == {"domain": "sft/math", "messages": SFT_ROW["messages"]}  # the config names the source
    assert from_string["messages"] == SFT_ROW["messages"]
    assert with_reasoning["messages"][1]["content"] == "<think>\ngreet back\n</think>\nhello"
    assert math["answer"] == "42" and "\\boxed{}" in math["messages"][0]["content"]
    assert tasks.prompt_messages(sft) == SFT_ROW["messages"][:1]
    assert tasks.reward(math, "<think>\n6*7\n</think>\n\\boxed{42}") == 1.0


def test_parquet_local_copy_and_hub_loading(tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([SFT_ROW_STRING, SFT_ROW_STRING]), tmp_path / "chat.parquet")
    assert len(tasks.load_examples(str(tmp_path / "chat.parquet"))) == 2
    # a local copy of the RL release: one directory per config, train.jsonl in each
    (tmp_path / "copy" / "IF-RL").mkdir(parents=True)
    (tmp_path / "copy" / "multi-domain-RL").mkdir()
    write_jsonl(tmp_path / "copy" / "IF-RL" / "train.jsonl", [IF_ROW])
    write_jsonl(tmp_path / "copy" / "multi-domain-RL" / "train.jsonl", [MCQA_ROW, JSON_ROW])
    assert [e["domain"] for e in tasks.load_examples(str(tmp_path / "copy"), "train", config="multi-domain-RL")] == [
        "mcqa", "json"]
    # the hub: datasets.load_dataset, here answered locally
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": None}])
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(tasks.ExampleError, match=r"nvidia/AceReason-Math/train index 1: field 'answer'"):
        tasks.load_examples("nvidia/AceReason-Math")
    assert calls == [("nvidia/AceReason-Math", None, "train")]
    assert len(tasks.load_examples("nvidia/AceReason-Math", limit=1)) == 1


MALFORMED = [  # (row, field named in the error)
    (dict(IF_ROW, kwargs=[{}]), "kwargs"),
    (dict(IF_ROW, instruction_id_list=["made:up", "punctuation:no_comma"]), "instruction_id_list[0]"),
    (dict(MCQA_ROW, expected_answer="C"), "answer"),
    (dict(JSON_ROW, schema_str="{not json"), "schema_str"),
    ({"domain": "json", "messages": user("x"), "schema": {"type": 5}}, "schema"),
    ({"domain": "code", "messages": user("x"), "tests": [{"input": "1"}]}, "tests[0]"),
    ({"domain": "code", "messages": user("x")}, "tests"),
    ({"domain": "math", "messages": user("x")}, "answer"),
    ({"domain": "math", "messages": [{"role": "robot", "content": "x"}], "answer": "1"}, "messages[0].role"),
    ({"messages": "[{\"role\": "}, "messages"),
    ({"question": "x"}, "<row>"),
]


@pytest.mark.parametrize("row,field", MALFORMED)
def test_malformed_rows_raise_naming_file_line_and_field(tmp_path, row, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [SFT_ROW, row])
    with pytest.raises(tasks.ExampleError) as error:
        tasks.load_examples(str(path))
    assert error.value.where == f"{path}:2" and error.value.field == field
    assert str(error.value).startswith(f"{path}:2: field '{field}'")


def test_a_line_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(SFT_ROW) + "\n\n{oops\n")
    with pytest.raises(tasks.ExampleError, match=r"broken.jsonl:3: field '<row>': not valid JSON"):
        tasks.load_examples(str(path))


def test_unknown_domain_loads_but_has_no_verifier():
    example = tasks.example_from_row({"messages": user("hi")})
    assert example["domain"] == "sft/chat"
    with pytest.raises(ValueError, match="no verifier for domain 'sft/chat'"):
        tasks.reward(example, "hello")


# -----------------------------------------------------------------------------
# The shipped tiny data

@pytest.fixture(scope="module")
def shipped():
    return {split: tasks.load_examples("tiny", split=split) for split in ("sft", "rl", "eval")}


def test_shipped_splits_load_cover_every_domain_and_are_disjoint(shipped):
    prompts = {}
    for split, examples in shipped.items():
        assert {e["domain"] for e in examples} == set(tasks.GRADED_DOMAINS)
        prompts[split] = {[m["content"] for m in tasks.prompt_messages(e) if m["role"] == "user"][-1]
                          for e in examples}
        assert len(prompts[split]) == len(examples)  # no duplicates within a split
        ends_with_answer = [e["messages"][-1]["role"] == "assistant" for e in examples]
        assert all(ends_with_answer) if split == "sft" else not any(ends_with_answer)
    assert not prompts["sft"] & prompts["rl"] and not prompts["sft"] & prompts["eval"] and not prompts["rl"] & prompts["eval"]
    size = sum((ROOT / "data" / f"{s}.jsonl").stat().st_size for s in shipped)
    assert size < 9e6                     # tiny: a clone stays small (agent rows carry tool specs, longctx documents)


def test_shipped_mcqa_thoughts_check_the_options_in_order_and_stop_at_the_right_one(shipped, generate):
    """The MCQA thought is the skill SFT teaches (the reward grades only the boxed letter): one line per option,
    in the prompt's order, each judged rightly, up to and including the answer's, whose letter it names."""
    rows = [e for e in shipped["sft"] if e["domain"] == "mcqa"]
    assert len(rows) == generate.split_counts("mcqa")["sft"]
    for e in rows:
        prop = next(p for p in generate.MCQA_PROPERTIES if f" {p} number" in e["messages"][0]["content"])
        adjective, numbers = generate.MCQA_ADJECTIVES[prop], generate.MCQA_PROPERTIES[prop]
        thought = e["messages"][-1]["content"].split("<think>\n")[1].split("\n</think>")[0].split("\n")
        options = [next(iter(o.items())) for o in e["options"]]
        answer_at = [letter for letter, _ in options].index(e["answer"])
        assert len(thought) == answer_at + 1, e
        for line, (letter, number) in zip(thought, options):
            fits = int(number) in numbers
            assert fits == (letter == e["answer"]), e
            assert line == (f"{letter}. {number} is {adjective}, option {letter}." if fits
                            else f"{letter}. {number} is not {adjective}."), line


def completion(example):
    """What the model writes for the example's last assistant turn after the generation prompt (<think>\\n): the
    chat template's rendering of that turn, tool calls included, through <|im_end|>."""
    from tokenizer import render_chat
    full = render_chat(example["messages"], tools=example.get("tools"))
    prompt = render_chat(tasks.prompt_messages(example), tools=example.get("tools"), add_generation_prompt=True)
    assert full.startswith(prompt)
    return full[len(prompt):]


def test_shipped_sft_answers_are_thinking_mode_and_score_1_except_the_teachers_slips(shipped, monkeypatch):
    """Every SFT answer scores 1, except the rows marked teacher_slip (data/generate.py's SLIP_RATE of one kind of
    prompt per RL domain), which must score 0: a slip the verifier accepted would give RL nothing to fix."""
    rng = random.Random(0)
    by_domain = {d: [e for e in shipped["sft"] if e["domain"] == d] for d in tasks.GRADED_DOMAINS
                 if d not in tasks.ENVIRONMENTS}     # the multi-turn domains' rows replay in tests/test_env.py
    slipped = {d: sum("teacher_slip" in e for e in es) for d, es in by_domain.items()}
    assert slipped["math"] == 0 and all(0.1 < slipped[d] / len(by_domain[d]) < 0.5
                                        for d in ("if", "mcqa", "json", "code", "tool", "longctx", "chat")), slipped
    sample = [e for d, es in by_domain.items() for e in rng.sample(es, 8 if d == "code" else 40)]
    for example in sample:
        answer = example["messages"][-1]["content"]
        assert answer.startswith("<think>\n") and ("\n</think>\n" in answer or answer.endswith("\n</think>"))
    # record what the sandbox and the language detector said during the grading, so that a failure (these
    # graders run in score_responses' thread pool) says which example failed and why, not only that one did
    runs, languages = [], []
    run_program, detect_language = tasks.run_program, tasks.ifeval._detect_language
    monkeypatch.setattr(tasks.code, "run_program",
                        lambda *a, **k: runs.append((a[:2], run_program(*a, **k))) or runs[-1][1])
    monkeypatch.setattr(tasks.ifeval, "_detect_language",
                        lambda text: languages.append((text, detect_language(text))) or languages[-1][1])
    scores = tasks.score_responses([dict(e, messages=tasks.prompt_messages(e)) for e in sample],
                                   [completion(e) for e in sample], thinking=True)
    failed = []
    assert any("teacher_slip" in e for e in sample)
    for example, (score,) in zip(sample, scores["rewards"]):
        if score != (0.0 if "teacher_slip" in example else 1.0):
            answer = tasks.final_answer(completion(example), thinking=True)
            why = {"domain": example["domain"], "score": score, "answer": answer,
                   "example": {k: v for k, v in example.items() if k != "messages"}}
            if example["domain"] == "code":
                program = tasks.extract_code(answer)
                why["runs"] = [(stdin, result) for (source, stdin), result in list(runs) if source == program]
            if example["domain"] == "if":
                why["langdetect"] = [language for text, language in list(languages) if text == answer]
            failed.append(why)
    assert not failed, "\n".join(map(repr, failed))


def test_shipped_examples_fit_the_tiny_context(shipped):
    tokenizer = pytest.importorskip("tokenizer")
    if not (ROOT / "data" / "tokenizer.json").exists():
        pytest.skip("data/tokenizer.json not generated")
    tok = tokenizer.load_tokenizer()
    assert tok.vocab_size == 2048
    for split, examples in shipped.items():
        # tool and agent prompts carry tool specs, longctx prompts a document, agent and swe SFT rows whole
        # episodes: SFT packs 512-token rows; an RL or eval prompt of a multi-turn domain leaves room for its
        # turns and replies
        long = {"tool": 512, "longctx": 512, "agent": 512 if split == "sft" else 400,
                "swe": 512 if split == "sft" else 300}
        for domain in sorted({e["domain"] for e in examples}):
            longest = max(len(tok.encode(tokenizer.render_chat(e["messages"], tools=e.get("tools"),
                                                               add_generation_prompt=split != "sft")))
                          for e in examples if e["domain"] == domain)
            assert longest < long.get(domain, 200), f"{split} {domain}: {longest} tokens"


def test_shipped_sft_turns_fit_the_tiny_presets_turn_budget(shipped, generate):
    """Every assistant turn of the SFT rows, as the model writes it (through <|im_end|>), fits the per-turn token
    budget of the tiny RL preset (its held-out evaluations and every stage that trains the domain): a right answer
    the rollouts cut off earns 0, so SFT would teach an answer that RL and the scoreboard can never credit."""
    tokenizer = pytest.importorskip("tokenizer")
    import rl
    tok = tokenizer.load_tokenizer()
    cfg, stages, _ = rl.parse_args(["--config", str(ROOT / "configs" / "rl_tiny.json")])   # as rl.py runs it
    budget = {d: min([cfg.eval_max_new_tokens] + [s.max_new_tokens for s in stages if d in s.domains])
              for d in tasks.GRADED_DOMAINS}
    longest = {}
    for example in shipped["sft"]:
        first = next(i for i, m in enumerate(example["messages"]) if m["role"] == "assistant")
        prompt = dict(example, messages=example["messages"][:first])
        for _, text in generate.graded_turns(prompt, example["messages"][first:]):   # each turn as written
            n = len(tok.encode(text)) + 1                                           # and its stop token
            longest[example["domain"]] = max(longest.get(example["domain"], 0), n)
    assert set(longest) == set(tasks.GRADED_DOMAINS)
    assert all(longest[d] <= budget[d] for d in longest), {d: (longest[d], budget[d]) for d in longest}


def test_generator_is_deterministic_and_matches_the_shipped_files(shipped, generate):
    city_table = generate.build_city_table(0)
    for domain, make in (("math", generate.make_math), ("json", generate.make_json), ("mcqa", generate.make_mcqa),
                         ("tool", lambda r: generate.make_tool(r, city_table)), ("longctx", generate.make_longctx)):
        # the domain's pool of distinct prompts, which the three splits divide among them (shuffled)
        rng, prompts = random.Random(f"0:{domain}"), set()
        while len(prompts) < sum(generate.split_counts(domain).values()):
            prompts.add(make(rng)[0]["messages"][0]["content"])
        shipped_prompts = [e["messages"][0]["content"] for split in shipped.values() for e in split
                           if e["domain"] == domain]
        assert len(shipped_prompts) == len(prompts) and set(shipped_prompts) == prompts
