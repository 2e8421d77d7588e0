"""Bad input, one row per case: the stage stops within seconds, before it loads a model or tokenizes data, with a
message naming the culprit, and every file of a good run already in the same out_dir is byte-identical after.

The sft cases run sft.main(parse_config(argv)) in this process (sft.tokenize and sft.build_model are replaced by
tripwires), the sample.py cases sample.main(argv); a few run the real scripts in a subprocess."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import common
import options
import sample
import sft
import tasks
from tests.conftest import small_config
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "data", "tokenizer.json")


def snapshot(directory):
    """sha256 of every file under directory (the lock file aside: it names whoever holds the lock last)."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            if name != ".lock":
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A finished tiny SFT run (checkpoint, export, eval.json) and the files the cases point at."""
    d = tmp_path_factory.mktemp("bad_input")
    tok = load_tokenizer(TOKENIZER)
    cfg = small_config(vocab_size=tok.vocab_size, hidden_size=32, hybrid_override_pattern="M*E", head_dim=8,
                       mamba_head_dim=8, ssm_state_size=8, chunk_size=16, n_routed_experts=4,
                       moe_intermediate_size=16, moe_shared_expert_intermediate_size=16,
                       max_position_embeddings=512)
    (d / "model.json").write_text(json.dumps(cfg.to_hf()))
    other = dict(cfg.to_hf(), hidden_size=48)
    (d / "other_model.json").write_text(json.dumps(other))
    typo = dict(cfg.to_hf())
    typo["hiden_size"] = typo.pop("hidden_size")
    (d / "typo_model.json").write_text(json.dumps(typo))
    (d / "empty_model.json").write_text("{}")
    with open(os.path.join(ROOT, "data", "sft.jsonl")) as f:
        rows = [json.loads(ln) for ln in f][::96][:24]
    (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad_char = json.loads(json.dumps(rows))
    bad_char[3]["messages"][0]["content"] += "\ud800"
    (d / "bad_char.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad_char))
    no_messages = [dict(r) for r in rows]
    no_messages[5].pop("messages")
    (d / "no_messages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in no_messages))
    with open(os.path.join(ROOT, "data", "eval.jsonl")) as f:
        evals = [json.loads(ln) for ln in f]
    one_each = list({r["domain"]: r for r in evals}.values())
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in one_each))
    (d / "eval_unknown.jsonl").write_text(json.dumps(dict(one_each[0], domain="chemistry")) + "\n")
    (d / "eval_empty.jsonl").write_text("")
    long_one = json.loads(json.dumps(one_each[1]))                 # its prompt alone outgrows the 512-token context
    long_one["messages"][-1]["content"] += " word" * 600
    (d / "eval_long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [one_each[0], long_one]))
    (d / "a_file").write_text("not a directory")

    run = d / "run"
    sft.main(options.parse_config(sft.SFTConfig, argv(d, max_steps=2, eval_data=d / "eval.jsonl")))
    export = run / "export"
    (d / "scores.json").write_text('{"good": true}\n')

    broken = d / "broken_export"                       # a copy of the export with a truncated safetensors
    shutil.copytree(export, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:len(data) // 2])
    other_stage = d / "rl_run"                         # an out_dir holding another stage's checkpoints
    common.claim_out_dir(other_stage, "rl")
    common.release_out_dir(other_stage)
    (other_stage / "checkpoints").mkdir()
    step = sorted((run / "checkpoints").glob("step_*"))[-1]
    no_tokenizer = d / "no_tokenizer"                  # an export whose tokenizer.json went missing
    shutil.copytree(export, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    legacy = d / "legacy_run"                          # checkpoints from before run.json, and no export yet
    shutil.copytree(run / "checkpoints", legacy / "checkpoints")
    return dict(d=d, run=run, export=export, broken=broken, step=step, other_stage=other_stage, legacy=legacy,
                no_tokenizer=no_tokenizer)


def argv(d, **kw):
    opts = dict(model=d / "model.json", train_data=d / "sft.jsonl", out_dir=d / "run", tokenizer=TOKENIZER,
                seq_len=128, micro_batch=2, global_batch=4, max_steps=2, eval_every=0, save_every=0,
                val_fraction=0.1, eval_data="", eval_per_domain=1, eval_max_new_tokens=4, warmup_steps=1,
                device="cpu")
    opts.update(kw)
    return [f"--{k}={v}" for k, v in opts.items()]


# (id, options over the good run's, words the message must hold); {d} and the fixture's names are filled in
SFT_CASES = [
    ("export_dtype_alias", dict(export_dtype="bf16"), ["--export_dtype=bf16", "bfloat16"]),
    ("export_dtype_int8", dict(export_dtype="int8"), ["--export_dtype=int8"]),
    ("train_data_typo", dict(train_data="{d}/sftt.jsonl"), ["--train_data", "sftt.jsonl", "not looked up"]),
    ("train_data_relative_typo", dict(train_data="data/sftt.jsonl"), ["--train_data=data/sftt.jsonl"]),
    ("eval_data_typo", dict(eval_data="{d}/evall.jsonl"), ["--eval_data", "evall.jsonl"]),
    ("max_steps_negative", dict(max_steps=-3), ["--max_steps=-3", ">= 0"]),
    ("schedule_unknown", dict(schedule="linear"), ["--schedule=linear", "cosine"]),
    ("micro_batch_zero", dict(micro_batch=0), ["--micro_batch=0"]),
    ("val_fraction_one", dict(val_fraction=1.0), ["--val_fraction=1.0"]),
    ("betas_one_value", dict(betas="0.9"), ["--betas", "2 comma-separated"]),
    ("betas_out_of_range", dict(betas="0.9,1.5"), ["--betas", "1.5"]),
    ("lr_nan", dict(lr="nan"), ["--lr=nan"]),
    ("global_batch_not_multiple", dict(global_batch=3), ["--global_batch=3", "micro_batch"]),
    ("eval_per_domain_negative", dict(eval_per_domain=-1, eval_data="{d}/eval.jsonl"), ["--eval_per_domain=-1"]),
    ("device_unknown", dict(device="tpu"), ["--device=tpu"]),
    ("bf16_without_torchrun", dict(bf16="true"), ["--bf16", "torchrun"]),
    ("bool_garbage", dict(thinking="maybe"), ["--thinking", "true/false"]),
    ("model_missing", dict(model="{d}/nope.json"), ["--model", "nope.json"]),
    ("model_is_a_stage_preset", dict(model=os.path.join(ROOT, "configs", "sft_nano_30b.json")),
     ["sft_nano_30b.json", "not a model config"]),
    ("model_key_typo", dict(model="{d}/typo_model.json"), ["hiden_size", "did you mean hidden_size"]),
    ("model_empty_json", dict(model="{d}/empty_model.json"), ["empty_model.json", "missing field", "hidden_size"]),
    ("model_is_training_checkpoint", dict(model="{step}"), ["training checkpoint", "export"]),
    ("model_is_run_dir", dict(model="{run}"), ["no config.json", "export"]),
    ("model_truncated_safetensors", dict(model="{broken}"), ["model.safetensors", "truncated"]),
    ("model_inside_out_dir", dict(model="{export}"), ["lies inside --out_dir", "choose another"]),
    ("tokenizer_missing", dict(tokenizer="{d}/tok.json"), ["--tokenizer", "tok.json"]),
    ("tokenizer_empty_for_config", dict(tokenizer=""), ["--tokenizer", "no tokenizer"]),
    ("train_subset_on_file", dict(train_subset="math"), ["--train_subset=math", "not to the file"]),
    ("train_split_on_file", dict(train_split="test"), ["--train_split=test"]),
    ("out_dir_is_a_file", dict(out_dir="{d}/a_file"), ["--out_dir", "not a directory"]),
    ("eval_unknown_domain", dict(eval_data="{d}/eval_unknown.jsonl"), ["--eval_data", "chemistry"]),
    ("eval_empty_file", dict(eval_data="{d}/eval_empty.jsonl"), ["--eval_data", "no examples"]),
    ("eval_prompt_longer_than_context", dict(eval_data="{d}/eval_long.jsonl"),
     ["--eval_data", "example 1", "context of 512", "--eval_max_new_tokens"]),
    ("row_invalid_character", dict(train_data="{d}/bad_char.jsonl"), ["bad_char.jsonl:4", "invalid character"]),
    ("row_without_messages", dict(train_data="{d}/no_messages.jsonl"), ["no_messages.jsonl:6", "messages"]),
    ("out_dir_of_another_model", dict(model="{d}/other_model.json"), ["another model", "hidden_size"]),
    ("out_dir_of_another_stage", dict(out_dir="{other_stage}"), ["rl run", "own --out_dir"]),
    ("out_dir_of_another_model_no_run_json", dict(out_dir="{legacy}", model="{d}/other_model.json"),
     ["another model", "embeddings.weight: (2048, 32) there, (2048, 48) now"]),
]


def fill(value, good):
    return str(value).format(**{k: str(v) for k, v in good.items()})


@pytest.mark.parametrize("case,opts,words", SFT_CASES, ids=[c[0] for c in SFT_CASES])
def test_sft_bad_input(good, case, opts, words, monkeypatch, capsys):
    def tripwire(*a, **k):
        raise AssertionError("the run got past its checks: it tokenized data or built the model")
    monkeypatch.setattr(sft, "tokenize", tripwire)
    monkeypatch.setattr(sft, "build_model", tripwire)
    before = snapshot(good["run"])
    t0 = time.perf_counter()
    with pytest.raises((SystemExit, ValueError)) as e:            # option errors exit; the rest are ConfigError,
                                                                   # ExampleError (common.run_main: exit 2 too)
        sft.main(options.parse_config(sft.SFTConfig, argv(good["d"], **{k: fill(v, good) for k, v in opts.items()})))
    seconds = time.perf_counter() - t0
    message = capsys.readouterr().err if e.type is SystemExit else str(e.value)
    if e.type is SystemExit:
        assert e.value.code != 0
    for w in words:
        assert w in message, f"{case}: {w!r} not in:\n{message}"
    assert "AssertionError" not in message and seconds < 5, (case, seconds)
    assert snapshot(good["run"]) == before


def test_same_model_may_resume_checkpoints_from_before_run_json(good):
    from model import ModelConfig
    common.claim_out_dir(good["legacy"], "sft", ModelConfig.from_json(good["d"] / "model.json"))
    common.release_out_dir(good["legacy"])
    assert json.loads((good["legacy"] / "run.json").read_text())["model"]["hidden_size"] == 32


def test_seq_len_too_short_names_seq_len_before_the_model(good, monkeypatch):
    """No assistant token survives in any row: stopped after packing, before a model exists (not as a NaN)."""
    monkeypatch.setattr(sft, "build_model", lambda *a: pytest.fail("built the model"))
    before = snapshot(good["run"])
    with pytest.raises(options.ConfigError, match=r"--seq_len=16"):
        sft.main(options.parse_config(sft.SFTConfig, argv(good["d"], seq_len=16)))
    assert snapshot(good["run"]) == before


def test_busy_out_dir_names_the_other_process(good):
    common.release_out_dir(good["run"])           # as if this process's earlier runs had ended
    holder = subprocess.Popen(
        [sys.executable, "-c", "import common, sys, time; common.claim_out_dir(sys.argv[1], 'sft'); "
         "print('held', flush=True); time.sleep(60)", str(good["run"])],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(good["run"])
        with pytest.raises(options.ConfigError, match=rf"in use by pid {holder.pid} on "):
            sft.main(options.parse_config(sft.SFTConfig, argv(good["d"])))
        assert snapshot(good["run"]) == before
    finally:
        holder.kill()
        holder.wait()


def test_bare_boolean_flag_means_true_and_json_types_are_checked(tmp_path):
    cfg = options.parse_config(sft.SFTConfig, ["--activation_checkpointing", "--thinking", "false"])
    assert cfg.activation_checkpointing is True and cfg.thinking is False
    (tmp_path / "preset.json").write_text(json.dumps({"seq_len": "long"}))
    with pytest.raises(SystemExit):
        options.parse_config(sft.SFTConfig, [f"--config={tmp_path / 'preset.json'}"])


def test_a_stage_adds_its_own_checks_in_one_line():
    """The hook rl.py / distill.py use: validate() returns check_fields(...) problems, reported with the shared."""
    from dataclasses import dataclass

    @dataclass
    class StageConfig:
        out_dir: str = "out/x"
        lr: float = -1.0
        group_size: int = 0

        def validate(self):
            return options.check_fields(self, group_size=options.at_least(1))

    with pytest.raises(options.ConfigError) as e:
        options.check_config(StageConfig())
    assert "2 problem(s)" in str(e.value) and "--lr=-1.0: must be > 0" in str(e.value)
    assert "--group_size=0: must be >= 1" in str(e.value)
    assert options.config_from_dict(StageConfig, {"lr": -2.0}, check=False).lr == -2.0   # a partial preset
    with pytest.raises(options.ConfigError, match="--lr=-2.0"):
        options.config_from_dict(StageConfig, {"lr": -2.0, "group_size": 1})


# sample.py: (id, argv after --ckpt, words); the checkpoint is the good run's export unless the argv names one
SAMPLE_CASES = [
    ("ckpt_is_training_checkpoint", ["--ckpt", "{step}"], ["training checkpoint", "{run}/export"]),
    ("ckpt_is_run_dir", ["--ckpt", "{run}"], ["{run}/export"]),
    ("ckpt_truncated_safetensors", ["--ckpt", "{broken}"], ["{broken}/model.safetensors", "truncated"]),
    ("ckpt_missing", ["--ckpt", "{d}/nope"], ["--ckpt", "no such directory"]),
    ("max_new_tokens_negative", ["--max-new-tokens", "-5"], ["--max-new-tokens -5"]),
    ("limit_zero", ["--limit", "0", "--eval", "{d}/eval.jsonl"], ["--limit 0"]),
    ("n_zero", ["--n", "0"], ["--n 0"]),
    ("top_p_zero", ["--top-p", "0"], ["--top-p 0"]),
    ("eval_unknown_domain", ["--eval", "{d}/eval_unknown.jsonl"], ["--eval", "chemistry"]),
    ("eval_empty_file", ["--eval", "{d}/eval_empty.jsonl"], ["--eval", "no examples"]),
    ("eval_missing_file", ["--eval", "{d}/evall.jsonl"], ["evall.jsonl"]),
    ("eval_prompt_longer_than_context", ["--eval", "{d}/eval_long.jsonl", "--max-new-tokens", "4"],
     ["--eval {d}/eval_long.jsonl: example 1", "context of 512", "--long-prompt cut"]),
    ("out_not_writable", ["--eval", "{d}/eval.jsonl", "--out", "{d}/a_file/scores.json"], ["--out", "a_file"]),
    ("out_is_a_directory", ["--eval", "{d}/eval.jsonl", "--out", "{d}"], ["--out", "is a directory"]),
    ("tokenizer_missing", ["--tokenizer", "{d}/tok.json"], ["--tokenizer", "tok.json"]),
    ("ckpt_without_tokenizer", ["--ckpt", "{no_tokenizer}"], ["no tokenizer.json in directory {no_tokenizer}"]),
]


@pytest.mark.parametrize("case,args,words", SAMPLE_CASES, ids=[c[0] for c in SAMPLE_CASES])
def test_sample_bad_input(good, case, args, words, monkeypatch, capsys):
    import model
    monkeypatch.setattr(model.Model, "from_pretrained", classmethod(lambda *a, **k: pytest.fail("loaded")))
    args = [fill(a, good) for a in args]
    if "--ckpt" not in args:
        args = ["--ckpt", str(good["export"])] + args
    scores = good["d"] / "scores.json"
    before = scores.read_bytes(), snapshot(good["run"])
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        sample.main(args + ["--device", "cpu"] + ([] if "--out" in args else ["--out", str(scores)]))
    assert e.value.code != 0 and time.perf_counter() - t0 < 5
    message = capsys.readouterr().err
    for w in words:
        assert fill(w, good) in message, f"{case}: {fill(w, good)!r} not in:\n{message}"
    assert (scores.read_bytes(), snapshot(good["run"])) == before


def test_sample_refuses_or_cuts_a_prompt_longer_than_the_context(good, capsys):
    """The export's context is 512 tokens (max_position_embeddings): a longer prompt is refused, or with
    --long-prompt cut, its oldest tokens are dropped with a warning and the answer is generated."""
    base = ["--ckpt", str(good["export"]), "--prompt", "word " * 600, "--max-new-tokens", "2", "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        sample.main(base)
    err = capsys.readouterr().err
    assert e.value.code != 0 and "context of 512" in err and "--long-prompt cut" in err
    sample.main(base + ["--long-prompt", "cut"])
    err = capsys.readouterr().err
    assert "warning:" in err and "cutting its first" in err and "finish:" in err
    out = good["d"] / "long_scores.json"                 # an --eval file: its long example is cut, then scored
    result = sample.main(["--ckpt", str(good["export"]), "--eval", str(good["d"] / "eval_long.jsonl"), "--out",
                          str(out), "--max-new-tokens", "2", "--device", "cpu", "--long-prompt", "cut"])
    err = capsys.readouterr().err
    assert "example 1" in err and "cutting its first" in err and len(result["rewards"]) == 2 and out.exists()


# -- the real scripts, as a user runs them ------------------------------------------------------------------------


def run_script(*cmd, stdin=None, timeout=60):
    return subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, timeout=timeout, input=stdin,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))


def test_scripts_stop_at_once_on_bad_options(good):
    common.release_out_dir(good["run"])           # held since an in-process case above got past the claim
    before = snapshot(good["run"])
    t0 = time.perf_counter()
    r = run_script("sft.py", *argv(good["d"], export_dtype="bf16", train_data="data/sftt.jsonl"))
    err = r.stderr.decode()
    assert r.returncode == 2 and "2 problem(s)" in err and "--export_dtype=bf16" in err and "data/sftt.jsonl" in err
    r = run_script("sample.py", "--ckpt", str(good["step"]), "--prompt", "hi")
    assert r.returncode == 2 and f"{good['run']}/export" in r.stderr.decode()
    r = run_script("sft.py", *argv(good["d"], train_data=good["d"] / "bad_char.jsonl"))   # found after parsing
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err and "bad_char.jsonl:4" in err, err
    assert time.perf_counter() - t0 < 30
    assert snapshot(good["run"]) == before


def test_chat_keeps_its_session_on_undecodable_input(good):
    r = run_script("sample.py", "--ckpt", str(good["export"]), "--max-new-tokens", "2", "--device", "cpu",
                   stdin=b"caf\xe9 \xff\nhi\n/exit\n")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "not valid UTF-8" in err and "tokens/s" in err          # the next line was answered


def test_readme_commands(monkeypatch, capsys):
    """The docs' 2-process SFT command fits its global batch; the README's test command selects tests; --help only
    helps."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert options.parse_config(sft.SFTConfig, ["--micro_batch=4"]).micro_batch == 4
    with pytest.raises(SystemExit):
        options.parse_config(sft.SFTConfig, [])
    assert "--micro_batch=4" in capsys.readouterr().err               # the error says what would be right
    readme = open(os.path.join(ROOT, "README.md")).read()
    scale_page = open(os.path.join(ROOT, "docs", "sft-and-scale.md")).read()
    assert "torchrun --nproc_per_node=2 sft.py --micro_batch=4" in scale_page
    assert "./test.sh tests/test_model.py -k transformers" in readme
    assert "def test_logits_match_transformers" in open(os.path.join(ROOT, "tests", "test_model.py")).read()
    t0 = time.perf_counter()
    r = run_script(os.path.join("bench", "bench_moe.py"), "--help")
    assert r.returncode == 0 and b"usage:" in r.stdout and time.perf_counter() - t0 < 20


# -- tasks: data files and verifier arguments ----------------------------------------------------------------------


def test_parquet_in_the_project_schema_loads_every_domain(tmp_path):
    """pandas/pyarrow store dicts as structs with every row's keys (absent ones null): mcqa options, JSON schemas
    and IF kwargs must come back as they were written, for every domain and for a file mixing them."""
    pd = pytest.importorskip("pandas")
    with open(os.path.join(ROOT, "data", "eval.jsonl")) as f:
        rows = [json.loads(ln) for ln in f]
    mixed = [r for d in sorted({r["domain"] for r in rows}) for r in [x for x in rows if x["domain"] == d][:4]]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
    pd.DataFrame(mixed).to_parquet(tmp_path / "mixed.parquet")
    from_jsonl = tasks.load_examples(str(tmp_path / "mixed.jsonl"))
    from_parquet = tasks.load_examples(str(tmp_path / "mixed.parquet"))
    assert {e["domain"] for e in from_parquet} == set(tasks.GRADED_DOMAINS) & {r["domain"] for r in rows}
    assert from_parquet == from_jsonl


@pytest.mark.parametrize("response", [None, b"\\boxed{4}", 4])
def test_reward_names_a_response_that_is_not_text(response):
    example = {"domain": "math", "messages": [{"role": "user", "content": "2+2?"}], "answer": "4"}
    with pytest.raises(TypeError, match="response must be the decoded text"):
        tasks.reward(example, response)


def test_if_verifiers_refuse_negative_counts(tmp_path):
    with pytest.raises(ValueError, match="let_frequency=-2"):
        tasks.check_instruction("keywords:letter_frequency", "aaa", dict(letter="a", let_frequency=-2,
                                                                         let_relation="at least"))
    with pytest.raises(ValueError, match="num_words=-1"):
        tasks.check_instruction("length_constraints:number_words", "a b c", dict(num_words=-1, relation="at least"))
    row = {"domain": "if", "messages": [{"role": "user", "content": "Write."}],
           "instruction_id_list": ["keywords:letter_frequency"],
           "kwargs": [{"letter": "a", "let_frequency": -2, "let_relation": "at least"}]}
    (tmp_path / "if.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(tasks.ExampleError, match=r"if.jsonl:1.*let_frequency=-2"):
        tasks.load_examples(str(tmp_path / "if.jsonl"))


def test_run_main_frees_the_out_dir_when_the_stage_fails(tmp_path):
    """A stage that took its out_dir and then found bad input exits 2 and leaves the out_dir free (in a process
    that lives on, the next run into it would otherwise be told the directory is busy, by this very process)."""
    def stage(out_dir):
        common.claim_out_dir(out_dir, "sft")
        raise options.ConfigError("--train_data: a bad row")
    with pytest.raises(SystemExit) as e:
        common.run_main(stage, tmp_path / "run")
    assert e.value.code == 2
    other = subprocess.run([sys.executable, "-c", "import common, sys; common.claim_out_dir(sys.argv[1], 'sft')",
                            str(tmp_path / "run")], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                           capture_output=True, text=True)
    assert other.returncode == 0, other.stderr         # else: "in use by pid <this process>"
