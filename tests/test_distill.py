"""distill.py (MOPD): Eq. 4 and its gradient by hand, student == teacher gives nothing to learn, per-domain routing
to teachers, a toy pair where the student moves to the teacher's choice, cascade.json, kill/resume, vocabularies."""
import json
import math
import os
import sys

import pytest
import torch

import common
import distill
import options
import sample
from model import Model
from tests.test_rl import (AGENT_ROW, D1, one_thread, random_model, run_torchrun,  # noqa: F401 (one_thread: autouse)
                           toy_export)
from tests.test_sft import run_killing_group
from tokenizer import train_bpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_loss_and_gradient_by_hand():
    lp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    teacher = torch.tensor([[-0.5, -3.0], [-0.2, 0.0]])
    sampler = torch.tensor([[-1.0, -2.8], [-0.7, 0.0]])      # ratios 1, e^0.8 = 2.23 (cut), e^0.2 = 1.22
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, adv, weight = distill.mopd_loss(lp, teacher, sampler, mask, n_sequences=2)
    r3 = math.exp(0.2)
    seq1 = (1.0 * 0.5 * -1.0 + 0.0) / 2                       # the second token's weight is cut off: 0
    seq2 = r3 * 0.3 * -0.5 / 1                                # one valid token (per-sequence normalisation)
    assert loss.item() == pytest.approx(-(seq1 + seq2) / 2)
    torch.testing.assert_close(adv, torch.tensor([[0.5, -1.0], [0.3, 0.0]]))
    torch.testing.assert_close(weight, torch.tensor([[1.0, 0.0], [r3, 0.0]]))
    loss.backward()
    # the weight and the advantage are stop-gradient: d loss / d lp_t = -(1/n_seq) (1/|y|) w_t a_t
    expected = torch.tensor([[-(1 / 2) * (1 / 2) * 0.5, 0.0], [-(1 / 2) * r3 * 0.3, 0.0]])
    torch.testing.assert_close(lp.grad, expected)


def cfg_for(**kw):
    return distill.MOPDConfig(**dict(dict(micro_batch_tokens=20, grad_clip=0.0), **kw))


@pytest.fixture(scope="module")
def student_rollouts():
    model = random_model(seed=4, vocab_size=64)
    prompts = [[1, 3, 30, 31], [1, 3, 40, 41, 42]]
    outs = sample.generate(model, prompts, 6, n=3, seed=0, stop_token_ids=list(range(5, 20)))
    return model, [p for p in prompts for _ in range(3)], outs


def test_student_equal_to_teacher_learns_nothing(student_rollouts):
    model, prompts, outs = student_rollouts
    teacher = random_model(seed=4, vocab_size=64).requires_grad_(False)      # the same weights, frozen
    doms = ["x"] * 3 + ["y"] * 3
    t_lp = distill.score_with_teachers({"t": teacher}, {"x": teacher, "y": teacher}, prompts, outs, doms, 20, D1, 0)
    model.zero_grad(set_to_none=True)
    stats = distill.train_step(model, prompts, outs, t_lp, doms, ["x", "y"], cfg_for(), D1, 0)
    assert abs(stats["reverse_kl"]) < 1e-6 and abs(stats["loss"]) < 1e-7
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and stats["weight_cut_frac"] == 0
    assert max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None) < 1e-6
    model.zero_grad(set_to_none=True)


def test_each_row_is_scored_by_its_own_domain_teacher(student_rollouts):
    _, prompts, outs = student_rollouts
    t_x, t_y = random_model(seed=5, vocab_size=64), random_model(seed=6, vocab_size=64)
    doms = ["x", "y", "x", "y", "y", "x"]
    got = distill.score_with_teachers({"a": t_x, "b": t_y}, {"x": t_x, "y": t_y}, prompts, outs, doms, 15, D1, 0)
    for i, dom in enumerate(doms):
        own, other = (t_x, t_y) if dom == "x" else (t_y, t_x)
        ids = torch.tensor([prompts[i] + outs[i].tokens[:-1]])                  # the rollout alone, unpacked
        targets = torch.tensor([[-100] * (len(prompts[i]) - 1) + outs[i].tokens])
        with torch.no_grad():
            want = own(ids, targets=targets)[targets >= 0]
            wrong = other(ids, targets=targets)[targets >= 0]
        torch.testing.assert_close(torch.tensor(got[i]), want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(torch.tensor(got[i]), wrong, atol=1e-3)


def test_toy_pair_student_moves_to_the_teacher(tmp_path):
    A, B, STOP = 294, 1181, 4                      # ' the', ' cat', <|im_end|>
    teacher = Model.from_pretrained(toy_export(tmp_path / "t", {A: 3.0, B: -1.0, STOP: 1.0})).requires_grad_(False)
    student = Model.from_pretrained(toy_export(tmp_path / "s", {A: -1.0, B: 3.0, STOP: 1.0}))
    cfg = cfg_for(micro_batch_tokens=16, lr=3e-2, grad_clip=1.0)
    optimizer = common.make_optimizer(student, cfg.lr, cfg.betas, 0.0)
    prompts = [[1, 3, 30 + k] for k in range(4)]
    kls, share_a = [], []
    for step in range(25):
        outs = sample.generate(student, prompts, 6, n=4, seed=step, stop_token_ids=[STOP])
        rows = [p for p in prompts for _ in range(4)]
        t_lp = distill.score_with_teachers({"t": teacher}, {"x": teacher}, rows, outs, ["x"] * 16, 16, D1, 0)
        stats = distill.train_step(student, rows, outs, t_lp, ["x"] * 16, ["x"], cfg, D1, 0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        toks = [t for c in outs for t in c.tokens if t != STOP]
        kls.append(stats["reverse_kl_x"])
        share_a.append(sum(t == A for t in toks) / max(len(toks), 1))
    assert kls[0] > 1.0 and sum(kls[-3:]) / 3 < 0.2 * kls[0], kls
    assert share_a[0] < 0.1 and sum(share_a[-3:]) / 3 > 0.8, share_a


# -- the whole stage ---------------------------------------------------------------------------------------------

IF_ROW = {"domain": "if", "messages": [{"role": "user", "content": "Write about cats. Do not use any commas."}],
          "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
MCQA_ROW = {"domain": "mcqa", "messages": [{"role": "user", "content": "Pick one.\nA. x\nB. y\nAnswer in \\boxed{}."}],
            "answer": "A", "options": [{"A": "x"}, {"B": "y"}]}


@pytest.fixture
def cascade_dir(tmp_path):
    """Two toy checkpoints: "sft" scored best on if, "a" best on mcqa (and the student: the last row)."""
    sft = toy_export(tmp_path / "sft", {294: 1.0, 24: 0.0, 4: 0.0})
    a = toy_export(tmp_path / "a", {294: 0.0, 1181: 1.0, 24: 0.5, 4: 0.0}, seed=1)
    rows = [dict(name="sft", checkpoint=str(sft), trained=[], scores={"if": 0.5, "mcqa": 0.1}),
            dict(name="a", checkpoint=str(a), trained=["if"], scores={"if": 0.4, "mcqa": 0.3})]
    evaluation = dict(data=str(tmp_path / "eval.jsonl"), per_domain=1, max_new_tokens=6, thinking=False)
    (tmp_path / "cascade.json").write_text(json.dumps(dict(domains=["if", "mcqa"], evaluation=evaluation, rows=rows)))
    (tmp_path / "rl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [IF_ROW] * 3 + [MCQA_ROW] * 3))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [IF_ROW, MCQA_ROW] * 2))
    return tmp_path


def mopd_args(root, out="mopd", **kw):
    opts = dict(cascade=root / "cascade.json", out_dir=root / out, train_data=root / "rl.jsonl", steps=3,
                prompts_per_step=2, rollouts=2, max_new_tokens=8, thinking="false", lr=1e-2, warmup_steps=2,
                save_every=1, device="cpu")
    opts.update(kw)
    return [f"--{k}={v}" for k, v in opts.items()]


def test_teachers_row_resume_and_skip(cascade_dir, capsys):
    root = cascade_dir
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, os.path.join(ROOT, "distill.py")]
    (root / "c1.json").write_text((root / "cascade.json").read_text())     # the uninterrupted run's own copy
    whole = run_killing_group(cmd + mopd_args(root, "whole", cascade=root / "c1.json"), env=env)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert "teacher for if    = sft (score 0.500)" in whole.stdout              # the best row per domain
    assert "teacher for mcqa  = a (score 0.300)" in whole.stdout
    killed = run_killing_group(cmd + mopd_args(root, "resumed", inject_kill_at_step=2), env=env)
    assert killed.returncode == -9
    args = mopd_args(root, "resumed")
    cascade = distill.main(options.parse_config(distill.MOPDConfig, args))          # resumes in-process
    assert "resuming from" in capsys.readouterr().out
    losses = lambda out: [(r["step"], r["loss"], r["reverse_kl"]) for r in
                          common.read_metrics(root / out / "metrics.jsonl") if "loss" in r]
    assert losses("resumed") == losses("whole") and len(losses("whole")) == 3
    row = cascade["rows"][-1]
    assert [r["name"] for r in cascade["rows"]] == ["sft", "a", "mopd"]
    assert row["teachers"] == {"if": "sft", "mcqa": "a"} and set(row["scores"]) == {"if", "mcqa"}
    assert cascade["evaluation"]["per_domain"] == 1                    # scored as the rows before it were
    Model.from_pretrained(row["checkpoint"])
    assert os.path.isfile(root / "resumed" / "curves.png")
    distill.main(options.parse_config(distill.MOPDConfig, args))                    # finished: skipped
    assert "finished earlier" in capsys.readouterr().out


def test_a_redone_mopd_never_teaches_itself():
    # MOPD redone (its directory deleted, its row still in cascade.json): the old "mopd" row, best on mcqa and tied
    # on if (ties go to the later row), must not become a teacher; named in --teachers it still may
    rows = [dict(name="sft", checkpoint="s", scores={"if": 0.5, "mcqa": 0.1}),
            dict(name="a", checkpoint="a", scores={"if": 0.4, "mcqa": 0.3}),
            dict(name="mopd", checkpoint="m", scores={"if": 0.5, "mcqa": 0.9})]
    chosen = distill.pick_teachers(dict(rows=rows), ["if", "mcqa"], [], "c.json")
    assert chosen == {"if": ("sft", "s", 0.5), "mcqa": ("a", "a", 0.3)}
    assert distill.pick_teachers(dict(rows=rows), ["mcqa"], ["mcqa=mopd"], "c.json")["mcqa"][0] == "mopd"


def test_refuses_a_teacher_with_another_vocabulary(cascade_dir):
    root = cascade_dir
    other = toy_export(root / "other", {4: 0.0})
    train_bpe(["a tiny other vocabulary"] * 20, vocab_size=300).save_pretrained(other)
    with pytest.raises(ValueError, match=r"teacher .*other.* has another vocabulary than the student .*a\)"):
        distill.main(options.parse_config(distill.MOPDConfig, mopd_args(root, teachers=f"mcqa={other}")))
    with pytest.raises(ValueError, match="neither a row of"):
        distill.main(options.parse_config(distill.MOPDConfig, mopd_args(root, teachers="mcqa=nope")))


def test_two_processes_distill(cascade_dir):
    """Under FSDP2 with 2 processes: the student samples through sampling_weights, sharded teachers score each
    process's rows (equal forward counts per teacher), and the mopd row is written."""
    root = cascade_dir
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = run_torchrun([os.path.join(ROOT, "distill.py")] + mopd_args(root, "two", steps=2), env)
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads((root / "cascade.json").read_text())["rows"][-1]
    assert row["name"] == "mopd" and row["teachers"] == {"if": "sft", "mcqa": "a"}
    assert len(common.read_metrics(root / "two" / "metrics.jsonl")) >= 2


# -- a multi-turn domain: the student plays episodes, the teacher scores only the student's tokens --------------

@pytest.fixture
def agent_cascade_dir(tmp_path):
    """The toy checkpoints, now also writing <tool_call> (id 7): an agent turn with that unparsable markup gets an
    error observation and the episode goes on, so the student's rollouts are episodes of several turns."""
    sft = toy_export(tmp_path / "sft", {294: 1.0, 24: 0.0, 4: 0.0, 7: 0.5})
    a = toy_export(tmp_path / "a", {294: 0.0, 1181: 1.0, 24: 0.5, 4: 0.0, 7: 1.0}, seed=1)
    rows = [dict(name="sft", checkpoint=str(sft), trained=[], scores={"if": 0.5, "agent": 0.1}),
            dict(name="a", checkpoint=str(a), trained=["agent"], scores={"if": 0.4, "agent": 0.3})]
    evaluation = dict(data=str(tmp_path / "eval.jsonl"), per_domain=1, max_new_tokens=6, max_episode_tokens=40,
                      thinking=False)
    (tmp_path / "cascade.json").write_text(json.dumps(dict(domains=["agent", "if"], evaluation=evaluation,
                                                           rows=rows)))
    (tmp_path / "rl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [IF_ROW] * 3 + [AGENT_ROW] * 3))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [IF_ROW, AGENT_ROW]))
    return tmp_path


@pytest.mark.parametrize("nproc", [1, 2])
def test_episodes_are_distilled_and_resume_after_a_kill(agent_cascade_dir, nproc):
    root = agent_cascade_dir
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    script = os.path.join(ROOT, "distill.py")
    run = (lambda args: run_killing_group([sys.executable, script] + args, env=env)) if nproc == 1 else \
        (lambda args: run_torchrun([script] + args, env))
    opts = dict(max_new_tokens=4, max_episode_tokens=40)
    (root / "c1.json").write_text((root / "cascade.json").read_text())
    whole = run(mopd_args(root, "whole", cascade=root / "c1.json", **opts))
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "teacher for agent = a (score 0.300)" in whole.stdout
    killed = run(mopd_args(root, "resumed", inject_kill_at_step=2, **opts))
    assert killed.returncode != 0
    resumed = run(mopd_args(root, "resumed", **opts))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = lambda out: [(r["step"], r["loss"], r.get("reverse_kl_agent"), r["response_len"])
                       for r in common.read_metrics(root / out / "metrics.jsonl") if "loss" in r]
    assert log("resumed") == log("whole") and len(log("whole")) == 3
    assert any(kl is not None for _, _, kl, _ in log("whole"))            # agent episodes were distilled
    row = json.loads((root / "cascade.json").read_text())["rows"][-1]
    assert row["name"] == "mopd" and set(row["scores"]) == {"if", "agent"}
