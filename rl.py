"""
Stage 2 of Nemotron-Cascade 2: Cascade RL with GRPO, one domain group per stage.

An ordered list of stages (a JSON preset in configs/), each RL-training its own domains from the previous stage's
export: the tiny default runs IF-RL -> multi-domain RL (MCQA + tool calling + JSON) -> code RL from the SFT
export; math is not trained by RL, as in the paper. Every step, strictly on-policy (DESIGN.md section 7):

    1. sample `rollouts` completions for each of `prompts_per_step` prompts with sample.generate, on the very
       model that trains (under FSDP2 the weights are gathered once for the whole rollout phase);
    2. grade them with the tasks' verifiers (a completion cut off by max_new_tokens scores 0), or, in a stage
       with a reward_model (RLHF), by a judge LLM's ratings (or pairwise verdicts) of each group (judge.py);
       with dynamic filtering, groups whose rewards are all equal carry no signal: drop them and sample more
       prompts;
    3. A_i = (r_i - mean(group)) / max(std(group), floor), one value for every token of rollout i;
    4. L = -(1 / sum_i |o_i|) sum_i sum_t A_i log pi(o_i,t), normalised by the valid tokens of the whole batch
       (all micro-batches and processes), then exactly one optimizer step: the PPO ratio is exactly 1.

    python rl.py --init out/sft/export                       # the tiny default (configs/rl_tiny.json)
    torchrun --nproc_per_node=8 rl.py --config configs/rl_nano_30b.json --init /path/to/sft_export --bf16
    python rl.py --help                                      # run options; stage options are listed below

Writes to out_dir: <stage>/ (metrics.jsonl, curves.png, checkpoints/, export/) per stage and cascade.json, one
row per checkpoint (the start, each stage) with held-out greedy pass@1 per domain and the checkpoint path.
Rerun the same command: finished stages are skipped, an interrupted one resumes from its latest checkpoint
with exactly the rewards and losses of an uninterrupted run (rollouts are seeded by seed, stage, step, rank).
"""
import argparse
import collections
import json
import math
import os
import re
import signal
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from tqdm import tqdm

import common
import judge
import options
import sample
import tasks
from model import Model
from tokenizer import load_tokenizer


@dataclass
class StageConfig:
    name: str = "stage"  # the stage's sub-directory of out_dir and its row in cascade.json
    domains: tuple[str, ...] = ("if",)  # domains this stage trains on
    prompt_data: str = ""  # this stage's prompts (any tasks.load_examples source; empty = the run's --train_data)
    weights: tuple[float, ...] = ()  # share of each domain's prompts in a batch (empty = equal shares)
    steps: int = 20  # optimizer steps, one per rollout batch (paper: IF-RL ~180, multi-domain ~70, code 22)
    prompts_per_step: int = 8  # prompts (GRPO groups) per batch, across processes (paper: 128)
    rollouts: int = 8  # completions per prompt (paper: 16)
    micro_batch_tokens: int = 4096  # tokens per forward/backward per process (a prompt once for its rollouts)
    sample_batch: int = 0  # prompts per generate call on each process (0 = all at once); bounds the cache memory
    lr: float = 3e-6  # learning rate (paper: 3e-6)
    warmup_steps: int = 0  # linear warmup steps from 0
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas (paper: 0.9, 0.95)
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    max_new_tokens: int = 128  # rollout token budget (a multi-turn domain's: per turn); a cut-off completion scores 0
    context: int = 0  # longest rollout, prompt + budget, the stage admits (a longer prompt is refused; 0 = the model's)
    max_turns: int = 0  # multi-turn domains: assistant turns per episode (0 = each environment's own limit)
    max_episode_tokens: int = 1024  # multi-turn domains: tokens after the prompt (turns and replies); past it: 0
    temperature: float = 1.0  # rollout temperature (paper: 1.0; anything else is not the policy's distribution)
    top_p: float = 1.0  # rollout nucleus mass (paper: 1.0; code RL 0.95)
    thinking: bool = True  # render prompts in thinking mode
    kl_coef: float = 0.0  # k3 KL penalty to the stage's frozen starting model (paper: 0 except RLHF's 0.03)
    adv_std_floor: float = 0.05  # floor on the group std in the advantage: a near-constant group cannot blow up
    dynamic_filtering: bool = True  # drop groups whose rewards are all equal and sample more prompts
    max_fill_rounds: int = 3  # extra sampling rounds to fill a filtered batch; then warn and train on what is kept
    eval_every: int = 0  # held-out evaluation every N steps (0 = at the start and end of the stage only)
    reward_model: str = ""  # RLHF: judge.py rewards the rollouts: checkpoint dir, "init" (--init) or URL (.../v1)
    judge_format: str = "rating"  # RLHF: "rating" (one answer, [[0]]-[[3]]) or "pairwise" (two, both orders)
    judge_max_new_tokens: int = 96  # RLHF: token budget of one judgement (the tiny judge's thought: about 60)
    judge_thinking: bool = True  # RLHF: an in-process judge's prompts in thinking mode
    judge_opponents: int = 0  # RLHF pairwise: each rollout meets the next k round its group, both ways (0 = all)
    judge_batch: int = 0  # RLHF: judgements per generate call (0 = all) or requests in flight to a URL (0 = 16)
    judge_timeout_s: float = 60.0  # RLHF: seconds a URL may take to answer one judgement before it is asked again
    judge_retries: int = 3  # RLHF: retries of an unanswered judgement; then the stage stops at its last checkpoint

    def validate(self):
        problems = options.check_fields(self, prompt_data=options.optional(options.data_source),
                                        max_turns=options.at_least(0), judge_max_new_tokens=options.at_least(1),
                                        judge_batch=options.at_least(0), judge_opponents=options.at_least(0),
                                        judge_timeout_s=options.above(0), judge_format=options.one_of(*judge.FORMATS),
                                        judge_retries=options.at_least(0))
        # an episode's budget holds its turns; a stage of single-turn domains has no episodes (stage_budget)
        if any(dom in tasks.ENVIRONMENTS for dom in self.domains) and self.max_episode_tokens < self.max_new_tokens:
            problems.append(f"--max_episode_tokens={self.max_episode_tokens}: must be >= max_new_tokens "
                            f"({self.max_new_tokens}), a turn's budget")
        return problems


DEFAULT_PRESET = "configs/rl_tiny.json"


@dataclass
class RLConfig:
    init: str = "out/sft/export"  # HF export the first stage starts from (and the "sft" row of cascade.json)
    init_name: str = "sft"  # the cascade.json row name of the init checkpoint
    out_dir: str = "out/rl"  # one sub-directory per stage, and cascade.json
    train_data: str = "data/rl.jsonl"  # RL prompts (any source tasks.load_examples reads)
    eval_data: str = "data/eval.jsonl"  # held-out examples scored per domain (greedy pass@1)
    eval_per_domain: int = 30  # held-out examples per domain (0 = all)
    eval_max_new_tokens: int = 96  # generation budget of the held-out evaluation
    eval_batch_size: int = 64  # held-out prompts per generate call
    eval_max_episode_tokens: int = 1024  # multi-turn domains' held-out episodes: tokens after the prompt
    eval_thinking: bool = True  # held-out prompts in thinking mode
    only: tuple[str, ...] = ()  # run only these stages (names; empty = all); the others must be finished
    max_steps: int = 0  # cap every stage's steps (smoke tests; 0 = the preset's)
    set: tuple[str, ...] = ()  # stage option overrides STAGE.OPTION=VALUE, *.OPTION=VALUE for every stage (no lists)
    seed: int = 0  # prompt draws and rollouts: seeded by (seed, stage, step, rank, round)
    device: str = "auto"  # auto, cpu or cuda
    bf16: bool = False  # bf16 compute with fp32 master weights and reductions (FSDP, GPU)
    activation_checkpointing: bool = False  # recompute each layer in backward to save memory
    save_every: int = 10  # checkpoint every N steps of a stage (0 = only at its end)
    keep_last: int = 2  # checkpoints kept per stage
    export_dtype: str = ""  # dtype of each stage's HF export: bfloat16, float32 or empty = as trained
    wandb_project: str = ""  # also log to Weights & Biases when set and wandb is installed
    inject_kill_at_step: int = -1  # fault injection for tests: SIGKILL as this step of a stage starts


# ----------------------------------------------------------------------------------------------------------------
# Config: run options through options.parse_config; the preset's "stages" list, one StageConfig each


def _stage_help():
    comments = options._field_comments(StageConfig)
    lines = [f"  {f.name} = {f.default!r}: {comments.get(f.name, '')}" for f in fields(StageConfig)]
    return "stage options (each stage of the preset's \"stages\" list; unset ones take these defaults):\n" + \
        "\n".join(lines)


def parse_args(argv=None):
    """(RLConfig, [StageConfig]): the preset's run options under the command line's, and its stages."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=DEFAULT_PRESET)
    known, rest = pre.parse_known_args(argv)
    path = known.config
    try:
        with open(path) as f:
            preset = json.load(f)
    except FileNotFoundError:
        sys.exit(f"rl.py: --config {path}: no such file")
    except json.JSONDecodeError as e:
        sys.exit(f"rl.py: --config {path}: not valid JSON ({e})")
    if not isinstance(preset, dict) or not isinstance(preset.get("stages", []), list):
        sys.exit(f"rl.py: --config {path}: expected a JSON object with a \"stages\" list")
    stages_raw = preset.pop("stages", [])
    where = path
    try:                                # the preset's run options and stages, checked with the file named
        options.config_from_dict(RLConfig, preset, source=path)
        stages = []
        for i, s in enumerate(stages_raw):
            where = f"{path}: stages[{i}]"
            if not isinstance(s, dict):
                raise options.ConfigError("expected an object of stage options")
            stages.append(options.config_from_dict(StageConfig, s, source=where))
    except (ValueError, TypeError) as e:
        sys.exit(f"rl.py: {e}" if str(e).startswith(where) else f"rl.py: {where}: {e}")
    as_flag = lambda v: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    flags = [f"--{k}={as_flag(v)}" for k, v in preset.items()]          # the command line comes after: it wins
    cfg = options.parse_config(RLConfig, flags + rest, description=__doc__ + f"\n--config defaults to {DEFAULT_PRESET}"
                               " (run options as below, and \"stages\": a list of stage option dicts).\n\n" +
                               _stage_help())
    return cfg, apply_overrides(stages, cfg.set), path


def apply_overrides(stages, overrides):
    """The stages with --set STAGE.OPTION=VALUE (or *.OPTION=VALUE) applied, checked like the preset's values."""
    stages = list(stages)
    for item in (o for o in overrides if o):
        target, dot, rest = item.partition(".")
        option, eq, value = rest.partition("=")
        names = [s.name for s in stages]
        if not dot or not eq or (target != "*" and target not in names):
            sys.exit(f"rl.py: --set {item!r}: expected STAGE.OPTION=VALUE with STAGE one of {names} or *")
        for i, s in enumerate(stages):
            if target in ("*", s.name):
                try:
                    stages[i] = options.config_from_dict(StageConfig, {**asdict(s), option: value},
                                                         source=f"--set {item}")
                except (ValueError, TypeError) as e:
                    sys.exit(f"rl.py: --set {item!r}: {e}")
    return stages


def check_stages(stages, cfg, d, source="preset"):
    """Named errors for a bad stage list, before anything is loaded."""
    if not stages:
        raise options.ConfigError(f"{source}: no stages")
    names = [s.name for s in stages]
    for i, s in enumerate(stages):
        where = f"{source}: stage {i} ({s.name!r})"
        if not re.fullmatch(r"[\w.-]+", s.name) or s.name in (cfg.init_name, "mopd"):
            raise options.ConfigError(f"{where}: name must be a plain directory name other than "
                                      f"{cfg.init_name!r} and 'mopd'")
        if names.count(s.name) > 1:
            raise options.ConfigError(f"{where}: the name appears twice")
        unknown = [dom for dom in s.domains if dom not in tasks.GRADED_DOMAINS and not s.reward_model]
        if unknown or not s.domains:           # with a reward model, any domain with prompts (e.g. "sft/chat")
            raise options.ConfigError(f"{where}: unknown domain(s) {unknown or '(none given)'}; "
                                      f"domains with a verifier: {', '.join(tasks.GRADED_DOMAINS)}")
        if s.reward_model and set(s.domains) & set(tasks.ENVIRONMENTS):
            raise options.ConfigError(f"{where}: the reward model judges single-turn responses; "
                                      f"{sorted(set(s.domains) & set(tasks.ENVIRONMENTS))} are multi-turn")
        if s.weights and (len(s.weights) != len(s.domains) or min(s.weights) < 0 or sum(s.weights) <= 0):
            raise options.ConfigError(f"{where}: weights {s.weights} must be one non-negative number per domain "
                                      f"{s.domains}, not all zero")
        if s.rollouts < 2:
            raise options.ConfigError(f"{where}: rollouts must be >= 2 (a group of one has no baseline)")
        if s.prompts_per_step < 1 or s.prompts_per_step % d.world_size:
            raise options.ConfigError(f"{where}: prompts_per_step {s.prompts_per_step} must be a positive multiple of "
                                      f"the {d.world_size} processes")
        if s.temperature <= 0 or not 0 < s.top_p <= 1:
            raise options.ConfigError(f"{where}: rollouts need temperature > 0 and top_p in (0, 1]")
        if s.steps < 1 or s.micro_batch_tokens < 1 or s.max_new_tokens < 1:
            raise options.ConfigError(f"{where}: steps, micro_batch_tokens and max_new_tokens must be >= 1")
        if s.context < 0 or 0 < s.context <= stage_budget(s):
            raise options.ConfigError(f"{where}: context {s.context} must be 0 (the model's) or leave room for a "
                                      f"prompt beside the budget of {stage_budget(s)} tokens")
    cfg.only = tuple(n for n in cfg.only if n)
    missing = [n for n in cfg.only if n not in names]
    if missing:
        raise options.ConfigError(f"--only: no stage named {missing} in {source} (stages: {names})")


# ----------------------------------------------------------------------------------------------------------------
# GRPO: advantages and the loss


def group_advantages(rewards, group_size, std_floor):
    """A_i = (r_i - mean(r_group)) / max(std(r_group), std_floor), rewards [G * n] grouped by prompt. The std is
    the unbiased one (as verl and TRL); the floor keeps a near-constant group from getting huge advantages."""
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)
    std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
    return ((r - r.mean(dim=1, keepdim=True)) / std.clamp(min=std_floor)).view(-1)


def grpo_loss(logprobs, advantages, mask, n_tokens, ref_logprobs=None, kl_coef=0.0):
    """
    The token-level GRPO loss of DESIGN.md section 7 over one micro-batch, normalised by n_tokens, the valid
    tokens of the WHOLE batch (all micro-batches and processes), so splitting the batch changes nothing:
        L = -(1 / n_tokens) sum_i sum_t A_i log pi(o_i,t)  [+ kl_coef (1 / n_tokens) sum k3_t]
    One optimizer step per batch means pi = pi_old, so the PPO ratio is exactly 1 and this is its gradient.
    k3_t = exp(ref_t - lp_t) - (ref_t - lp_t) - 1, the non-negative, unbiased KL(pi || ref) estimator.
    logprobs [B, T] (trainer), advantages [B], mask [B, T] (the completion tokens).
    """
    loss = -(advantages[:, None] * logprobs * mask).sum() / n_tokens
    if kl_coef > 0:
        diff = (ref_logprobs - logprobs) * mask
        loss = loss + kl_coef * ((diff.exp() - diff - 1) * mask).sum() / n_tokens
    return loss


def train_step(model, prompts, completions, advantages, micro_batch_tokens, grad_clip, d, pad_id=0,
               ref_model=None, kl_coef=0.0):
    """
    The gradient of one batch from this process's rollouts (prompts[i] + completions[i], advantage[i]), clipped;
    the caller takes the optimizer step. The rollouts go in micro-batches of at most micro_batch_tokens tokens,
    one forward/backward each, a prompt run once for all of its rollouts in one (common.micro_batches,
    common.rollout_logprobs), and every process runs the same number of them (FSDP's collectives must pair up; a
    process with fewer runs empty ones). Returns the batch's loss, grad norm, and the trainer log-probs of
    every sampled token (per rollout) for the sampler/trainer consistency check.
    """
    n_local = sum(len(c.policy(c.tokens)) for c in completions)          # environment tokens train nothing
    n_tokens = common.all_reduce_sum(torch.tensor(float(n_local), device=d.device), d).clamp(min=1)
    adv = torch.as_tensor(advantages, dtype=torch.float32, device=d.device)
    loss_sum, trainer_lp = torch.zeros((), device=d.device), [None] * len(completions)
    for rows in common.micro_batches(prompts, completions, micro_batch_tokens, d):
        p_rows, c_rows = [prompts[i] for i in rows], [completions[i] for i in rows]
        lp, mask = common.rollout_logprobs(model, p_rows, c_rows, d.device, pad_id)
        ref = None
        if ref_model is not None and kl_coef > 0:
            with torch.no_grad():
                ref = common.rollout_logprobs(ref_model, p_rows, c_rows, d.device, pad_id)[0]
        loss = grpo_loss(lp, adv[rows], mask, n_tokens, ref, kl_coef)
        (loss * d.world_size).backward()              # FSDP averages gradients over processes: undo it
        loss_sum += loss.detach()
        for i, row, msk in zip(rows, lp.detach().float(), mask):
            trainer_lp[i] = row[msk].tolist()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    loss = common.all_reduce_sum(loss_sum, d).item()
    return loss, grad_norm, trainer_lp


# ----------------------------------------------------------------------------------------------------------------
# Rollouts: draw prompts, sample groups, grade, and (dynamic filtering) refill the batch


def grade(examples, texts, finished, workers=None):
    """Reward of each response; a response cut off by the token budget scores 0 without being graded. Graded in
    parallel threads (code runs in sandbox processes, math in its worker processes: a thread mostly waits on a
    process, so two per core grade code about 25% faster than one on the tiny default). At most 64 threads: as
    root no more sandbox runs than that go at once on a machine (its 64 throwaway uids), and each thread keeps a
    sandbox launcher and a math worker process alive (18 MB and more each): 2 x 192 cores would hold hundreds."""
    jobs = [i for i, ok in enumerate(finished) if ok]
    with ThreadPoolExecutor(max_workers=workers or min(2 * (os.cpu_count() or 1), 64)) as pool:
        scores = list(pool.map(lambda i: tasks.reward(examples[i], texts[i]), jobs))
    rewards = [0.0] * len(texts)
    for i, r in zip(jobs, scores):
        rewards[i] = float(r)
    return rewards


def fill_batch(rollout_round, prompts_per_step, dynamic_filtering, max_fill_rounds, d):
    """
    The groups to train on. rollout_round(round, count) samples and grades `count` new prompts (this process
    handles its share) and returns its groups, each a dict with "rewards". Without filtering: one round. With
    it: a group whose rewards are all equal has zero advantage everywhere (no signal), so it is dropped and more
    prompts are sampled, round after round, until prompts_per_step groups are kept or max_fill_rounds extra
    rounds are spent; then it warns and returns what it has (possibly nothing) rather than loop. The kept groups
    are the first prompts_per_step in draw order across processes, the same choice on every process.
    Returns (this process's kept groups, every sampled group of this process, prompts drawn in total).
    """
    kept, sampled, drawn, n_kept = [], [], 0, 0
    for rnd in range(1 + (max_fill_rounds if dynamic_filtering else 0)):
        count = prompts_per_step if rnd == 0 else \
            math.ceil((prompts_per_step - n_kept) / d.world_size) * d.world_size
        groups = rollout_round(rnd, count)
        sampled += groups
        drawn += count
        signal_ = torch.zeros(count)                   # 1 where a group has reward variance, over all processes
        for j, g in zip(range(d.rank, count, d.world_size), groups):
            signal_[j] = float(not dynamic_filtering or max(g["rewards"]) > min(g["rewards"]))
        signal_ = common.all_reduce_sum(signal_.to(d.device), d).cpu()
        take = (signal_ > 0) & (signal_.cumsum(0) + n_kept <= prompts_per_step)
        kept += [g for j, g in zip(range(d.rank, count, d.world_size), groups) if take[j]]
        n_kept += int(take.sum())
        if n_kept >= prompts_per_step:
            break
    if n_kept < prompts_per_step and d.is_main:
        warnings.warn(f"dynamic filtering: only {n_kept} of {prompts_per_step} groups have reward variance after "
                      f"{max_fill_rounds} refill rounds; training on those")
    return kept, sampled, drawn


# ----------------------------------------------------------------------------------------------------------------
# One stage


def run_stage(cfg, stage, index, start_from, start_scores, d, tokenizer, stage_prompts, eval_examples,
              reward_spec=None):
    stage_dir = os.path.join(cfg.out_dir, stage.name)
    common.claim_out_dir(stage_dir, "rl", Model.config_from_pretrained(start_from))     # one run at a time
    model = common.load_policy(start_from, d, cfg.bf16, cfg.activation_checkpointing)
    ref_model = common.load_policy(start_from, d, cfg.bf16, trainable=False) if stage.kl_coef > 0 else None
    rm = judge.open_judge(reward_spec, d, cfg.bf16, stage.judge_max_new_tokens, stage.judge_thinking,
                          stage.judge_batch, stage.judge_timeout_s, stage.judge_retries) if reward_spec else None
    optimizer, ckpt, log, start_step = common.start_or_resume(
        model, stage_dir, d, f"rl[{stage.name}]", stage.lr, stage.betas, stage.weight_decay, cfg.keep_last,
        cfg.wandb_project, dict(asdict(cfg), stage=asdict(stage)))
    steps = min(stage.steps, cfg.max_steps) if cfg.max_steps else stage.steps
    logged = common.read_metrics(log.path) if d.is_main and os.path.exists(log.path) else []
    if start_step == 0 and d.is_main and not any(r["step"] == 0 for r in logged):
        log.log(0, **{f"eval_{dom}": s for dom, s in start_scores.items()})     # the start: the previous row

    pools, prompt_ids = stage_prompts                       # encoded and checked once, by main, before any model
    weights = stage.weights or [1.0] * len(stage.domains)
    if d.is_main:
        sizes = ", ".join(f"{len(p)} {dom}" for p, dom in zip(pools, stage.domains))
        print(f"rl[{stage.name}]: {steps} steps of {stage.prompts_per_step} prompts x {stage.rollouts} rollouts on "
              f"{dict(zip(stage.domains, weights))} ({sizes} prompts), from {start_from}")
        if reward_spec:
            print(f"rl[{stage.name}]: rewarded by the judge {reward_spec.get('path') or reward_spec['url']} "
                  f"({stage.judge_format})")

    def rollout_round(step, rnd, count):
        draws = common.draw_prompts(pools, weights, count, cfg.seed, index, step, rnd)[d.rank::d.world_size]
        prompts = [prompt_ids[k][i].tolist() for k, i in draws]
        examples = [pools[k][i] for k, i in draws]
        t0 = time.perf_counter()
        n = stage.rollouts
        outs, rewards, played = sample.sample_groups(
            model, tokenizer, examples, prompts, n, stage.max_new_tokens, stage.sample_batch,
            lambda c: common.rollout_seed(cfg.seed, index, step, d.rank, rnd, c), temperature=stage.temperature,
            top_p=stage.top_p, max_turns=stage.max_turns, max_episode_tokens=stage.max_episode_tokens,
            thinking=stage.thinking)
        outcomes.update(played)
        t1 = time.perf_counter()
        flat = [i for i, r in enumerate(rewards) if r is None]         # single-turn: graded by the verifiers
        texts = [sample.response_text(tokenizer, outs[i], stage.thinking) for i in flat]
        finished = [outs[i].finish_reason == "stop" for i in flat]
        verified = all(examples[i // n]["domain"] in tasks.VERIFIERS for i in flat)
        graded = grade([examples[i // n] for i in flat], texts, finished) if rm is None or verified else None
        if rm is not None:      # RLHF: the judge's rewards (every rollout is single-turn: flat is all of them);
            hidden = graded     # a verifier's rewards, where the domain has one, are only counted (hidden criteria)
            graded, counts = judge.score_groups(rm, [tasks.prompt_messages(ex) for ex in examples], texts, finished,
                                                n, stage.thinking, hidden, stage.judge_opponents,
                                                stage.judge_format)
            judged.update(counts, hidden_sum=sum(hidden or []), hidden_n=len(hidden or []))
        for i, r in zip(flat, graded):
            rewards[i] = r
        timing["sample"] += t1 - t0
        timing["score"] += time.perf_counter() - t1
        return [dict(domain=stage.domains[k], prompt=prompts[j], completions=outs[j * n:(j + 1) * n],
                     rewards=rewards[j * n:(j + 1) * n]) for j, (k, _) in enumerate(draws)]

    def evaluate():
        t0 = time.perf_counter()
        scores = sample.evaluate_domains(model, tokenizer, eval_examples, d, cfg.eval_max_new_tokens,
                                         cfg.eval_thinking, cfg.eval_batch_size, cfg.eval_max_episode_tokens)
        return scores, time.perf_counter() - t0

    model.train()
    bar = tqdm(range(start_step, steps), initial=start_step, total=steps, desc=f"rl[{stage.name}]",
               disable=not d.is_main, dynamic_ncols=True)
    for step in bar:
        if step == cfg.inject_kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        timing = dict(sample=0.0, score=0.0)
        outcomes = collections.Counter()          # how this step's episodes ended (multi-turn domains)
        judged = collections.Counter()            # the judge's verdicts this step (RLHF)
        lr = common.lr_at(step, stage.lr, stage.warmup_steps, steps, "constant")
        common.set_lr(optimizer, lr)
        kept, sampled, drawn = fill_batch(lambda rnd, count: rollout_round(step, rnd, count),
                                          stage.prompts_per_step, stage.dynamic_filtering, stage.max_fill_rounds, d)

        t_train = time.perf_counter()
        prompts = [g["prompt"] for g in kept for _ in g["completions"]]
        completions = [c for g in kept for c in g["completions"]]
        rewards = [r for g in kept for r in g["rewards"]]
        advantages = group_advantages(rewards, stage.rollouts, stage.adv_std_floor) if kept else torch.zeros(0)
        n_kept = int(common.all_reduce_sum(torch.tensor(float(len(kept)), device=d.device), d).item())
        if n_kept:
            loss, grad_norm, trainer_lp = train_step(model, prompts, completions, advantages,
                                                     stage.micro_batch_tokens, stage.grad_clip, d, tokenizer.pad_id,
                                                     ref_model, stage.kl_coef)
            common.check_finite(step, loss=loss, grad_norm=grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:                                           # nothing to learn from: no update this step
            loss, grad_norm, trainer_lp = 0.0, 0.0, []
        imbalance = common.balance_experts(model, d)
        timing["train"] = time.perf_counter() - t_train

        metrics = step_metrics(sampled, completions, trainer_lp, stage, drawn, d)
        metrics.update(episode_metrics(outcomes, d))
        metrics.update(judge_metrics(judged, d) if rm is not None else {})
        metrics.update(loss=loss, grad_norm=grad_norm, lr=lr, groups_kept=n_kept, expert_imbalance=imbalance,
                       time_sample=timing["sample"], time_score=timing["score"], time_train=timing["train"],
                       rollout_tokens_per_s=metrics.pop("rollout_tokens") / max(timing["sample"], 1e-9),
                       peak_mem_mb=common.peak_memory_mb(d.device))
        done = step + 1
        if stage.eval_every and done % stage.eval_every == 0 and done < steps:
            scores, _ = evaluate()
            metrics.update({f"eval_{dom}": s for dom, s in scores.items()})
        log.log(done, **metrics)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", loss=f"{loss:.4f}", gnorm=f"{grad_norm:.2f}",
                        zero_var=f"{metrics['zero_var_frac']:.2f}")
        if (cfg.save_every and done % cfg.save_every == 0) or done == steps:
            ckpt.save(done, model, optimizer, dict(stage=stage.name))
    bar.close()

    # export, evaluate on every domain, plot, record
    export_dir = os.path.join(stage_dir, "export")
    common.export_hf(model, tokenizer, export_dir, d,
                     dtype=getattr(torch, cfg.export_dtype) if cfg.export_dtype else None)
    scores, seconds = evaluate()
    log.log(steps, **{f"eval_{dom}": s for dom, s in scores.items()}, eval_seconds=seconds)
    if d.is_main:
        keys = [f"reward_{dom}" for dom in stage.domains] + [f"eval_{dom}" for dom in scores] + \
               (["hidden_reward", "judge_agreement", "judge_unparsable_frac"] if rm is not None else []) + \
               ["zero_var_frac", "response_len", "truncated_frac", "entropy", "logprob_diff_mean", "grad_norm",
                "time_sample", "time_score", "time_train"]
        common.plot_metrics(log.path, os.path.join(stage_dir, "curves.png"), keys)
    common.release_out_dir(stage_dir)
    return export_dir, scores


def episode_metrics(outcomes, d):
    """How the step's multi-turn episodes ended, over all processes: the share that the environment finished,
    and the shares cut by the turn limit and by the token budget (both scored 0). Empty for a stage without
    multi-turn domains."""
    keys = ("done", "turns", "tokens")
    counts = common.all_reduce_sum(torch.tensor([float(outcomes[k]) for k in keys], device=d.device), d).tolist()
    total = sum(counts)
    if not total:
        return {}
    return {"episodes_done_frac": counts[0] / total, "episodes_over_turns_frac": counts[1] / total,
            "episodes_over_tokens_frac": counts[2] / total}


def judge_metrics(counts, d):
    """The step's judgements over all processes (RLHF): the share of unparsable verdicts (counted as ties), of
    pairs the verifier ranks that the judge ranks alike (judge_agreement), the rollouts' verifier reward
    (hidden_reward), where the domain has one, and for a pairwise judge the shares of ties and of pairs whose two
    orders agree (position consistency)."""
    keys = ("judgements", "ties", "unparsable", "pairs", "consistent", "decided", "agreed", "hidden_sum", "hidden_n")
    c = dict(zip(keys, common.all_reduce_sum(torch.tensor([float(counts[k]) for k in keys], device=d.device),
                                             d).tolist()))
    out = dict(judgements=c["judgements"], judge_unparsable_frac=c["unparsable"] / max(c["judgements"], 1))
    if c["pairs"]:
        out.update(judge_tie_frac=c["ties"] / max(c["judgements"], 1),
                   judge_consistent_frac=c["consistent"] / c["pairs"])
    if c["decided"]:
        out["judge_agreement"] = c["agreed"] / c["decided"]
    if c["hidden_n"]:
        out["hidden_reward"] = c["hidden_sum"] / c["hidden_n"]
    return out


def step_metrics(sampled, completions, trainer_lp, stage, drawn, d):
    """Per-step health numbers over every group sampled this step (all processes): reward per domain, zero-variance
    groups, response lengths, entropy (estimated as the mean -log p of the sampled tokens at temperature 1), and
    |sampler - trainer| log-prob over the trained tokens."""
    doms = list(stage.domains)
    sums = torch.zeros(len(doms), 2)                                   # reward sum, rollout count per domain
    lens = [len(c.policy(c.tokens)) for g in sampled for c in g["completions"]]        # tokens the policy wrote
    for g in sampled:
        sums[doms.index(g["domain"])] += torch.tensor([sum(g["rewards"]), len(g["rewards"])])
    n_zero = sum(max(g["rewards"]) == min(g["rewards"]) for g in sampled)
    raw = [lp for g in sampled for c in g["completions"] for lp in c.policy(c.raw_logprobs)]
    diffs = [abs(s - t) for c, tl in zip(completions, trainer_lp) for s, t in zip(c.policy(c.raw_logprobs), tl)]
    n_cut = sum(c.finish_reason == "length" for g in sampled for c in g["completions"])
    local = torch.tensor([len(sampled), n_zero, len(lens), sum(lens), n_cut, -sum(raw), len(raw), sum(diffs),
                          len(diffs)], dtype=torch.float64)
    totals = common.all_reduce_sum(torch.cat([sums.flatten().double(), local]).to(d.device), d).cpu()
    sums, local = totals[:2 * len(doms)].view(-1, 2), totals[2 * len(doms):]
    groups, zero, n_resp, tok, cut, neg_lp, n_lp, diff, n_diff = local.tolist()
    max_len = torch.tensor(float(max(lens, default=0)))
    max_diff = torch.tensor(float(max(diffs, default=0.0)))
    if d.world_size > 1:
        for t in (max_len, max_diff):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
    out = {f"reward_{dom}": float(s / max(c, 1)) for dom, (s, c) in zip(doms, sums.tolist()) if c}
    out.update(reward=float(sums[:, 0].sum() / sums[:, 1].sum().clamp(min=1)), zero_var_frac=zero / max(groups, 1),
               resampled_frac=(drawn - stage.prompts_per_step) / stage.prompts_per_step,
               response_len=tok / max(n_resp, 1), response_len_max=max_len.item(), truncated_frac=cut / max(n_resp, 1),
               entropy=neg_lp / max(n_lp, 1), logprob_diff_mean=diff / max(n_diff, 1),
               logprob_diff_max=max_diff.item(), rollout_tokens=tok)
    return out


# ----------------------------------------------------------------------------------------------------------------


def main(cfg: RLConfig, stages: list, source="preset"):
    d = common.init_dist(cfg.device)
    check_stages(stages, cfg, d, source)
    os.makedirs(cfg.out_dir, exist_ok=True)
    cascade_path = os.path.join(cfg.out_dir, "cascade.json")
    if not os.path.isfile(os.path.join(cfg.init, "config.json")):
        raise options.ConfigError(f"--init {cfg.init}: not an HF export directory (config.json + safetensors); "
                                  "run sft.py first")
    tokenizer = load_tokenizer(cfg.init)
    init_config = Model.config_from_pretrained(cfg.init)
    common.check_tokenizer(tokenizer, init_config, f"--init {cfg.init}")
    loaded = {}                                      # train_data source -> its examples, each read once
    eval_examples = common.load_eval_examples(cfg.eval_data, per_domain=cfg.eval_per_domain)
    context = init_config.max_position_embeddings
    sample.encode_prompts(tokenizer, eval_examples, cfg.eval_thinking, context, cfg.eval_max_new_tokens,
                          source=f"--eval_data {cfg.eval_data}", hint="shorten it or lower --eval_max_new_tokens")
    stage_prompts, judges = {}, {}           # every stage still to run: its prompts encoded once, and checked to
    for stage in stages:                     # fit, and its judge checked, before any model loads
        if finished_row(cfg, stage, cascade_path) is None:
            data = stage.prompt_data or cfg.train_data
            if data not in loaded:
                loaded[data] = tasks.load_examples(data, verbose=d.is_main)
            stage_context = min(stage.context or context, context)
            stage_prompts[stage.name] = sample.prompt_pools(loaded[data], stage.domains, tokenizer, stage.thinking,
                                                            stage_budget(stage), stage_context,
                                                            train_source(cfg, stage))
            if stage.reward_model:            # the judge's checkpoint read, or its endpoint asked, before any model
                try:
                    judges[stage.name] = judge.check_reward_model(stage.reward_model, cfg.init, stage.judge_timeout_s)
                except judge.JudgeError as e:
                    raise judge.JudgeError(f"stage {stage.name!r}: {e}") from None
    evaluation = dict(data=cfg.eval_data, per_domain=cfg.eval_per_domain, max_new_tokens=cfg.eval_max_new_tokens,
                      max_episode_tokens=cfg.eval_max_episode_tokens, thinking=cfg.eval_thinking, greedy=True)
    common.check_evaluation(common.read_cascade(cascade_path), evaluation, cascade_path)

    # the starting checkpoint's row: the scores every stage is compared with
    if common.cascade_row(common.read_cascade(cascade_path), cfg.init_name) is None:
        model = common.load_policy(cfg.init, d, cfg.bf16)
        t0 = time.perf_counter()
        scores = sample.evaluate_domains(model, tokenizer, eval_examples, d, cfg.eval_max_new_tokens,
                                         cfg.eval_thinking, cfg.eval_batch_size, cfg.eval_max_episode_tokens)
        del model
        common.write_cascade_row(cascade_path, dict(name=cfg.init_name, checkpoint=os.path.abspath(cfg.init),
                                                    trained=[], scores=scores), d, evaluation)
        if d.is_main:
            print(f"rl: {cfg.init_name} held-out pass@1 {fmt(scores)} ({time.perf_counter() - t0:.1f} s)")

    start_from = cfg.init
    for index, stage in enumerate(stages):
        row = finished_row(cfg, stage, cascade_path)
        if row is not None:
            if d.is_main:
                print(f"rl[{stage.name}]: finished earlier ({fmt(row['scores'])}); skipping")
            start_from = os.path.join(cfg.out_dir, stage.name, "export")
            continue
        if cfg.only and stage.name not in cfg.only:
            raise options.ConfigError(f"--only {','.join(cfg.only)}: stage {stage.name!r} comes first and is not "
                                      "finished")
        t0 = time.perf_counter()
        start_scores = next(r["scores"] for r in common.read_cascade(cascade_path)["rows"]
                            if r["checkpoint"] == os.path.abspath(start_from))
        export_dir, scores = run_stage(cfg, stage, index, start_from, start_scores, d, tokenizer,
                                       stage_prompts.pop(stage.name), eval_examples, judges.get(stage.name))
        common.write_cascade_row(cascade_path, dict(name=stage.name, checkpoint=os.path.abspath(export_dir),
                                                    trained=list(stage.domains), scores=scores,
                                                    seconds=round(time.perf_counter() - t0, 1)), d, evaluation)
        if d.is_main:
            print(f"rl[{stage.name}]: held-out pass@1 {fmt(scores)}; exported {export_dir}")
        start_from = export_dir
        if cfg.only and all(common.cascade_row(common.read_cascade(cascade_path), n) for n in cfg.only):
            break
    common.close_dist()
    return common.read_cascade(cascade_path)


def finished_row(cfg, stage, cascade_path):
    """The stage's cascade.json row if the stage is finished (its row and its export are there), else None."""
    row = common.cascade_row(common.read_cascade(cascade_path), stage.name)
    export = os.path.join(cfg.out_dir, stage.name, "export", "config.json")
    return row if row is not None and os.path.isfile(export) else None


def stage_budget(stage):
    """Tokens a stage's rollout may add after its prompt: a turn's budget, or an episode's where it has
    multi-turn domains (a prompt must fit the model's context with it)."""
    multi = any(dom in tasks.ENVIRONMENTS for dom in stage.domains)
    return max(stage.max_new_tokens, stage.max_episode_tokens if multi else 0)


def train_source(cfg, stage):
    """How errors name a stage's training prompts (the same up front and when the stage runs)."""
    return f"stage {stage.name!r}: " + (f"its prompt_data {stage.prompt_data}" if stage.prompt_data else
                                         f"--train_data {cfg.train_data}")


def fmt(scores):
    return " ".join(f"{dom} {s:.3f}" for dom, s in scores.items())


if __name__ == "__main__":
    common.run_main(lambda args: main(*args), parse_args())
