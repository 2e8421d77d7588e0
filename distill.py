"""
Stage 3 of Nemotron-Cascade 2: multi-domain on-policy distillation (MOPD) from the best checkpoint per domain.

Every domain gets a teacher: by default the checkpoint with the best held-out score on it in cascade.json (the
SFT checkpoint can be one, as it is for math in the paper). The student samples; each teacher scores the
tokens the student sampled on its own domain's prompts; the student moves toward the teacher on exactly those
tokens (DESIGN.md section 7, Eq. 2-4 of the paper):

    a_t = log pi_teacher(y_t | s_t) - log pi_train(y_t | s_t)             # reverse-KL signal, sampled token only
    r_t = pi_train(y_t | s_t) / pi_sampler(y_t | s_t);   w_t = sg(r_t) * [0.5 <= r_t <= 2.0]
    L   = - mean_over_sequences( (1/|y|) sum_t w_t * sg(a_t) * log pi_train(y_t | s_t) )

No outcome reward, no group baseline, no KL to a reference: the verifiers are used only for evaluation.

    python distill.py --cascade out/rl/cascade.json --out_dir out/mopd          # the tiny default (CPU)
    torchrun --nproc_per_node=8 distill.py --config configs/mopd_nano_30b.json --cascade out/rl/cascade.json
    python distill.py --help                                                    # every option with its default

Writes to out_dir: metrics.jsonl, curves.png (reverse KL per domain over steps), checkpoints/ (resumable: rerun
the same command), export/; and appends the "mopd" row (scores, teachers) to cascade.json. A finished run is
skipped on rerun.
"""
import os
import signal
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import common
import options
import sample
import tasks
from model import Model
from tokenizer import load_tokenizer


@dataclass
class MOPDConfig:
    cascade: str = "out/rl/cascade.json"  # every checkpoint's held-out scores: teachers are picked from it
    student: str = ""  # HF export the student starts from (empty = the checkpoint of cascade.json's last row)
    teachers: tuple[str, ...] = ()  # per-domain overrides, DOMAIN=ROW_NAME_OR_EXPORT_DIR (e.g. math=sft)
    domains: tuple[str, ...] = ()  # domains to distill (empty = every scored domain with prompts in train_data)
    weights: tuple[float, ...] = ()  # share of each domain's prompts in a batch (empty = equal shares)
    out_dir: str = "out/mopd"  # metrics, checkpoints and the HF export go here
    train_data: str = "data/rl.jsonl"  # prompts (any source tasks.load_examples reads; paper: the MOPD release)
    eval_batch_size: int = 64  # held-out prompts per generate call
    eval_every: int = 0  # held-out evaluation every N steps (0 = only at the end)
    # defaults for the tiny CPU run; configs/mopd_nano_30b.json has the paper's (128 prompts x 4 rollouts, lr 2e-6
    # with a 30-step linear warmup from 2e-7, about 40-50 steps)
    steps: int = 40  # optimizer steps, one per batch
    prompts_per_step: int = 8  # prompts per batch, across processes
    rollouts: int = 4  # student completions per prompt
    micro_batch_tokens: int = 4096  # tokens per forward/backward per process (a prompt once for its rollouts)
    # half the tiny RL stages' 1e-4 (the paper too steps MOPD below its RL, 2e-6 against 3e-6): the student starts
    # near its teachers, and at 1e-4 its held-out scores wandered by up to 5 points over 20 steps (measured)
    lr: float = 5e-5  # peak learning rate (paper: 2e-6)
    warmup_steps: int = 5  # linear warmup steps, from a tenth of the peak: early gradient norms are large (paper: 30)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    max_new_tokens: int = 80  # student rollout token budget (a multi-turn domain's: per turn)
    max_turns: int = 0  # multi-turn domains: assistant turns per episode (0 = each environment's own limit)
    max_episode_tokens: int = 512  # multi-turn domains: tokens after the prompt (turns and replies)
    temperature: float = 1.0  # student sampling temperature
    top_p: float = 1.0  # student nucleus mass (the sampler's log-probs include it: r_t stays exact)
    thinking: bool = True  # render prompts in thinking mode
    weight_low: float = 0.5  # tokens with r_t below this get weight 0
    weight_high: float = 2.0  # tokens with r_t above this get weight 0
    # run
    seed: int = 0  # prompt draws and rollouts: seeded by (seed, step, rank)
    device: str = "auto"  # auto, cpu or cuda
    bf16: bool = False  # bf16 compute with fp32 master weights and reductions (FSDP, GPU)
    activation_checkpointing: bool = False  # recompute each layer in backward to save memory
    save_every: int = 5  # checkpoint every N steps (0 = only at the end)
    keep_last: int = 2  # checkpoints kept
    export_dtype: str = ""  # dtype of the HF export: bfloat16, float32 or empty = as trained
    wandb_project: str = ""  # also log to Weights & Biases when set and wandb is installed
    inject_kill_at_step: int = -1  # fault injection for tests: SIGKILL this process as this step starts


# ----------------------------------------------------------------------------------------------------------------
# Teachers


def pick_teachers(cascade, domains, overrides, source):
    """{domain: (row name, checkpoint dir, score)}: the best-scoring row per domain (ties: the later row), or the
    row name / export directory given for it in overrides ("domain=name_or_dir"). A "mopd" row already in the
    cascade (MOPD being redone) is never picked: the student's own earlier result is not one of its teachers."""
    chosen = {}
    for dom in domains:
        rows = [r for r in cascade["rows"] if dom in r["scores"] and r["name"] != "mopd"]
        if not rows:
            raise options.ConfigError(f"{source}: no checkpoint has a score on domain {dom!r}")
        best = max(reversed(rows), key=lambda r: r["scores"][dom])         # max keeps the first of ties
        chosen[dom] = (best["name"], best["checkpoint"], best["scores"][dom])
    for item in overrides:
        dom, sep, who = item.partition("=")
        if not sep or dom not in chosen:
            raise options.ConfigError(f"--teachers {item!r}: expected DOMAIN=ROW_OR_DIR with DOMAIN one of "
                                      f"{sorted(chosen)}")
        row = common.cascade_row(cascade, who)
        if row is not None:
            chosen[dom] = (row["name"], row["checkpoint"], row["scores"].get(dom))
        elif os.path.isfile(os.path.join(who, "config.json")):
            chosen[dom] = (who, who, None)
        else:
            raise options.ConfigError(f"--teachers {item!r}: {who!r} is neither a row of {source} "
                                      f"({', '.join(r['name'] for r in cascade['rows'])}) nor an export directory")
    return chosen


def same_vocabulary(tok_a, tok_b):
    return tok_a.tokenizer.get_vocab(with_added_tokens=True) == tok_b.tokenizer.get_vocab(with_added_tokens=True)


def load_teachers(chosen, student_tokenizer, student_dir, d, cfg):
    """Each distinct teacher checkpoint once, frozen, in eval mode, sharded like the student. A teacher whose
    tokenizer differs from the student's is refused: its log-probs would be of other tokens."""
    models = {}
    for dom, (name, path, _) in chosen.items():
        if path in models:
            continue
        if not same_vocabulary(load_tokenizer(path), student_tokenizer):
            raise options.ConfigError(f"teacher {name!r} for {dom} ({path}) has another vocabulary than the student "
                                      f"({student_dir}): its log-probs would score other tokens")
        models[path] = common.load_policy(path, d, cfg.bf16, trainable=False)
    return models


# ----------------------------------------------------------------------------------------------------------------
# The loss (Eq. 4)


def mopd_loss(logprobs, teacher_logprobs, sampler_logprobs, mask, n_sequences, low=0.5, high=2.0):
    """
    Eq. 4 over one micro-batch, all [B, T] (mask: the completion tokens):
        a_t = teacher - sg(train);  r_t = exp(sg(train) - sampler);  w_t = r_t * [low <= r_t <= high]
        L = -(1 / n_sequences) sum_sequences (1/|y|) sum_t w_t a_t log pi_train(y_t)
    n_sequences is the number of sequences in the WHOLE batch (all micro-batches and processes), so the loss is
    a per-sequence token mean averaged over the batch however it is split. Returns (loss, a [B, T], w [B, T]).
    """
    lp = logprobs.detach()
    adv = (teacher_logprobs - lp) * mask
    ratio = torch.exp(lp - sampler_logprobs)
    weight = torch.where((ratio >= low) & (ratio <= high), ratio, torch.zeros_like(ratio)) * mask
    per_seq = (weight * adv * logprobs * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return -per_seq.sum() / n_sequences, adv, weight


def padded(rows, mask):
    """Per-rollout lists of token values -> [n, C], in the layout of rollout_logprobs' mask [n, C]."""
    out = torch.zeros(mask.shape, dtype=torch.float32)
    mask = mask.cpu()
    for b, vals in enumerate(rows):
        out[b][mask[b]] = torch.tensor(vals, dtype=torch.float32)
    return out


# ----------------------------------------------------------------------------------------------------------------


def main(cfg: MOPDConfig):
    d = common.init_dist(cfg.device)
    cascade = common.read_cascade(cfg.cascade)
    if not cascade["rows"]:
        raise options.ConfigError(f"--cascade {cfg.cascade}: no such file or no rows; run rl.py first")
    if common.cascade_row(cascade, "mopd") is not None and \
            os.path.isfile(os.path.join(cfg.out_dir, "export", "config.json")):
        if d.is_main:
            print(f"mopd: finished earlier ({fmt(common.cascade_row(cascade, 'mopd')['scores'])}); skipping")
        common.close_dist()
        return cascade
    student_dir = cfg.student or [r for r in cascade["rows"] if r["name"] != "mopd"][-1]["checkpoint"]
    tokenizer = load_tokenizer(student_dir)
    student_config = Model.config_from_pretrained(student_dir)
    common.check_tokenizer(tokenizer, student_config, f"student {student_dir}")
    train_examples = tasks.load_examples(cfg.train_data, verbose=d.is_main)
    have = {ex["domain"] for ex in train_examples}
    domains = list(cfg.domains) or [dom for dom in cascade["domains"] if dom in have]
    unknown = [dom for dom in domains if dom not in cascade["domains"]]
    if unknown or not domains:
        raise options.ConfigError(f"--domains: {unknown or '(none)'} not scored in {cfg.cascade} "
                                  f"(scored: {cascade['domains']})")
    weights = list(cfg.weights) or [1.0] * len(domains)
    if len(weights) != len(domains) or min(weights) < 0 or sum(weights) <= 0:
        raise options.ConfigError(f"--weights {cfg.weights}: one non-negative weight per domain {domains}, "
                                  "not all zero")
    if cfg.prompts_per_step % d.world_size:
        raise options.ConfigError(f"--prompts_per_step {cfg.prompts_per_step} must be a multiple of the {d.world_size} "
                                  "processes")
    if cfg.micro_batch_tokens < 1:
        raise options.ConfigError(f"--micro_batch_tokens {cfg.micro_batch_tokens} must be >= 1")
    # held-out scores exactly as cascade.json's rows were scored (its recorded settings), so the rows compare
    ev = cascade.get("evaluation") or dict(data="data/eval.jsonl", per_domain=30, max_new_tokens=80, thinking=True)
    eval_examples = common.load_eval_examples(ev["data"], option=f"{cfg.cascade} evaluation.data",
                                              per_domain=ev["per_domain"])
    sample.encode_prompts(tokenizer, eval_examples, ev["thinking"], student_config.max_position_embeddings,
                          ev["max_new_tokens"], source=f"{cfg.cascade} evaluation.data {ev['data']}",
                          hint="shorten it or lower the evaluation's max_new_tokens")
    chosen = pick_teachers(cascade, domains, cfg.teachers, cfg.cascade)
    if d.is_main:
        for dom, (name, path, score) in chosen.items():
            scored = f"score {score:.3f}" if score is not None else "unscored"
            print(f"mopd: teacher for {dom:<5} = {name} ({scored})  {path}")
    teachers = load_teachers(chosen, tokenizer, student_dir, d, cfg)
    teacher_of = {dom: teachers[path] for dom, (_, path, _) in chosen.items()}

    common.claim_out_dir(cfg.out_dir, "mopd", student_config)   # one run at a time
    model = common.load_policy(student_dir, d, cfg.bf16, cfg.activation_checkpointing)
    budget = max(cfg.max_new_tokens, cfg.max_episode_tokens if set(domains) & set(tasks.ENVIRONMENTS) else 0)
    pools, prompt_ids = sample.prompt_pools(train_examples, domains, tokenizer, cfg.thinking, budget,
                                            model.config.max_position_embeddings, f"--train_data {cfg.train_data}")
    optimizer, ckpt, log, start_step = common.start_or_resume(
        model, cfg.out_dir, d, "mopd", cfg.lr, cfg.betas, cfg.weight_decay, cfg.keep_last, cfg.wandb_project,
        asdict(cfg))
    if d.is_main:
        print(f"mopd: student {student_dir}; {cfg.steps} steps of {cfg.prompts_per_step} prompts x {cfg.rollouts} "
              f"rollouts on {dict(zip(domains, weights))}")

    model.train()
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="mopd",
               disable=not d.is_main, dynamic_ncols=True)
    for step in bar:
        if step == cfg.inject_kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        lr = common.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps, "constant", warmup_start_lr=cfg.lr / 10)
        common.set_lr(optimizer, lr)

        # 1. the student samples (its own log-probs come back with the tokens)
        t0 = time.perf_counter()
        draws = common.draw_prompts(pools, weights, cfg.prompts_per_step, cfg.seed, 0, step, 0)[d.rank::d.world_size]
        drawn = [prompt_ids[k][i].tolist() for k, i in draws]
        prompts = [p for p in drawn for _ in range(cfg.rollouts)]
        row_domains = [domains[k] for k, _ in draws for _ in range(cfg.rollouts)]
        # a multi-turn domain's rollouts are episodes: the environment's replies are context, the teacher scores
        # and the loss trains only the student's own tokens (Completion.mask)
        outs, _, _ = sample.sample_groups(model, tokenizer, [pools[k][i] for k, i in draws], drawn, cfg.rollouts,
                                          cfg.max_new_tokens, 0, lambda c: common.rollout_seed(cfg.seed, 0, step,
                                                                                               d.rank, 0, c),
                                          temperature=cfg.temperature, top_p=cfg.top_p, max_turns=cfg.max_turns,
                                          max_episode_tokens=cfg.max_episode_tokens, thinking=cfg.thinking)
        t1 = time.perf_counter()

        # 2. each completion scored by its own domain's teacher, on exactly the sampled tokens
        teacher_lp = score_with_teachers(teachers, teacher_of, prompts, outs, row_domains, cfg.micro_batch_tokens,
                                         d, tokenizer.pad_id)
        t2 = time.perf_counter()

        # 3. one optimizer step on Eq. 4
        stats = train_step(model, prompts, outs, teacher_lp, row_domains, domains, cfg, d, tokenizer.pad_id)
        common.check_finite(step, loss=stats["loss"], grad_norm=stats["grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        imbalance = common.balance_experts(model, d)
        t3 = time.perf_counter()

        n_policy = float(sum(len(c.policy(c.tokens)) for c in outs))          # the tokens the student wrote
        lens = common.all_reduce_sum(torch.tensor([n_policy, float(len(outs))], device=d.device), d)
        metrics = dict(stats, lr=lr, response_len=(lens[0] / lens[1]).item(), time_sample=t1 - t0,
                       time_teacher=t2 - t1, time_train=t3 - t2, expert_imbalance=imbalance,
                       rollout_tokens_per_s=lens[0].item() / max(t1 - t0, 1e-9),
                       peak_mem_mb=common.peak_memory_mb(d.device))
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            metrics.update({f"eval_{dom}": s for dom, s in sample.evaluate_domains(
                model, tokenizer, eval_examples, d, ev["max_new_tokens"], ev["thinking"],
                cfg.eval_batch_size, ev.get("max_episode_tokens", 1024)).items()})
        log.log(done, **metrics)
        bar.set_postfix(rkl=f"{metrics['reverse_kl']:.4f}", loss=f"{metrics['loss']:.4f}",
                        gnorm=f"{metrics['grad_norm']:.2f}", cut=f"{metrics['weight_cut_frac']:.3f}")
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            ckpt.save(done, model, optimizer, {})
    bar.close()

    export_dir = os.path.join(cfg.out_dir, "export")
    common.export_hf(model, tokenizer, export_dir, d,
                     dtype=getattr(torch, cfg.export_dtype) if cfg.export_dtype else None)
    scores = sample.evaluate_domains(model, tokenizer, eval_examples, d, ev["max_new_tokens"], ev["thinking"],
                                     cfg.eval_batch_size, ev.get("max_episode_tokens", 1024))
    log.log(cfg.steps, **{f"eval_{dom}": s for dom, s in scores.items()})
    common.write_cascade_row(cfg.cascade, dict(name="mopd", checkpoint=os.path.abspath(export_dir),
                                               trained=domains, scores=scores,
                                               teachers={dom: name for dom, (name, _, _) in chosen.items()}), d)
    if d.is_main:
        common.plot_metrics(log.path, os.path.join(cfg.out_dir, "curves.png"),
                            [f"reverse_kl_{dom}" for dom in domains] + ["weight_cut_frac", "grad_norm",
                                                                        "response_len"])
        print(f"mopd: held-out pass@1 {fmt(scores)}; exported {export_dir}")
    common.release_out_dir(cfg.out_dir)
    common.close_dist()
    return common.read_cascade(cfg.cascade)


@torch.no_grad()
def score_with_teachers(teachers, teacher_of, prompts, outs, row_domains, micro_batch_tokens, d, pad_id):
    """log pi_teacher of every sampled token, each rollout by its own domain's teacher (one packed forward per
    micro-batch of that teacher's rollouts; every process runs the same number per teacher). Returns per-rollout
    lists."""
    out = [None] * len(outs)
    for model in teachers.values():
        mine = [i for i, dom in enumerate(row_domains) if teacher_of[dom] is model]
        p_mine, o_mine = [prompts[i] for i in mine], [outs[i] for i in mine]
        for rows in common.micro_batches(p_mine, o_mine, micro_batch_tokens, d):
            lp, mask = common.rollout_logprobs(model, [p_mine[j] for j in rows], [o_mine[j] for j in rows],
                                               d.device, pad_id)
            for j, row, msk in zip(rows, lp.float().cpu(), mask.cpu()):
                out[mine[j]] = row[msk].tolist()
    return out


def train_step(model, prompts, outs, teacher_lp, row_domains, domains, cfg, d, pad_id):
    """The gradient of Eq. 4 over this process's rollouts, in micro-batches of at most cfg.micro_batch_tokens
    tokens (common.micro_batches; the caller steps), and the step's statistics: the loss, the reverse-KL estimate
    per domain (mean of -a_t over its tokens), the share of tokens whose weight was cut."""
    n_seq = common.all_reduce_sum(torch.tensor(float(len(outs)), device=d.device), d)
    sums = torch.zeros(len(domains), 2, dtype=torch.float64)          # sum of -a_t, token count, per domain
    cut, n_tok, ratio_sum = 0.0, 0.0, 0.0
    loss_sum = torch.zeros((), device=d.device)
    for rows in common.micro_batches(prompts, outs, cfg.micro_batch_tokens, d):
        lp, mask = common.rollout_logprobs(model, [prompts[i] for i in rows], [outs[i] for i in rows], d.device,
                                           pad_id)
        t_lp = padded([teacher_lp[i] for i in rows], mask).to(d.device)
        s_lp = padded([outs[i].policy(outs[i].logprobs) for i in rows], mask).to(d.device)
        mask = mask.float()
        loss, adv, weight = mopd_loss(lp, t_lp, s_lp, mask, n_seq, cfg.weight_low, cfg.weight_high)
        (loss * d.world_size).backward()               # FSDP averages gradients over processes: undo it
        loss_sum += loss.detach()
        ratio = torch.exp(lp.detach() - s_lp) * mask
        k = torch.tensor([domains.index(row_domains[i]) for i in rows], dtype=torch.long)
        per_rollout = torch.stack([-adv.sum(-1), mask.sum(-1)], dim=-1).double().cpu()  # one host sync, not 2 a rollout
        sums.index_add_(0, k, per_rollout)
        cut += float(((weight == 0) & (mask > 0)).sum())
        n_tok += float(mask.sum())
        ratio_sum += float(ratio.sum())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    totals = common.all_reduce_sum(torch.cat([sums.flatten(), torch.tensor([cut, n_tok, ratio_sum],
                                                                          dtype=torch.float64)]).to(d.device), d).cpu()
    sums, (cut, n_tok, ratio_sum) = totals[:-3].view(-1, 2), totals[-3:].tolist()
    stats = {f"reverse_kl_{dom}": float(s / c) for dom, (s, c) in zip(domains, sums.tolist()) if c}
    stats.update(reverse_kl=float(sums[:, 0].sum() / sums[:, 1].sum().clamp(min=1)),
                 weight_cut_frac=cut / max(n_tok, 1), ratio_mean=ratio_sum / max(n_tok, 1),
                 loss=common.all_reduce_sum(loss_sum, d).item(), grad_norm=grad_norm)
    return stats


def fmt(scores):
    return " ".join(f"{dom} {s:.3f}" for dom, s in scores.items())


if __name__ == "__main__":
    common.run_main(main, options.parse_config(MOPDConfig, description=__doc__))
