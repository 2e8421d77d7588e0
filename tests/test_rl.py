"""rl.py: GRPO advantages and loss by hand, the REINFORCE gradient and micro-batching, dynamic filtering, sampler vs
trainer log-probs, a toy task that RL learns, 1 vs 2 processes, kill/resume, cascade.json, skips and errors."""
import itertools
import json
import math
import os
import sys
import warnings

import pytest
import torch

import common
import options
import rl
import sample
import tasks
from model import Mamba2Mixer, Model
from tests.conftest import small_config
from tests.test_sft import run_killing_group
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D1 = common.Dist()                                          # one process, CPU


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second thread only adds synchronisation (and on a busy machine, much of it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**kw):
    opts = dict(vocab_size=2048, hidden_size=32, hybrid_override_pattern="M*E", head_dim=8, mamba_head_dim=8,
                ssm_state_size=8, chunk_size=16, n_routed_experts=4, moe_intermediate_size=16,
                moe_shared_expert_intermediate_size=16)
    opts.update(kw)
    return small_config(**opts)


def random_model(seed=0, **kw):
    torch.manual_seed(seed)
    return Model(tiny_config(**kw))


def toy_export(path, logits, seed=0, **kw):
    """
    An HF export whose next-token distribution starts context-free: every layer's output projection is zeroed and
    every embedding is the ones vector, so the final hidden state is ones and logits = row sums of lm_head, set to
    `logits` ({token id: logit}, -12 elsewhere). Its samples are short strings over a few tokens, so real verifiers
    give groups with reward variance; training moves those logits.
    """
    model = random_model(seed, **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("out_proj.weight", "o_proj.weight", "down_proj", "down_proj.weight")):
                p.zero_()
        model.backbone.embeddings.weight.fill_(1.0)
        H = model.config.hidden_size
        model.lm_head.weight.fill_(-12.0 / H)
        for t, logit in logits.items():
            model.lm_head.weight[t] = logit / H
    model.save_pretrained(path, state_dict=model.state_dict())
    load_tokenizer().save_pretrained(path)
    return path


# -- advantages and the loss, by hand ----------------------------------------------------------------------------


def test_advantages_by_hand():
    # group 1 has signal; group 2 is constant (zero advantage, no NaN); group 3 is nearly constant (the floor)
    adv = rl.group_advantages([1, 0, 0, 1, 1, 1, 0.5, 0.5, 0.52], group_size=3, std_floor=0.05)
    std1 = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)            # unbiased std of (1, 0, 0)
    expected = [(2 / 3) / std1, -(1 / 3) / std1, -(1 / 3) / std1, 0, 0, 0,
                (0.5 - 0.50666667) / 0.05, (0.5 - 0.50666667) / 0.05, (0.52 - 0.50666667) / 0.05]
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_truncated_rollout_scores_zero():
    ex = {"domain": "mcqa", "messages": [{"role": "user", "content": "?"}], "answer": "B"}
    good = "<think>\nhm\n</think>\n\\boxed{B}"
    assert tasks.reward(ex, good) == 1.0
    assert rl.grade([ex, ex, ex], [good, good, "<think>\n</think>\n\\boxed{C}"], [True, False, True]) == [1, 0, 0]


def test_loss_by_hand_mixed_lengths():
    # two rollouts of lengths 3 and 1 (padded to 3), advantages +1.5 and -0.5, batch token count 4
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.5, -0.5])
    loss = rl.grpo_loss(lp, adv, mask, n_tokens=4)
    expected = -(1.5 * (-1 - 2 - 0.5) + (-0.5) * (-3.0)) / 4
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-1.5, -1.5, -1.5], [0.5, 0, 0]]) / 4)
    # k3 KL term: exp(ref - lp) - (ref - lp) - 1 per valid token, same normalisation
    ref = torch.tensor([[-1.5, -2.0, -0.5], [-2.0, 5.0, 5.0]])
    with_kl = rl.grpo_loss(lp.detach(), adv, mask, 4, ref, kl_coef=0.1)
    k3 = [math.exp(-0.5) + 0.5 - 1, 0, 0, math.exp(1.0) - 1.0 - 1]
    assert with_kl.item() == pytest.approx(expected + 0.1 * sum(k3) / 4)


# -- the gradient: REINFORCE, whatever the micro-batching; sampler == trainer ---------------------------------------


@pytest.fixture(scope="module")
def rollouts():
    """A random small model and 2 prompts x 3 sampled completions of mixed lengths (fp32)."""
    model = random_model(seed=1, vocab_size=64)
    prompts = [[1, 3, 30, 31, 32], [1, 3, 40, 41]]
    outs = sample.generate(model, prompts, 6, n=3, seed=0, stop_token_ids=list(range(5, 20)), raw_logprobs=True)
    assert len({len(c.tokens) for c in outs}) > 1                   # mixed lengths
    return model, [p for p in prompts for _ in range(3)], outs


def test_sampler_logprobs_equal_trainer_logprobs(rollouts):
    model, prompts, outs = rollouts
    _, _, trainer_lp = rl.train_step(model, prompts, outs, [0.0] * len(outs), 20, 0.0, D1)   # packed rows
    model.zero_grad(set_to_none=True)
    for c, t in zip(outs, trainer_lp):
        assert len(t) == len(c.tokens)
        torch.testing.assert_close(torch.tensor(t), torch.tensor(c.raw_logprobs), atol=2e-5, rtol=0)
        # temperature 1, no top-p: the sampler's own logprobs are the policy's, so the PPO ratio is 1
        ratio = torch.exp(torch.tensor(t) - torch.tensor(c.logprobs))
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-4, rtol=0)


def test_gradient_is_reinforce_for_any_micro_batching(rollouts):
    model, prompts, outs = rollouts
    adv = rl.group_advantages([1, 0, 0, 0, 1, 1], 3, 0.05)
    n_tokens = sum(len(c.tokens) for c in outs)
    # REINFORCE written out: one rollout at a time, log pi from full logits, -(1/N) sum_i A_i sum_t grad log pi
    model.zero_grad(set_to_none=True)
    for p, c, a in zip(prompts, outs, adv):
        ids = torch.tensor([p + c.tokens[:-1]])
        logp = model(ids)[0, len(p) - 1:].log_softmax(-1)
        (-(a / n_tokens) * logp.gather(-1, torch.tensor(c.tokens)[:, None]).sum()).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    # token budgets: one group per forward; both groups in one; with the KL term
    for budget, kl in ((1, 0.0), (1000, 0.0), (20, 0.5)):
        # (the k3 KL to a reference equal to the policy is 0 with a zero gradient: the same gradient again)
        model.zero_grad(set_to_none=True)
        rl.train_step(model, prompts, outs, adv, budget, 0.0, D1, ref_model=model if kl else None, kl_coef=kl)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, reference[n], atol=1e-6, rtol=1e-4, msg=f"{n}, budget {budget}")
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("checkpointing, segment", [(False, 4096), (True, 4096), (True, 3), (False, 3)])
def test_shared_prompt_logprobs_and_gradient_equal_the_packed_row(checkpointing, segment, monkeypatch):
    """Rollouts sharing a prompt, run once through the cache, give the log-probs and the gradient of the packed
    row that repeats it for each: prompts of different lengths (left-padded), a prompt with one rollout, and a
    multi-turn episode whose environment tokens are masked; with activation checkpointing (whose recompute must
    start from the state the forward started from) and with the prompts' pass in pieces of 3 tokens."""
    monkeypatch.setattr(Mamba2Mixer, "segment_tokens", segment)
    model = random_model(seed=2, vocab_size=64)
    model.gradient_checkpointing = checkpointing
    prompts = [[1, 3, 30, 31, 32]] * 3 + [[1, 3, 40]] * 2 + [[1, 3, 50, 51]]
    g = torch.Generator().manual_seed(0)
    outs = [sample.Completion(torch.randint(5, 64, (n,), generator=g).tolist(), [], "stop") for n in (4, 1, 6, 3, 5, 2)]
    outs[1] = sample.Completion([7, 8, 9, 10, 11, 12, 13], [], "stop", mask=[1, 1, 0, 0, 0, 1, 1])   # an episode
    adv = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.75, 0.5])
    result = {}
    for fn in (common.packed_logprobs, common.shared_prompt_logprobs):
        model.zero_grad(set_to_none=True)
        lp, mask = fn(model, prompts, outs, "cpu")
        (adv[:, None] * lp).sum().backward()
        result[fn.__name__] = lp.detach(), mask, {n: p.grad.clone() for n, p in model.named_parameters()}
    (lp_a, mask_a, grad_a), (lp_b, mask_b, grad_b) = result.values()
    assert torch.equal(mask_a, mask_b) and mask_a[1].tolist() == [1, 1, 0, 0, 0, 1, 1]
    torch.testing.assert_close(lp_b, lp_a, atol=2e-5, rtol=0)
    for n in grad_a:
        torch.testing.assert_close(grad_b[n], grad_a[n], atol=1e-6, rtol=1e-4, msg=n)
    # the empty pass in the shared layout (a process with fewer micro-batches than one that shares): the model
    # runs, as wide as the others' prompts, and a loss summed over it is 0 with a full backward
    lp, mask = common.shared_prompt_logprobs(model, [], [], "cpu", width=7)
    assert lp.shape == (0, 1) and not mask.any()
    model.zero_grad(set_to_none=True)
    lp.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)


def test_micro_batches_keep_a_prompt_together_within_the_budget():
    # three prompts (4, 2 and 9 tokens before the last) with 3, 2 and 1 rollouts, and two distinct one-offs
    prompts = [[1] * 5] * 3 + [[2] * 3] * 2 + [[3] * 10] + [[4] * 2, [5] * 7]
    outs = [sample.Completion([7] * n, [], "stop") for n in (3, 6, 2, 4, 1, 5, 8, 2)]
    size = lambda b: common.forward_tokens([prompts[i] for i in b], [outs[i] for i in b])[0]      # noqa: E731
    for budget in (1, 12, 22, 30, 60, 1000):
        bins = common.micro_batches(prompts, outs, budget, D1)
        assert sorted(i for b in bins for i in b) == list(range(len(outs)))          # each rollout exactly once
        for b in bins:                          # the padded tokens of the forward, unless one rollout alone
            assert b == sorted(b) and (len(b) == 1 or size(b) <= budget), (budget, bins)
        # first-fit: no two micro-batches could have been one
        assert all(size(a + b) > budget for a, b in itertools.combinations(bins, 2)), (budget, bins)
        if budget >= size([0, 1, 2]):           # the first prompt's rollouts fit together: they go together
            assert any({0, 1, 2} <= set(b) for b in bins), (budget, bins)
    assert common.micro_batches(prompts, outs, 1000, D1) == [list(range(len(outs)))]
    assert common.micro_batches([], [], 100, D1) == []


def test_packed_logprobs_equal_one_rollout_at_a_time(rollouts):
    model, prompts, outs = rollouts
    with torch.no_grad():
        lp, mask = common.rollout_logprobs(model, prompts, outs, "cpu")
        assert lp.shape == (len(outs), max(len(c.tokens) for c in outs))
        for i, (p, c) in enumerate(zip(prompts, outs)):
            logits = model(torch.tensor([p + c.tokens[:-1]]))[0, len(p) - 1:]
            want = logits.log_softmax(-1).gather(-1, torch.tensor(c.tokens)[:, None])[:, 0]
            assert mask[i].sum() == len(c.tokens) and not lp[i][~mask[i]].any()
            torch.testing.assert_close(lp[i][mask[i]], want, atol=2e-5, rtol=0)
    # the empty pass (a process with fewer micro-batches): runs the model, contributes nothing, backward works
    lp, mask = common.rollout_logprobs(model, [], [], "cpu")
    assert lp.shape == (0, 1) and not mask.any()
    model.zero_grad(set_to_none=True)
    rl.grpo_loss(lp, torch.zeros(0), mask, 1.0).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    model.zero_grad(set_to_none=True)


# -- dynamic filtering --------------------------------------------------------------------------------------------


def fake_round(plan, calls):
    """rollout_round that returns groups with the planned rewards, round by round."""
    def rollout_round(rnd, count):
        calls.append((rnd, count))
        return [dict(id=(rnd, j), rewards=plan[rnd][j]) for j in range(count)]
    return rollout_round


def test_dynamic_filtering_refills_the_batch():
    plan = {0: [[1, 0], [1, 1], [0, 0], [0, 1]], 1: [[0, 1], [1, 0]]}
    calls = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # a full batch: no warning
        kept, sampled, drawn = rl.fill_batch(fake_round(plan, calls), 4, True, 3, D1)
    assert calls == [(0, 4), (1, 2)]                   # 2 zero-variance groups dropped: 2 more prompts drawn
    assert [g["id"] for g in kept] == [(0, 0), (0, 3), (1, 0), (1, 1)]
    assert drawn == 6 and len(sampled) == 6


def test_dynamic_filtering_cap_stops_and_warns():
    plan = {r: [[0, 0]] * 8 for r in range(10)}
    calls = []
    with pytest.warns(UserWarning, match="only 0 of 4 groups"):
        kept, sampled, drawn = rl.fill_batch(fake_round(plan, calls), 4, True, 2, D1)
    assert kept == [] and len(calls) == 3 and drawn == 12
    calls.clear()                                        # without filtering: one round, every group kept
    kept, _, _ = rl.fill_batch(fake_round(plan, calls), 4, False, 2, D1)
    assert len(kept) == 4 and calls == [(0, 4)]


# -- a toy task RL learns -----------------------------------------------------------------------------------------


def toy_run(steps, chosen=50, seed=0):
    """GRPO with rl.py's pieces on a random small model: reward 1 when the 4-token completion contains `chosen`."""
    model = random_model(seed=2, vocab_size=64)
    optimizer = common.make_optimizer(model, 2e-2, (0.9, 0.95), 0.0)
    prompts, rewards_per_step, losses = [[1, 3, 30 + k, 31] for k in range(8)], [], []
    for step in range(steps):
        def rollout_round(rnd, count):
            chosen_prompts = [prompts[(step * 3 + rnd * 5 + j) % len(prompts)] for j in range(count)]
            outs = sample.generate(model, chosen_prompts, 4, n=8, seed=common.rollout_seed(seed, 0, step, 0, rnd),
                                   stop_token_ids=[], raw_logprobs=True)
            return [dict(prompt=p, completions=outs[j * 8:(j + 1) * 8],
                         rewards=[float(chosen in c.tokens) for c in outs[j * 8:(j + 1) * 8]])
                    for j, p in enumerate(chosen_prompts)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kept, sampled, _ = rl.fill_batch(rollout_round, 4, True, 2, D1)
        rewards_per_step.append(sum(sum(g["rewards"]) for g in sampled) / (8 * len(sampled)))
        if kept:
            adv = rl.group_advantages([r for g in kept for r in g["rewards"]], 8, 0.05)
            loss, _, _ = rl.train_step(model, [g["prompt"] for g in kept for _ in range(8)],
                                       [c for g in kept for c in g["completions"]], adv, 16, 1.0, D1)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
    return rewards_per_step, losses


def test_toy_task_reward_rises_deterministically():
    rewards, losses = toy_run(20)
    assert rewards[0] < 0.1 and sum(rewards[-5:]) / 5 > 0.7, rewards       # from chance (~6%) to mostly right
    again, losses_again = toy_run(4)
    assert again == rewards[:4] and losses_again == losses[:len(losses_again)]


# -- the whole stage: cascade.json, skip on rerun, kill/resume, 1 vs 2 processes, named errors --------------------

IF_ROW = {"domain": "if", "messages": [{"role": "user", "content": "Write about cats. Do not use any commas."}],
          "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
MCQA_ROW = {"domain": "mcqa", "messages": [{"role": "user", "content": "Pick one.\nA. x\nB. y\nAnswer in \\boxed{}."}],
            "answer": "A", "options": [{"A": "x"}, {"B": "y"}]}
STAGES = [dict(name="a", domains=["if"], steps=3, prompts_per_step=2, rollouts=4, micro_batch_tokens=30, lr=1e-2,
               max_new_tokens=12, thinking=False),
          dict(name="b", domains=["if", "mcqa"], weights=[1, 1], steps=2, prompts_per_step=2, rollouts=4, lr=1e-2,
               max_new_tokens=12, thinking=False, max_fill_rounds=1)]


@pytest.fixture(scope="module")
def toy_run_dir(tmp_path_factory):
    """A toy export that answers with short strings of ' the' ' cat' ',' and <|im_end|>: the no-comma instruction
    gives groups with reward variance (MCQA never scores: its groups are all filtered), and a tiny preset."""
    root = tmp_path_factory.mktemp("rl")
    toy_export(root / "init", {294: 0.0, 1181: 0.0, 24: 0.0, 4: 0.0})
    (root / "rl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [IF_ROW] * 4 + [MCQA_ROW] * 2))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [IF_ROW, MCQA_ROW]))
    (root / "preset.json").write_text(json.dumps(dict(eval_per_domain=1, eval_max_new_tokens=8, save_every=1,
                                                      stages=STAGES)))
    return root


def rl_args(root, out, **kw):
    opts = dict(config=root / "preset.json", init=root / "init", out_dir=root / out, train_data=root / "rl.jsonl",
                eval_data=root / "eval.jsonl", device="cpu")
    opts.update(kw)
    return [f"--{k}={v}" for k, v in opts.items()]


def run_rl(root, out, **kw):
    return rl.main(*rl.parse_args(rl_args(root, out, **kw)))


def stage_losses(out_dir, stage):
    rows = common.read_metrics(os.path.join(out_dir, stage, "metrics.jsonl"))
    return [(r["step"], r["loss"], r["reward"]) for r in rows if "loss" in r]


def test_cascade_json_rows_and_skip_on_rerun(toy_run_dir, capsys, monkeypatch):
    root = toy_run_dir
    encoded, encode = [], sample.encode_prompts                     # training prompts: encoded once per stage
    monkeypatch.setattr(sample, "encode_prompts",
                        lambda *a, **k: encoded.append(str(k.get("source"))) or encode(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cascade = run_rl(root, "full")
    assert sorted(src.split(": --train_data")[0] + src.split(",")[-1] for src in encoded if "stage '" in src) == \
        ["stage 'a' domain 'if'", "stage 'b' domain 'if'", "stage 'b' domain 'mcqa'"]
    assert [r["name"] for r in cascade["rows"]] == ["sft", "a", "b"]
    assert cascade["evaluation"] == dict(data=str(root / "eval.jsonl"), per_domain=1, max_new_tokens=8,
                                         max_episode_tokens=1024, thinking=True, greedy=True)
    assert cascade["domains"] == ["if", "mcqa"]
    assert [r["trained"] for r in cascade["rows"]] == [[], ["if"], ["if", "mcqa"]]
    for row in cascade["rows"][1:]:
        assert os.path.isfile(os.path.join(row["checkpoint"], "config.json"))
        Model.from_pretrained(row["checkpoint"])                      # the export loads
        assert set(row["scores"]) == {"if", "mcqa"}
    a = stage_losses(root / "full", "a")
    assert len(a) == 3 and any(loss != 0 for _, loss, _ in a)          # there was signal, and it trained
    assert os.path.isfile(root / "full" / "a" / "curves.png")
    first, metrics = common.read_metrics(root / "full" / "b" / "metrics.jsonl")[:2]
    assert first["step"] == 0 and first["eval_if"] == cascade["rows"][1]["scores"]["if"]   # the stage's start
    assert metrics["reward_mcqa"] == 0 and metrics["resampled_frac"] > 0   # MCQA groups filtered and refilled
    assert metrics["logprob_diff_max"] < 1e-4                          # sampler == trainer in fp32
    capsys.readouterr()
    mtime = os.path.getmtime(root / "full" / "b" / "metrics.jsonl")
    encoded.clear()
    again = run_rl(root, "full")
    assert "a]: finished earlier" in capsys.readouterr().out
    assert not [src for src in encoded if "stage '" in src]            # finished stages: nothing encoded
    assert again == cascade and os.path.getmtime(root / "full" / "b" / "metrics.jsonl") == mtime
    with pytest.raises(options.ConfigError, match="rows were scored with .*per_domain': 1.* not .*per_domain': 2"):
        run_rl(root, "full", eval_per_domain=2)                       # rows scored otherwise would not compare


def test_killed_run_resumes_with_identical_losses(toy_run_dir):
    root = toy_run_dir
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, os.path.join(ROOT, "rl.py")]
    whole = run_killing_group(cmd + rl_args(root, "whole", only="a"), env=env)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = run_killing_group(cmd + rl_args(root, "resumed", only="a", inject_kill_at_step=2), env=env)
    assert killed.returncode == -9
    assert not os.path.exists(root / "resumed" / "a" / "export")
    resumed = run_killing_group(cmd + rl_args(root, "resumed", only="a"), env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    assert stage_losses(root / "resumed", "a") == stage_losses(root / "whole", "a")
    rows = lambda out: json.loads((root / out / "cascade.json").read_text())["rows"]
    assert [r["name"] for r in rows("resumed")] == ["sft", "a"]
    assert rows("resumed")[1]["scores"] == rows("whole")[1]["scores"]


DIST_WORKER = r"""
import json, sys, torch
import common, rl, sample
from tests.test_rl import random_model
d = common.init_dist("cpu")
model = common.shard_model(random_model(seed=3, vocab_size=64), d)
optimizer = common.make_optimizer(model, 1e-2, (0.9, 0.95), 0.0)
torch.manual_seed(0)                       # the same rollouts on every process, split over the processes
if sys.argv[2] == "packed":                # distinct prompts, packed into rows: 5 rollouts, 3 + 2
    prompts = [[1, 3, 30 + i, 31] for i in range(5)]
    lengths, adv = (4, 1, 6, 3, 2), [1.0, -0.5, 0.25, -1.0, 0.75]
elif sys.argv[2] == "shared":              # two long prompts of 3 rollouts: one forward per process, each
    prompts = [[5 + i % 59 for i in range(60)]] * 3 + [[7 + i % 57 for i in range(80)]] * 3   # (vocab 64)
    lengths, adv = (4, 1, 6, 3, 2, 5), [1.0, -0.5, 0.25, -1.0, 0.75, -0.25]
else:                                      # mixed: process 0 gets a long prompt 3 times, process 1 three short
    long = [5 + i % 59 for i in range(60)]     # ones, which alone it would pack: it runs the shared layout too
    prompts = [long, [1, 3, 40], long, [1, 3, 41, 42], long, [1, 3, 43]]
    lengths, adv = (4, 1, 6, 3, 2, 5), [1.0, -0.5, 0.25, -1.0, 0.75, -0.25]
completions = [sample.Completion(torch.randint(5, 64, (n,)).tolist(), [], "stop") for n in lengths]
mine = slice(d.rank, None, d.world_size)
budget = 2 if sys.argv[2] == "packed" else 1000
if d.world_size > 1:
    assert common.forward_tokens(prompts[mine], completions[mine])[1] == (sys.argv[2] != "packed" and d.rank == 0
                                                                          or sys.argv[2] == "shared")
loss, grad_norm, _ = rl.train_step(model, prompts[mine], completions[mine], adv[mine], budget, 0.0, d)
full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g      # a DTensor shard under FSDP
grads = {k: full(p.grad).flatten().tolist() for k, p in model.named_parameters()}
optimizer.step()
state = common.full_state_dict(model, d)
if d.is_main:
    json.dump(dict(loss=loss, grad_norm=grad_norm, grads=grads,
                   params={k: v.double().sum().item() for k, v in state.items()}), open(sys.argv[1], "w"))
common.close_dist()
"""


@pytest.mark.parametrize("layout", ["packed", "shared", "mixed"])
def test_two_processes_give_the_step_of_one(tmp_path, layout):
    """FSDP over 2 processes gives the gradient and step of one, for rollouts packed into a row, for rollouts
    that share a prompt (whose gradient enters the prompt's pass through the cache, not through its output), and
    for processes whose own choice of layout differs (they agree on one: the same model calls on each)."""
    script = tmp_path / "worker.py"
    script.write_text(DIST_WORKER)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    one = run_killing_group([sys.executable, str(script), str(tmp_path / "one.json"), layout], env=env, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_torchrun([str(script), str(tmp_path / "two.json"), layout], env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    for k in a["grads"]:
        torch.testing.assert_close(torch.tensor(b["grads"][k]), torch.tensor(a["grads"][k]), atol=1e-7, rtol=1e-4,
                                   msg=k)
    if layout == "packed":      # (AdamW's first step is about lr * sign(g): a gradient near 0 moves by up to lr)
        for k in a["params"]:
            assert a["params"][k] == pytest.approx(b["params"][k], rel=1e-5, abs=1e-6), k


def test_named_errors(toy_run_dir, tmp_path):
    root = toy_run_dir
    bad = lambda **stage: (tmp_path / "p.json").write_text(json.dumps(dict(stages=[dict(STAGES[0], **stage)])))
    bad(domains=["if", "poetry"])
    with pytest.raises(ValueError, match=r"stage 0 \('a'\): unknown domain\(s\) \['poetry'\]"):
        run_rl(root, "err1", config=tmp_path / "p.json")
    bad(domains=["code"])
    with pytest.raises(ValueError, match="has no prompts of domain 'code'"):
        run_rl(root, "err2", config=tmp_path / "p.json")
    bad(max_new_tokens=300)                              # the toy model's context is 262144; make a small one
    small = toy_export(tmp_path / "short", {4: 0.0}, max_position_embeddings=64)
    with pytest.raises(ValueError, match=r"--eval_data .*: example 0 \(if\)'s prompt has \d+ tokens; with 96 new "
                                         "tokens the model's context of 64"):           # the held-out set, first
        run_rl(root, "err3", config=tmp_path / "p.json", init=small)
    with pytest.raises(ValueError, match=r"--train_data .*, domain 'if': example 0 \(if\)'s prompt has \d+ tokens; "
                                         "with 300 new tokens the model's context of 64"):
        run_rl(root, "err3", config=tmp_path / "p.json", init=small, eval_max_new_tokens=8)
    big = toy_export(tmp_path / "big", {4: 0.0}, vocab_size=1024)       # the shipped tokenizer has 2048 ids
    with pytest.raises(ValueError, match="tokenizer has 2048 tokens but the model's vocab_size is 1024"):
        run_rl(root, "err4", init=big)
    (tmp_path / "p.json").write_text(json.dumps(dict(stages=[dict(STAGES[0], rollouts="many")])))
    with pytest.raises(SystemExit, match=r"p.json: stages\[0\]"):
        rl.parse_args(rl_args(root, "err", config=tmp_path / "p.json"))
    with pytest.raises(SystemExit, match=r"--set 'c.lr=1': expected STAGE.OPTION=VALUE with STAGE one of \['a', 'b'\]"):
        rl.parse_args(rl_args(root, "err", set="c.lr=1"))
    with pytest.raises(SystemExit, match=r"--set 'a.rollouts=x'.*expected int"):
        rl.parse_args(rl_args(root, "err", set="a.rollouts=x"))


def test_stage_overrides_from_the_command_line(toy_run_dir):
    _, stages, _ = rl.parse_args(rl_args(toy_run_dir, "x", set="a.lr=0.5,*.steps=7,b.thinking=true"))
    assert [(s.lr, s.steps, s.thinking) for s in stages] == [(0.5, 7, False), (1e-2, 7, True)]


def run_torchrun(args, env, nproc=2):
    """torchrun with 2 gloo processes (run_killing_group reruns one whose worker aborted in gloo's teardown)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + args
    return run_killing_group(cmd, env=env, cwd=ROOT)


def test_two_processes_run_a_stage(toy_run_dir):
    """Under FSDP2 with 2 processes: rollouts through sampling_weights, filtering across processes, evaluation
    gathered from both, cascade.json and the export."""
    root = toy_run_dir
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = run_torchrun([os.path.join(ROOT, "rl.py")] + rl_args(root, "two", max_steps=1), env)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((root / "two" / "cascade.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["sft", "a", "b"]
    assert all(set(r["scores"]) == {"if", "mcqa"} for r in rows)      # every domain, gathered from both
    Model.from_pretrained(rows[-1]["checkpoint"])


# -- a stage with a multi-turn domain: episodes in the rollouts, kill/resume on 1 and 2 processes ----------------

AGENT_ROW = {"domain": "agent", "messages": [{"role": "user", "content": "What does the item in bin 3 cost?"}],
             "tools": [{"type": "function", "function": {"name": "price", "parameters": {
                 "type": "object", "properties": {"item": {"type": "string"}}, "required": ["item"]}}}],
             "state": {"bins": {"3": "pear"}, "prices": {"pear": 4}}, "goal": {"answer": "4"}, "max_turns": 3}
AGENT_STAGE = dict(name="agentic", domains=["if", "agent"], weights=[1, 1], steps=3, prompts_per_step=2, rollouts=4,
                   lr=1e-2, max_new_tokens=6, max_episode_tokens=60, thinking=False, max_fill_rounds=1)


@pytest.fixture(scope="module")
def agent_run_dir(tmp_path_factory):
    """The toy export, now also writing <tool_call> (id 7): a turn with that unparsable markup gets an error
    observation and the episode goes on, so episodes run several turns (none scores: the IF prompts give the
    groups with signal, the agent ones go through the episode path all the same)."""
    root = tmp_path_factory.mktemp("rl_agent")
    toy_export(root / "init", {294: 0.0, 1181: 0.0, 24: 0.0, 4: 0.0, 7: 0.5})
    (root / "rl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [IF_ROW] * 4 + [AGENT_ROW] * 4))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [IF_ROW, AGENT_ROW]))
    (root / "preset.json").write_text(json.dumps(dict(eval_per_domain=1, eval_max_new_tokens=6,
                                                      eval_max_episode_tokens=60, save_every=1,
                                                      stages=[AGENT_STAGE])))
    return root


def episode_log(out_dir):
    return [(r["step"], r["loss"], r["reward"], r.get("reward_agent"), r["response_len"], r["response_len_max"],
             r.get("episodes_done_frac"), r.get("episodes_over_tokens_frac"))
            for r in common.read_metrics(os.path.join(out_dir, "agentic", "metrics.jsonl")) if "loss" in r]


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_multi_turn_stage_resumes_after_a_kill_with_identical_rewards(agent_run_dir, nproc):
    root = agent_run_dir
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    run = (lambda args: run_killing_group([sys.executable, os.path.join(ROOT, "rl.py")] + args, env=env)) \
        if nproc == 1 else (lambda args: run_torchrun([os.path.join(ROOT, "rl.py")] + args, env))
    whole = run(rl_args(root, f"whole{nproc}"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run(rl_args(root, f"resumed{nproc}", inject_kill_at_step=2))
    assert killed.returncode != 0 and not os.path.exists(root / f"resumed{nproc}" / "agentic" / "export")
    resumed = run(rl_args(root, f"resumed{nproc}"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = episode_log(root / f"whole{nproc}")
    assert episode_log(root / f"resumed{nproc}") == log and len(log) == 3
    assert any(done is not None for *_, done, _ in log)                    # agent prompts were played
    # policy tokens past one turn's budget: an episode went on after an error observation
    assert max(longest for *_, longest, _, _ in log) > AGENT_STAGE["max_new_tokens"]
    rows = json.loads((root / f"resumed{nproc}" / "cascade.json").read_text())["rows"]
    assert set(rows[-1]["scores"]) == {"if", "agent"}
