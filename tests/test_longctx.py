"""The longctx domain: its verifier on answers it has not seen, row checks naming the field, the loader on a row
in NeMo-Gym's long-context layout, the shipped rows; a long prompt's rollout (length buckets, prefill in pieces)
against repeated full forwards without a dense attention mask; the long-context stage of the 30B preset."""
import json
import os

import pytest
import torch

import common
import options
import model as model_module
import memory
import rl
import sample
import tasks
from model import Model
from tests.conftest import small_config
from tests.test_model import randomize
from tests.test_sample import greedy_reference
from tokenizer import encode_prompt, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THINK = "<think>\nBin 38 is in row 8.\nRow 8 has 9 coins.\n</think>\n"


def example(answer="9"):
    return tasks.example_from_row({"domain": "longctx", "messages": [{"role": "user", "content": "Records: ..."}],
                                   "answer": answer}, "test")


# -----------------------------------------------------------------------------
# The verifier

@pytest.mark.parametrize("gold,response,score", [
    ("9", THINK + "The answer is \\boxed{9}.", 1.0),
    ("9", THINK + "The answer is \\boxed{8}.", 0.0),                      # the first hop's row: wrong
    ("9", THINK + "\\boxed{8} no, \\boxed{9}", 1.0),                       # the last box counts
    ("9", THINK + "\\boxed{9} no, \\boxed{8}", 0.0),
    ("9", THINK + "The answer is 9.", 0.0),                                # no \boxed{}
    ("9", "<think>\nBin 38 is in row 8.\n\\boxed{9}", 0.0),               # the thought never closes
    ("12", THINK + "\\boxed{12.0}", 1.0),                                  # numbers by value
    ("1000", THINK + "\\boxed{1,000}", 1.0),
    ("65.8%", THINK + "\\boxed{65.8\\%}", 1.0),
    ("65.8%", THINK + "\\boxed{658%}", 0.0),                               # a decimal point is not punctuation
    ("The Blue Sea", THINK + "\\boxed{\\text{blue sea.}}", 1.0),          # case, articles, punctuation, \text
    ("Blue Sea", THINK + "\\boxed{Blue Lake}", 0.0),
    ("A", THINK + "\\boxed{a}", 1.0),                                      # an article-only answer stays one
    ("9", THINK + "\\boxed{}", 0.0),
])
def test_verifier_grades_the_last_box_by_normalised_exact_match(gold, response, score):
    assert tasks.reward(example(gold), response) == score


# -----------------------------------------------------------------------------
# Rows: checks and the released layout

def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("answer", [None, "", "  ", ["9"], True, {"value": 9}, "..."])
def test_a_bad_answer_is_named_with_file_line_and_field(tmp_path, answer):
    row = {"domain": "longctx", "messages": [{"role": "user", "content": "Records: ..."}]}
    if answer is not None:
        row["answer"] = answer
    path = write_rows(tmp_path / "bad.jsonl", [{"domain": "longctx", "messages": row["messages"], "answer": "9"}, row])
    with pytest.raises(tasks.ExampleError) as error:
        tasks.load_examples(path)
    assert error.value.where == f"{path}:2" and error.value.field == "answer"


# NeMo-Gym's long-context row (its AA-LCR resources server: the documents and the question in the prompt, the
# reference and provenance at the top level; graded there by an LLM judge)
PROMPT = ("BEGIN INPUT DOCUMENTS\n\nBEGIN DOCUMENT 1:\nThe plant made 40 units in May.\nEND DOCUMENT 1\n\n"
          "BEGIN DOCUMENT 2:\nJune output rose by a half.\nEND DOCUMENT 2\n\nEND INPUT DOCUMENTS\n\n"
          "Answer the following question using the input documents provided above.\n\nSTART QUESTION\n\n"
          "How many units did the plant make in June?\n\nEND QUESTION\n")
RELEASED = {"responses_create_params": {"input": [{"role": "user", "content": PROMPT}]},
            "agent_ref": {"type": "responses_api_agents", "name": "aalcr_simple_agent"},
            "document_category": "reports", "document_set_id": "set-7", "question_id": 3,
            "question": "How many units did the plant make in June?", "answer": "60 units",
            "data_source_filenames": "a.txt;b.txt", "data_source_urls": "https://example.com/a",
            "input_tokens": 90000, "input_tokens_band": "80k-100k"}


def test_released_long_context_rows_map_into_the_domain(tmp_path, capsys):
    by_field = {k: v for k, v in RELEASED.items() if k != "agent_ref"}               # no grader named: a field tells
    by_agent = {k: v for k, v in RELEASED.items() if k not in ("document_set_id", "input_tokens_band")}
    other = {"responses_create_params": {"input": [{"role": "user", "content": "Hi"}]}, "answer": "hello"}
    examples = tasks.load_examples(write_rows(tmp_path / "train.jsonl", [RELEASED, by_field, by_agent, other]))
    assert "1 no verifier for agent 'unknown'" in capsys.readouterr().out             # an answer alone is not enough
    assert [e["domain"] for e in examples] == ["longctx"] * 3
    mapped = examples[0]
    assert mapped["answer"] == "60 units" and len(mapped["messages"]) == 1
    content = mapped["messages"][0]["content"]
    assert content.startswith(PROMPT.rstrip()) and content.endswith("\n\nPut your final answer within \\boxed{}.")
    assert RELEASED["responses_create_params"]["input"][0]["content"] == PROMPT        # the row is left as it was
    assert tasks.reward(mapped, "<think>\n40 and a half of 40\n</think>\nJune: \\boxed{60 units}") == 1.0
    assert tasks.reward(mapped, "<think>\n40 and a half of 40\n</think>\nJune: \\boxed{60}") == 0.0   # exact match
    with pytest.raises(tasks.ExampleError, match="field 'answer'"):
        tasks.example_from_row(dict(RELEASED, answer=""), "row 9")


# -----------------------------------------------------------------------------
# The shipped rows

def shipped_rows(split, domains):
    """The shipped rows of these domains, checked as load_examples checks them (without the other domains' rows:
    checking every IF row takes seconds)."""
    with open(os.path.join(ROOT, "data", f"{split}.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [tasks.example_from_row(r, f"{split}.jsonl") for r in rows if r["domain"] in domains]


@pytest.fixture(scope="module")
def shipped():
    return {split: shipped_rows(split, {"longctx"}) for split in ("sft", "rl", "eval")}


def test_shipped_thoughts_read_back_records_of_their_document(shipped):
    """What SFT teaches: every line of a thought but a sum is a record of the prompt's document, and the boxed
    answer is the last record's count (a chain, a row), the sum, or, for a slip, the first hop's row."""
    assert [len(shipped[s]) for s in ("sft", "rl", "eval")] == [400, 300, 200]
    slips = 0
    for e in shipped["sft"]:
        records = set(e["messages"][0]["content"].split("Records:\n")[1].split("\n\n")[0].split("\n"))
        thought, answer = e["messages"][-1]["content"].removeprefix("<think>\n").split("\n</think>\n")
        lines = thought.split("\n")
        read = [line for line in lines if " + " not in line]
        assert read and all(line in records for line in read), e
        boxed = tasks.last_boxed(answer)
        if "teacher_slip" in e:
            slips += 1
            assert len(lines) == 1 and lines[0].startswith("Bin ") and boxed == lines[0].split()[-1].rstrip(".")
            assert tasks.reward(e, answer) == 0.0
        else:
            assert boxed == e["answer"] and tasks.reward(e, answer) == 1.0
    assert 0.2 < slips / len(shipped["sft"]) < 0.5                    # 70% of the chains, half the questions


def test_shipped_prompts_are_several_times_longer_than_the_other_domains():
    tok = load_tokenizer(os.path.join(ROOT, "data", "tokenizer.json"))
    lengths = {}
    for e in shipped_rows("eval", {"longctx", "math", "mcqa", "if"}):
        lengths.setdefault(e["domain"], []).append(len(encode_prompt(tok, e["messages"])))
    median = {d: sorted(ls)[len(ls) // 2] for d, ls in lengths.items()}
    assert median["longctx"] > 3 * max(median[d] for d in ("math", "mcqa", "if")), median


# -----------------------------------------------------------------------------
# A long prompt's rollout

def test_long_prompt_rollout_equals_the_full_forward_argmax_chain_without_a_dense_mask(shipped, monkeypatch):
    """Three shipped prompts (the longest, 457 tokens, one 10% shorter, the shortest), sampled greedily in one
    call: prefilled in length buckets, in pieces of 128 tokens (the later pieces continue the cache; the shorter
    row of a bucket starts with padding), then decoded; every token equals the argmax of full forwards over the
    growing sequence. No step builds a dense [T, S] mask, and the rollouts train as one packed row (doc_ids) with
    the log-probs of separate forwards."""
    tok = load_tokenizer(os.path.join(ROOT, "data", "tokenizer.json"))
    ids = sorted((encode_prompt(tok, e["messages"]) for e in shipped["eval"]), key=len)
    prompts = [ids[-1], next(p for p in reversed(ids) if len(p) < 0.9 * len(ids[-1])), ids[0]]
    assert len(prompts[0]) > 400 and len(sample._length_buckets([len(p) for p in prompts])) == 2
    torch.manual_seed(0)
    model = randomize(Model(small_config(vocab_size=tok.vocab_size, hybrid_override_pattern="M*EM*E",
                                         chunk_size=32, max_position_embeddings=1024))).eval()
    expected = [greedy_reference(model, p, 4) for p in prompts]

    def dense_mask(*args, **kwargs):
        raise AssertionError("a dense attention mask was built")
    monkeypatch.setattr(model_module, "build_attn_mask", dense_mask)
    out = sample.generate(model, prompts, 4, temperature=0, stop_token_ids=[], prefill_chunk=128)
    assert [c.tokens for c in out] == expected

    seqs = [p + c.tokens for p, c in zip(prompts, out)]
    ids = torch.tensor([sum(seqs, [])])
    doc = torch.tensor([[i for i, s in enumerate(seqs) for _ in s]])
    with torch.no_grad():
        packed = model.token_logprobs(ids[:, :-1], ids[:, 1:], doc_ids=doc[:, :-1])[0]
        starts = [0]
        for s in seqs:
            alone = model.token_logprobs(torch.tensor([s[:-1]]), torch.tensor([s[1:]]))[0]
            torch.testing.assert_close(packed[starts[-1]:starts[-1] + len(s) - 1], alone, atol=1e-4, rtol=0)
            starts.append(starts[-1] + len(s))


# -----------------------------------------------------------------------------
# The long-context stage

def test_the_30b_preset_trains_longctx_in_its_long_context_stage():
    preset = os.path.join(ROOT, "configs", "rl_nano_30b.json")
    with open(preset) as f:
        stages = [options.config_from_dict(rl.StageConfig, s, source=preset) for s in json.load(f)["stages"]]
    stage = next(s for s in stages if s.name == "long-context-rl")
    assert stage.domains == ("longctx",) and stage.steps == 30 and stage.context > stage.micro_batch_tokens
    cfg = rl.RLConfig()
    rl.check_stages(stages, cfg, common.Dist(world_size=8))
    nano = model_module.ModelConfig.from_json(os.path.join(ROOT, "configs", "nemotron3_nano_30b_a3b.json"))
    # one rollout of the whole context per forward; sample_batch prompts x rollouts sampled at that context
    assert memory.stage_memory_shape(preset + ":long-context-rl", nano, 8) == (
        stage.context, 1, stage.sample_batch * stage.rollouts, stage.context)
    with pytest.raises(options.ConfigError, match="leave room for a prompt"):
        rl.check_stages([rl.StageConfig(name="x", domains=("longctx",), max_new_tokens=512, context=512)], cfg,
                        common.Dist())
    with pytest.raises(sample.PromptTooLong, match="longctx"):        # the stage's context bounds its prompts
        sample.prompt_pools(shipped_rows("rl", {"longctx"}), ("longctx",), load_tokenizer(
            os.path.join(ROOT, "data", "tokenizer.json")), True, 64, 300, "test")
