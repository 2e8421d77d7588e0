"""
Memory model: bytes per GPU for training (FSDP2) and sampling, from the config. Parameter, gradient and optimizer
bytes are counted; activation bytes per token are measured, not guessed: one block of each layer kind at the
real widths runs a short forward on CPU and every tensor autograd saves for backward is counted
(saved_tensors_hooks), in the compute dtype. Routed experts only change the weights (and E router scores per
token), so the MoE block is traced with k and 2k experts and extrapolated to E.

    python memory.py configs/nemotron3_nano_30b_a3b.json --seq_len 65536 --gpus 8
    python memory.py configs/nemotron3_nano_30b_a3b.json --stage configs/rl_nano_30b.json:long-context-rl
    python model.py CONFIG --memory ...        # the same report
"""
import argparse
import dataclasses
import json

import torch

import options
from model import Mamba2Mixer, Model, ModelConfig


def saved_bytes_per_token(config: ModelConfig, kind, dtype=torch.bfloat16, tokens=None, segment=False):
    """Bytes autograd keeps per token for one block of `kind` (M, *, E, -). segment: a Mamba block's one-segment
    working set (what its recompute holds at once), instead of what it keeps across segments."""
    key = (repr(config), kind, dtype, tokens, segment)
    if key not in _traced:
        _traced[key] = _saved_bytes_per_token(config, kind, dtype, tokens, segment)
    return _traced[key]


_traced = {}        # saved_bytes_per_token's results: a trace at real width takes seconds


def _saved_bytes_per_token(config, kind, dtype, tokens, segment):
    l = config.chunk_size
    if kind == "E" and config.n_routed_experts > 2 * config.num_experts_per_tok:
        k = config.num_experts_per_tok
        small = [saved_bytes_per_token(dataclasses.replace(config, n_routed_experts=e), kind, dtype, tokens)
                 for e in (k, 2 * k)]
        return small[0] + (small[1] - small[0]) * (config.n_routed_experts - k) / k
    cfg = dataclasses.replace(config, hybrid_override_pattern=kind, vocab_size=8, moe_impl="torch")
    torch.manual_seed(0)
    block = Model(cfg).set_dtype(dtype).backbone.layers[0]
    T = tokens or 4 * l
    if kind == "M" and not segment:
        block.mixer.segment_tokens = T // 4                 # segmented, as under autograd at T > segment_tokens
    h = torch.randn(1, T, cfg.hidden_size, dtype=dtype, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params | {h.untyped_storage().data_ptr()}:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if kind == "M" and segment:         # one segment: the mixer's inner function, unsegmented
            x = block.norm(h)
            block.mixer.out_proj(block.mixer.mix(block.mixer.in_proj(x), None, None)[0])
        else:
            block(h)
    return sum(seen.values()) / T


def memory_model(config: ModelConfig, seq_len, gpus, micro_batch=1, bf16=True, activation_checkpointing=True,
                 sample_rows=64, sample_len=None, ref=False, judge=None, judge_rows=64, judge_len=4096):
    """
    Bytes per GPU. Training, FSDP2 over `gpus` (fp32 master weights, bf16 compute when bf16):
      params / grads / adam: 4 / 4 / 8 bytes per parameter, sharded;  gathered: the root (embeddings, lm_head)
      stays gathered through the step, plus two layers (current and prefetched) in the compute dtype;
      activations: with activation checkpointing each layer keeps its input (H per token) and one layer at a
      time its saved tensors (plus as much again for their gradients in backward); without, every layer keeps
      its saved tensors (plus the largest layer's again in backward); a Mamba layer's recompute also holds one
      segment's working set. Checked against measured CPU peaks in tests/test_scale.py (within 20%);
      logprobs: the final hidden state and its gradient, and one chunk's fp32 logits (about 3 copies in backward).
    Sampling: the whole model gathered in the compute dtype, and per row the KV cache (attention layers) and
    SSM + conv state (Mamba layers) at sample_len positions.
    Frozen models, sharded like the policy in fp32 and held through every phase: the KL reference (ref, RL with
    kl_coef > 0 such as RLHF) and an in-process judge (judge: its ModelConfig; rl.py's reward_model). Judging, after
    the rollouts (their gathered copy is freed by then), gathers the judge in the compute dtype with the caches
    of judge_rows judgements at judge_len positions (prompt and judgement).
    """
    a = 2 if bf16 else 4
    dtype = torch.bfloat16 if bf16 else torch.float32
    with torch.device("meta"):
        model = Model(config)
    P = sum(p.numel() for p in model.parameters())
    root = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone.layers."))
    layer = max(sum(p.numel() for p in blk.parameters()) for blk in model.backbone.layers)
    T, H, V = micro_batch * seq_len, config.hidden_size, config.vocab_size
    kinds = sorted(set(config.hybrid_override_pattern))
    per_token = {k: saved_bytes_per_token(config, k, dtype) for k in kinds}
    seg = Mamba2Mixer.segment_tokens
    if "M" in kinds and T > seg:                    # a Mamba recompute holds one segment's working set at once
        mamba_segment = saved_bytes_per_token(config, "M", dtype, tokens=4 * config.chunk_size, segment=True) * seg
    else:
        mamba_segment = 0
        if "M" in kinds:
            per_token["M"] = saved_bytes_per_token(config, "M", dtype, segment=True)
    L = config.num_hidden_layers
    if activation_checkpointing:
        activations = T * (L * a * H + 2 * max(per_token.values())) + mamba_segment
    else:
        activations = T * (sum(per_token[c] for c in config.hybrid_override_pattern) + max(per_token.values())) \
            + mamba_segment
    chunk = max(64, 2**24 // V)
    logprobs = T * H * a * 2 + 3 * chunk * V * 4
    train = dict(params=4 * P / gpus, grads=4 * P / gpus, adam=8 * P / gpus, gathered=a * (root + 2 * layer),
                 activations=activations, logprobs=logprobs)
    if judge is not None:
        with torch.device("meta"):
            P_judge = Model(judge).num_params()["total"]
    else:
        P_judge = 0
    frozen = 4 * (P * ref + P_judge) / gpus
    if frozen:
        train["frozen"] = frozen
    train["total"] = sum(train.values())
    out = dict(params=P, per_token=per_token, train=train, sample=sampling_memory(config, a, sample_rows,
                                                                                   sample_len or seq_len, P))
    if judge is not None:
        out["judge"] = dict(sampling_memory(judge, a, judge_rows, judge_len, P_judge), shards=4 * P_judge / gpus)
    return out


def sampling_memory(config: ModelConfig, a, rows, length, params):
    """Bytes of a generate phase: the model's `params` gathered at `a` bytes each, and per row the KV cache
    (attention layers) and SSM + conv state (Mamba layers) at `length` positions."""
    n_attn, n_mamba = config.hybrid_override_pattern.count("*"), config.hybrid_override_pattern.count("M")
    conv_dim = config.mamba_num_heads * config.mamba_head_dim + 2 * config.n_groups * config.ssm_state_size
    kv_row = n_attn * 2 * config.num_key_value_heads * config.head_dim * a * length
    ssm_row = n_mamba * (config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size * 4
                         + (config.conv_kernel - 1) * conv_dim * a)
    out = dict(params=a * params, cache_per_row=kv_row + ssm_row, rows=rows)
    out["total"] = out["params"] + rows * out["cache_per_row"]
    return out


def stage_memory_shape(spec, config: ModelConfig, gpus):
    """(tokens per forward, rows per forward, sampled rows, sampled positions) of an RL stage, spec PRESET:STAGE:
    a rollout longer than micro_batch_tokens trains in a row of its own, so the longest forward is one rollout of
    the stage's context (its `context`, else the model's); each process samples sample_batch prompts (0 = its
    share of prompts_per_step) x rollouts rows at that context."""
    from rl import StageConfig          # the stage scripts sit above this tool; only this needs one
    path, _, name = spec.rpartition(":")
    with open(path) as f:
        stages = {s.get("name"): s for s in json.load(f).get("stages", [])}
    if name not in stages:
        raise SystemExit(f"memory.py: --stage {spec}: no stage {name!r} in {path} (stages: {', '.join(stages)})")
    stage = options.config_from_dict(StageConfig, stages[name], source=f"{path}: stage {name}")
    context = min(stage.context or config.max_position_embeddings, config.max_position_embeddings)
    prompts = stage.sample_batch or max(stage.prompts_per_step // gpus, 1)
    return max(context, stage.micro_batch_tokens), 1, prompts * stage.rollouts, context


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default="configs/tiny_model.json", help="HF-style config.json "
                    "(default: %(default)s)")
    ap.add_argument("--seq-len", "--seq_len", type=int, default=256, help="tokens per row (default: %(default)s)")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs the model is sharded over (default: %(default)s)")
    ap.add_argument("--micro-batch", "--micro_batch", type=int, default=1, help="rows per forward "
                    "(default: %(default)s)")
    ap.add_argument("--sample-rows", "--sample_rows", type=int, default=64, help="rows sampled at once "
                    "(default: %(default)s)")
    ap.add_argument("--sample-len", "--sample_len", type=int, default=0, help="positions per sampled row "
                    "(default: %(default)s = seq_len)")
    ap.add_argument("--ref", action="store_true", help="a frozen KL reference (RL with kl_coef > 0)")
    ap.add_argument("--judge", default="", help="the in-process judge's config.json or checkpoint directory "
                    "(rl.py's reward_model; default: none)")
    ap.add_argument("--judge-rows", "--judge_rows", type=int, default=64, help="with --judge: judgements per "
                    "generate call (default: %(default)s)")
    ap.add_argument("--judge-len", "--judge_len", type=int, default=4096, help="with --judge: positions per "
                    "judgement, its prompt, the response(s) and the judgement (default: %(default)s)")
    ap.add_argument("--stage", default="", help="PRESET:STAGE, an RL stage (e.g. "
                    "configs/rl_nano_30b.json:long-context-rl): its longest forward, one rollout of its context "
                    "(or micro_batch_tokens if more), and its rollout caches, sample_batch prompts x rollouts at "
                    "its context; replaces the four shape options (default: none)")
    args = ap.parse_args(argv)
    config = ModelConfig.from_json(args.config)
    if args.stage:
        args.seq_len, args.micro_batch, args.sample_rows, args.sample_len = stage_memory_shape(args.stage, config,
                                                                                               args.gpus)
    GB = 1e9
    print(f"{args.config}: memory per GPU, {args.gpus} GPUs, {args.micro_batch} x {args.seq_len} tokens per "
          f"forward, bf16 compute, fp32 master weights (GB = 1e9 bytes)")
    judge = ModelConfig.from_path(args.judge) if args.judge else None
    for ac in (True, False):
        m = memory_model(config, args.seq_len, args.gpus, args.micro_batch, activation_checkpointing=ac,
                         sample_rows=args.sample_rows, sample_len=args.sample_len or None, ref=args.ref,
                         judge=judge, judge_rows=args.judge_rows, judge_len=args.judge_len)
        print(f"  train, activation checkpointing {'on ' if ac else 'off'}: " +
              ", ".join(f"{k} {v / GB:.1f}" for k, v in m["train"].items()))
        checkpointed = m if ac else checkpointed
    print("  activation bytes kept per token, by layer kind: " +
          ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in m["per_token"].items()))
    smp = m["sample"]
    print(f"  sampling: params gathered {smp['params'] / GB:.1f}, KV + SSM cache per row "
          f"{smp['cache_per_row'] / GB:.3f} at {args.sample_len or args.seq_len} positions, "
          f"{smp['rows']} rows: total {smp['total'] / GB:.1f}")
    if judge is not None:
        jm = m["judge"]
        print(f"  judge ({args.judge}): fp32 shards {jm['shards'] / GB:.1f} held throughout (in train's frozen); "
              f"judging: judge gathered {jm['params'] / GB:.1f}, KV + SSM cache per row "
              f"{jm['cache_per_row'] / GB:.3f} at {args.judge_len} positions, {jm['rows']} rows: total "
              f"{jm['total'] / GB:.1f} (+ the policy's and the judge's shards)")
    if args.stage:      # the rollout phase keeps the FSDP shards (fp32 weights, AdamW moments) beside the copy
        train = checkpointed["train"]
        shards = train["params"] + train["adam"]
        print(f"  stage {args.stage}: training {train['total'] / GB:.1f} (activation checkpointing on), "
              f"rollouts {(smp['total'] + shards) / GB:.1f} with the shards ({shards / GB:.1f})")


if __name__ == "__main__":
    main()
