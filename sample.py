"""
The in-process sampler: batched generation with the model's KV + SSM caches, group sampling and log-probs, and a
CLI to chat with, prompt or evaluate a checkpoint.

    generate(model, prompts, max_new_tokens, ...)   token ids in, list[Completion] out (what RL and MOPD call)
    generate_episodes(model, prompts, ..., respond) multi-turn: turns and environment replies in carried caches
    run_episodes / sample_groups                    episodes against tasks' environments; a step's rollouts
    with sampling_weights(model): ...               FSDP2: gather the shards once for a whole rollout phase
    evaluate(model, tokenizer, examples, ...)       chat-template prompts -> responses -> per-domain scores
    prompt_pools / evaluate_domains                 the stages' prompt check and held-out scores (any process count)

How one generate() call runs:
1. Prefill: the ragged prompts are LEFT-padded into one cache, so that every row's next token is at the same
   position, and run once, in buckets of similar lengths (each bucket into the cache's window of its rows and
   last positions: a short prompt is not computed over the padding up to the longest one; attention_mask keeps a
   bucket's own padding out of every row's state; prompts longer than prefill_chunk go in pieces). Only the last
   position goes through lm_head, so a long prompt never materialises [T, V] logits.
2. Group sampling: with n > 1, each prompt's cache row is copied n times (cache.select), so the n completions of a
   prompt share one prefill, as GRPO's groups need.
3. Decode: one token per step for every row, through the KV cache (attention layers) and the conv + SSM state
   (Mamba layers), in fixed batch slots (_decode_slots): a finished-mask marks rows that sampled a stop token,
   the host reads it once every check_every steps (no other host sync in a step), and the batch is compacted
   only when at most half its rows are live. With static shapes every step is the same kernels on the same
   shapes, so on CUDA each step can be replayed from a captured graph. The plain loop that compacts at every
   stop (_decode_reference, generate(reference=True)) is the reference the tests hold it to.

The logprobs: `Completion.logprobs[t]` is log pi_sampler(y_t), the log-probability of the sampled token under the
distribution it was actually drawn from: logits / temperature, then top-k, then top-p, renormalised. That is the
denominator of MOPD's importance weight r_t = pi_train(y_t) / pi_sampler(y_t), so it must include the truncation.
At temperature 1 with no top-k / top-p it equals the model's own log-softmax. Greedy decoding (temperature 0, or
top_k=1) draws from a point mass, so its logprobs are 0.0. `raw_logprobs=True` also returns the model's untempered,
untruncated log-softmax at each sampled token (`Completion.raw_logprobs`), which is what a trainer computes at
temperature 1 and what the sampler/trainer mismatch metric compares against; it costs one more log-softmax per
step.

The sampler runs the very model object (and MoE kernels) the trainer trains, so there is no separate inference
engine whose numerics could drift from the trainer's.

CLI (the checkpoint directory holds an HF export: config.json, safetensors, tokenizer.json):

    python sample.py --ckpt DIR                          # chat in the terminal, streamed (thinking dimmed)
    python sample.py --ckpt DIR --no-think               # non-thinking mode
    python sample.py --ckpt DIR --prompt "What is 2+2?"  # answer once and exit
    python sample.py --ckpt DIR --eval data/eval.jsonl --n 4 --out scores.json   # per-domain pass@1 / avg@K
"""
import argparse
import collections
import contextlib
import itertools
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

import common
import options
from model import InferenceCache, Model


@dataclass
class Completion:
    tokens: list[int]                   # sampled ids; ends with the stop token when one was sampled
    logprobs: list[float]               # log pi_sampler(token): tempered + truncated distribution (see the top)
    finish_reason: str                  # "stop" (a stop token was sampled) or "length" (max_new_tokens reached)
    raw_logprobs: Optional[list[float]] = None  # model log-softmax at temperature 1, untruncated (raw_logprobs=True)
    mask: Optional[list[int]] = None    # multi-turn: 1 on the tokens the policy sampled, 0 on the environment's
    turns: int = 1                      # assistant turns in the completion

    def policy(self, values):
        """Per-token values (tokens, logprobs, ...) at the tokens the policy sampled: what a loss trains on."""
        return list(values) if self.mask is None else [v for v, m in zip(values, self.mask) if m]


# ----------------------------------------------------------------------------------------------------------------
# One sampling step


def sampling_logprobs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0):
    """
    The log-probabilities [B, V] (fp32) of the distribution the sampler draws from: logits / temperature, keep the
    top_k largest (0 = all; ties with the k-th are kept), then the smallest set of most likely tokens whose mass
    reaches top_p, renormalised. Removed tokens get -inf. temperature must be > 0 (greedy is handled by the caller).
    """
    logits = logits.float() / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs          # mass of the tokens ranked above this one
        drop = mass_before >= top_p
        drop[:, 0] = False                                   # the most likely token always stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits.log_softmax(dim=-1)


def is_greedy(temperature, top_k):
    return temperature == 0 or top_k == 1


def sample_tokens(logits: torch.Tensor, temperature=1.0, top_p=1.0, top_k=0, generator=None, raw=False,
                  noise=None):
    """
    One token per row from logits [B, V]. Returns (tokens [B] int64, logprobs [B] fp32 under the sampling
    distribution, raw logprobs [B] fp32 under the plain model distribution or None). noise: the Exp(1) draws
    [B, V] to use (generate draws them per completion); None draws them here from `generator`.
    """
    raw_lp = None
    if raw:
        raw_all = logits.float().log_softmax(dim=-1)
    if is_greedy(temperature, top_k):                        # greedy: a point mass, log-prob 0
        tokens = logits.argmax(dim=-1)
        logprobs = torch.zeros(tokens.shape, dtype=torch.float32, device=logits.device)
    else:
        logp = sampling_logprobs(logits, temperature, top_p, top_k)
        # Exponential-race sampling: argmax p_i / E_i with E_i ~ Exp(1) picks i with probability p_i (the Gumbel-max
        # trick in another guise). Unlike torch.multinomial it can never return a zero-probability token.
        if noise is None:
            noise = torch.empty_like(logp).exponential_(generator=generator)
        tokens = (logp.exp() / noise).argmax(dim=-1)
        logprobs = logp.gather(-1, tokens[:, None]).squeeze(-1)
    if raw:
        raw_lp = raw_all.gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs, raw_lp


# ----------------------------------------------------------------------------------------------------------------
# The model that trains: gather FSDP2 shards once for a whole rollout phase

_GATHERED: dict = {}          # id(FSDP-sharded model) -> its gathered plain copy, while sampling_weights is open


@contextlib.contextmanager
def sampling_weights(model: Model):
    """
    with sampling_weights(model): generate(model, ...) ...

    On an FSDP2-sharded model, all-gathers every parameter once, in the dtype the training forward computes in
    (the mixed-precision param_dtype of the FSDP module that owns it), into a plain, hook-free Model that
    `generate` then runs instead of `model`, for every call inside the block. FSDP's own state is never touched
    (no unshard(), no lazy init, no hooks: the cache is never an argument FSDP could cast or copy), so the next
    training step runs exactly as it would have without the block. The copy costs one unsharded model in the
    compute dtype (what FSDP's own unshard would hold); it is freed on exit. Every process must enter the block
    (the gather is a collective). On a plain model: a no-op. Yields the model generate will run.
    """
    if id(model) in _GATHERED or not _is_sharded(model):          # re-entered, or nothing to gather
        yield _GATHERED.get(id(model), model)
        return
    _GATHERED[id(model)] = gathered = _gather_plain_copy(model)
    try:
        yield gathered
    finally:
        del _GATHERED[id(model)]


def _is_sharded(model):
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


@torch.inference_mode(False)       # generate may call it from inside inference mode; DTensor ops refuse that
@torch.no_grad()
def _gather_plain_copy(model):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    # param_dtype of each FSDP module's policy (None = the parameter's own dtype); a parameter belongs to the
    # innermost FSDP module above it, as in fully_shard's grouping.
    policy = {name: m._get_fsdp_state()._mp_policy.param_dtype for name, m in model.named_modules()
              if isinstance(m, FSDPModule)}
    with torch.device("meta"):
        plain = Model(model.config)
    tensors = {}
    for name, p in model.named_parameters():
        owner = max((m for m in policy if m == "" or name.startswith(m + ".")), key=len, default=None)
        dtype = policy.get(owner) or p.dtype
        p = p.detach().to(dtype)                                   # cast before gathering, as FSDP does
        full = p.full_tensor() if isinstance(p, DTensor) else p.clone()
        layout = plain.get_parameter(name).stride()
        if full.stride() != layout:          # model.Experts are stored transposed (FSDP2 holds them contiguous)
            full = torch.empty_strided(full.shape, layout, dtype=full.dtype, device=full.device).copy_(full)
        tensors[name] = full
    tensors.update(model.named_buffers())
    plain.load_state_dict(tensors, assign=True)
    return plain.requires_grad_(False).eval()


# ----------------------------------------------------------------------------------------------------------------
# generate


def _last_logits(model: Model, input_ids, attention_mask=None, cache=None):
    """Logits [B, V] of the last position only (lm_head on one position, not T)."""
    h = model.hidden_states(input_ids, attention_mask=attention_mask, cache=cache)
    return model.lm_head(h[:, -1])


@torch.inference_mode()
def generate(model: Model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, n: int = 1, stop_token_ids=None, seed: Optional[int] = None, *,
             raw_logprobs: bool = False, prefill_chunk: int = 4096,
             on_step: Optional[Callable[[list[int], list[int]], None]] = None, reference: bool = False,
             static_shapes: bool = False, cuda_graph: bool = False, check_every: int = 8,
             progress: bool = False) -> list[Completion]:
    """
    Sample n completions for each prompt (a list of token-id lists of any lengths, each non-empty).

    Returns len(prompts) * n Completions, grouped by prompt: completion j of prompt i is at index i * n + j.
    temperature 0 is greedy. top_k 0 and top_p 1 disable those filters. stop_token_ids None = the model config's
    eos; an empty collection = no stop token (every row runs max_new_tokens). A row ends at its first stop token,
    which is kept as its last token (finish_reason "stop"); otherwise it ends after max_new_tokens ("length").
    seed: a torch.Generator seeded with it drives all draws, so the same call with the same seed gives the same
    completions (on the same device); None uses torch's global RNG. Each step draws the noise of all
    len(prompts) * n completions at once, so a completion's draws do not depend on which rows share its batch.
    raw_logprobs: also fill Completion.raw_logprobs (see the module docstring for logprobs vs raw_logprobs).
    prefill_chunk: prompts longer than this are prefilled in pieces of this many tokens (0 = in one go), which
    bounds the attention mask and scan temporaries of long prompts; the result is the same up to rounding.
    on_step(indices, tokens): called after every decoding step with the completion indices still running and
    the token each just sampled (the CLI streams with it); finished completions no longer appear. It reads
    the tokens on the host every step, so the decode loop then syncs every step.
    reference: run the plain decode loop (a compacting batch, a host sync per step) instead of the fixed-slot
    one (see _decode_slots); both give the same completions, and the tests hold the fast one to the plain one.
    static_shapes: decode steps attend over the whole cache (masked), so every step has the same shapes;
    cuda_graph: replay each decode step from a CUDA graph captured per batch-size bucket (CUDA only; implies
    static_shapes). check_every: the fixed-slot loop reads the finished mask on the host every this many steps.
    progress: a progress bar over the prefill chunks when a prompt takes more than one (a 156K-token prompt is
    38 chunks of 4096, minutes on a CPU).

    Runs under torch.inference_mode and leaves the model's train/eval mode alone (the model has no dropout).
    On an FSDP2-sharded model, call it inside `with sampling_weights(model):` (every process, same calls), which
    gathers the parameters once for all the calls in the block; outside one, each call gathers them for itself.
    """
    if _is_sharded(model) and id(model) not in _GATHERED:
        with sampling_weights(model):
            return generate(model, prompts, max_new_tokens, temperature, top_p, top_k, n, stop_token_ids, seed,
                            raw_logprobs=raw_logprobs, prefill_chunk=prefill_chunk, on_step=on_step,
                            reference=reference, static_shapes=static_shapes, cuda_graph=cuda_graph,
                            check_every=check_every, progress=progress)
    model = _GATHERED.get(id(model), model)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    prompts = [p.tolist() if isinstance(p, torch.Tensor) else list(p) for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
    if stop_token_ids is None:
        eos = model.config.eos_token_id
        stop_token_ids = [eos] if eos is not None else []
    stop_token_ids = sorted(set(int(t) for t in stop_token_ids))
    N = len(prompts) * n
    if N == 0 or max_new_tokens <= 0:
        return [Completion([], [], "length", [] if raw_logprobs else None) for _ in range(N)]

    device = model.lm_head.weight.device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA model, this one is on {device}")
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    # 1. prefill into one left-padded cache (every row's next token is at position L, so a decode step is one
    # batch), in length buckets (see _prefill); cache row j holds prompt order[j]
    cache, logits, order = _prefill(model, prompts, max_new_tokens - 1,  # the last sampled token is never fed back
                                    static_shapes or cuda_graph, prefill_chunk, progress)

    # 2. group sampling: n copies of each prompt's state. The rows stay in length order (putting them back in
    # prompt order would copy the whole cache): slot j decodes completion slots[j], of prompt order[j // n]
    slots = (torch.tensor(order, device=device)[:, None] * n + torch.arange(n, device=device)).flatten()
    if n > 1:
        copies = torch.arange(len(prompts), device=device).repeat_interleave(n)
        cache.select(copies)
        logits = logits[copies]

    # 3. decode. sample(logits, rows) draws one token for each row, row i being completion rows[i]
    def sample(logits, rows):
        noise = None
        if not is_greedy(temperature, top_k):             # the draws of all N completions, then this batch's rows
            noise = torch.empty(N, logits.shape[-1], device=device).exponential_(generator=generator)[rows]
        return sample_tokens(logits, temperature, top_p, top_k, raw=raw_logprobs, noise=noise)

    stop_t = torch.tensor(stop_token_ids, dtype=torch.long, device=device)
    decode = _decode_reference if reference else _decode_slots
    per_completion = decode(model, cache, logits, sample, slots, max_new_tokens, stop_t, on_step,
                            cuda_graph=cuda_graph, check_every=check_every)

    stop_set = set(stop_token_ids)
    return [Completion(tokens=toks, logprobs=lps, finish_reason="stop" if toks and toks[-1] in stop_set else "length",
                       raw_logprobs=raws) for toks, lps, raws in per_completion]


def _prefill(model, prompts, room, static_shapes=False, prefill_chunk=4096, progress=False):
    """
    Prefill ragged prompts into one left-padded cache with `room` positions after the longest: every row's next
    token is at position L, the longest prompt's length, so a decode step is one batch. A bucket of similar
    lengths at a time: bucket b (its longest prompt L_b tokens) is run alone into the cache's window of its rows
    and positions [L - L_b, L), so a short prompt pays for padding up to its bucket's longest, not to the batch's
    (16 prompts of 32-128 tokens, 1440 real: 1594 computed, not 1904). Within a bucket the pad id is irrelevant
    (the attention mask keeps padding out of every row's state). Returns (cache, last logits [B, V] in cache
    row order, order: cache row j holds prompts[order[j]], longest first).
    """
    device = model.lm_head.weight.device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    lengths = [len(prompts[i]) for i in order]
    L = lengths[0]
    cache = model.new_cache(len(prompts), L + room, static_shapes=static_shapes)
    buckets = _length_buckets(lengths)
    chunk = prefill_chunk if prefill_chunk > 0 else L
    n_pieces = sum(-(-lengths[rows.start] // chunk) for rows in buckets)
    bar = tqdm(total=n_pieces, desc=f"prefill {sum(lengths)} tokens", unit="chunk", file=sys.stderr,
               leave=False, disable=not progress or n_pieces == len(buckets))
    last = []
    for rows in buckets:
        Lb = lengths[rows.start]
        ids, mask = _left_pad([prompts[i] for i in order[rows]])
        ids, mask, window = ids.to(device), mask.to(device), cache.window(rows, L - Lb)
        for start in range(0, Lb, chunk):
            piece = mask[:, start:start + chunk]
            logits = _last_logits(model, ids[:, start:start + chunk], cache=window,
                                  attention_mask=None if bool(piece.all()) else piece)
            bar.update()
        last.append(logits)
    bar.close()
    cache.advance(L)
    return cache, torch.cat(last), order


def _left_pad(seqs):
    """Token lists -> (ids, mask) [len(seqs), longest] int64 on the CPU: each row right-aligned, mask 1 on its
    tokens (the pad id 0 is irrelevant: the mask keeps padding out of every row's state)."""
    L = max(len(x) for x in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, L - len(x):], mask[r, L - len(x):] = torch.tensor(x, dtype=torch.long), 1
    return ids, mask


def _length_buckets(lengths, ratio=0.75):
    """Slices of `lengths` (sorted longest first), each a bucket prefilled as one batch: a bucket takes every next
    prompt at least ratio times as long as its first, so each row is less than 1 - ratio padding; the number of
    buckets (one forward each) grows as log(longest / shortest)."""
    buckets, first = [], 0
    for j in range(1, len(lengths) + 1):
        if j == len(lengths) or lengths[j] < ratio * lengths[first]:
            buckets.append(slice(first, j))
            first = j
    return buckets


def _decode_reference(model, cache, logits, sample, slots, steps, stop_t, on_step, **_):
    """
    The plain decode loop: `live` holds the completion index of each row of the batch (at first `slots`, the
    completion of each cache row); a row that samples a stop token leaves the batch at once (cache.select copies
    the others' caches), so the batch shrinks; one host sync per step. Each step's (index, token, logprob, raw)
    records go to the host every 64 steps.
    Returns [(tokens, logprobs, raw logprobs or None)] per completion.
    """
    live, N = slots, len(slots)
    records, pending = [], []
    for step in range(steps):
        tokens, logprobs, raw = sample(logits, live)
        pending.append((live, tokens, logprobs, raw))
        if len(pending) == 64:
            records.append(_to_host(pending))
            pending = []
        if on_step is not None:
            on_step(live.tolist(), tokens.tolist())
        if step == steps - 1:
            break
        if stop_t.numel():
            stopped = torch.isin(tokens, stop_t)
            if bool(stopped.any()):                        # compact: finished rows leave the batch
                keep = (~stopped).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                cache.select(keep)
                live, tokens = live[keep], tokens[keep]
        logits = _last_logits(model, tokens[:, None], cache=cache)
    if pending:
        records.append(_to_host(pending))
    # a stable sort by completion index keeps each completion's tokens in step order
    index, tokens, logprobs, raw = (torch.cat(parts) if parts[0] is not None else None for parts in zip(*records))
    order = index.argsort(stable=True)
    counts = torch.bincount(index, minlength=N).tolist()
    tokens, logprobs = tokens[order].split(counts), logprobs[order].split(counts)
    raw = raw[order].split(counts) if raw is not None else [None] * N
    return [(t.tolist(), lp.tolist(), r.tolist() if r is not None else None)
            for t, lp, r in zip(tokens, logprobs, raw)]


def _to_host(steps):
    """[(index, token, logprob, raw or None) per step] -> the same four, concatenated over steps, on the CPU."""
    return tuple(torch.cat(parts).cpu() if parts[0] is not None else None for parts in zip(*steps))


def _decode_slots(model, cache, logits, sample, slots, steps, stop_t, on_step, cuda_graph=False, check_every=8):
    """
    The decode loop built for throughput. Every completion has a fixed batch slot (slot j, the cache's row j,
    decodes completion slots[j]); tokens and log-probs go into preallocated [N, steps] tensors on the device, and
    a finished-mask marks the slots whose completion sampled a stop token. Nothing in a step reads the device
    from the host: the mask is read once every `check_every` steps, to end early when every slot is finished
    and to compact when at most half the slots are live (cache.select: at most log2(N) times, so its copies cost
    less than one copy of the whole cache in all). A finished slot left in the batch keeps decoding tokens no
    one reads (at most check_every steps, and at most as many slots as live ones). With a static-shape cache,
    every step runs the same kernels on the same shapes, and slots are compacted to power-of-two buckets, each
    of which gets its own CUDA graph (cuda_graph=True). Returns [(tokens, logprobs, raw logprobs or None)] per
    completion.
    """
    device, N = logits.device, len(slots)
    out_tokens = torch.zeros(N, steps, dtype=torch.long, device=device)
    out_logprobs = torch.zeros(N, steps, device=device)
    out_raw = None
    rows = slots                                          # the completion in each slot
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    step_fn = _CudaGraphStep(model, cache) if cuda_graph else _EagerStep(model, cache)
    ran = 0
    for step in range(steps):
        tokens, logprobs, raw = sample(logits, rows)
        out_tokens[rows, step], out_logprobs[rows, step] = tokens, logprobs
        if raw is not None:
            if out_raw is None:
                out_raw = torch.zeros(N, steps, device=device)
            out_raw[rows, step] = raw
        if on_step is not None:                                 # the CLI's streaming: a host sync per step
            running = (~finished).nonzero().squeeze(1)
            on_step(rows[running].tolist(), tokens[running].tolist())
        if stop_t.numel():
            finished = finished | torch.isin(tokens, stop_t)
        ran = step + 1
        if step == steps - 1:
            break
        if stop_t.numel() and ran % check_every == 0:
            live = (~finished).nonzero().squeeze(1)             # the loop's one host sync
            if live.numel() == 0:
                break
            if live.numel() <= finished.numel() // 2:
                if cache.static_shapes:                         # pad to a power-of-two bucket with finished slots
                    bucket = 1 << (live.numel() - 1).bit_length()
                    live = torch.cat([live, finished.nonzero().squeeze(1)[:bucket - live.numel()]])
                cache.select(live)
                rows, tokens, finished = rows[live], tokens[live], finished[live]
                step_fn = _CudaGraphStep(model, cache) if cuda_graph else step_fn
        logits = step_fn(tokens)

    # each completion ends at its first stop token (tokens after it, from a finished slot, are dropped)
    out_tokens, out_logprobs = out_tokens[:, :ran].cpu(), out_logprobs[:, :ran].cpu()
    out_raw = out_raw[:, :ran].cpu() if out_raw is not None else None
    lengths = [ran] * N
    if stop_t.numel():
        is_stop = torch.isin(out_tokens, stop_t.cpu())
        first = is_stop.int().argmax(dim=1)
        lengths = torch.where(is_stop.any(dim=1), first + 1, ran).tolist()
    return [(out_tokens[i, :k].tolist(), out_logprobs[i, :k].tolist(),
             out_raw[i, :k].tolist() if out_raw is not None else None) for i, k in enumerate(lengths)]


class _EagerStep:
    """One decode step, run as plain PyTorch: tokens [B] -> next-token logits [B, V]."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache

    def __call__(self, tokens):
        return _last_logits(self.model, tokens[:, None], cache=self.cache)


class _CudaGraphStep(_EagerStep):
    """
    The same decode step, replayed from a CUDA graph captured for this cache (one batch size, static shapes).
    The first call runs eagerly (it warms up the kernels: cuBLAS handles, Triton autotuning), the second
    captures the step and replays it, later calls only replay. The captured step reads its tokens from a fixed
    input buffer and moves the cache's device position (pos_t) itself; the host's pos is kept in step here.
    """

    def __init__(self, model, cache):
        super().__init__(model, cache)
        self.graph, self.warm, self.tokens, self.logits = None, False, None, None

    def __call__(self, tokens):
        if not self.warm:
            self.warm = True
            return super().__call__(tokens)
        if self.cache.pos + 1 > self.cache.max_len:
            raise ValueError(f"cache holds {self.cache.max_len} positions, all used")
        if self.graph is None:
            self.tokens, self.graph = tokens.clone(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):                   # records kernels; runs none of them
                self.logits = super().__call__(self.tokens)
            self.cache.pos -= 1                                  # capture ran the host side of a step: undo it
        self.tokens.copy_(tokens)
        self.graph.replay()
        self.cache.pos += 1
        return self.logits.clone()                               # the buffer is overwritten by the next replay


# ----------------------------------------------------------------------------------------------------------------
# Multi-turn episodes: the policy's turns and the environment's replies in one cache


@torch.inference_mode()
def generate_episodes(model: Model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                      respond: Callable[[list[int], list[list[int]]], list], n: int = 1, max_turns: int = 4,
                      max_tokens: int = 1024, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                      stop_token_ids=None, seed: Optional[int] = None, *, raw_logprobs: bool = False,
                      prefill_chunk: int = 4096, check_every: int = 8) -> list[Completion]:
    """
    n multi-turn episodes per prompt, all of them batched turn by turn: sample one assistant turn per live
    episode (at most max_new_tokens, ending at a stop token), hand the finished turns to `respond`, append each
    reply to its episode's cache, and go on. The caches carry over between turns: a turn costs the prefill of
    the reply's tokens, not of the whole history.

    respond(episodes, turns) -> replies: called after every turn with the indices (into the returned list) of
    the episodes whose turn ended on a stop token and each turn's tokens (the stop token last); returns, for
    each, the reply's token ids to append after that stop token (the environment's turn and the next generation
    prompt), or None when the episode is over. An episode ends "stop" when respond returns None, and "length"
    when a turn runs out of max_new_tokens, when it would need a turn after max_turns, or when its tokens after
    the prompt would pass max_tokens (an unfinished episode: the caller scores it 0).

    Returns len(prompts) * n Completions grouped by prompt, as generate: tokens are every token after the prompt
    (turns and replies, in order); mask is 1 on the turns' tokens, 0 on the replies'; logprobs (and
    raw_logprobs) are 0 on reply tokens. Sampling and seeding are generate's; with the same seed an episode's
    draws do not depend on which other episodes share its batch.

    How the cache continues: all rows share one write position. Within a turn, a row that has stopped is
    frozen (its decode steps are padding: model.hidden_states leaves its state alone), and every check_every
    steps, when at most half the rows are live, the stopped rows' caches are parked (copied out) and the batch
    shrinks, as generate's does. After the turn, the rows of the episodes that go on are gathered from the
    parts into one cache, and their replies, left-padded to the longest, are prefilled at the shared position.
    The rows' gaps are masked positions, harmless because NemotronH's attention has no positional encoding.
    """
    if _is_sharded(model) and id(model) not in _GATHERED:
        with sampling_weights(model):
            return generate_episodes(model, prompts, max_new_tokens, respond, n, max_turns, max_tokens,
                                     temperature, top_p, top_k, stop_token_ids, seed, raw_logprobs=raw_logprobs,
                                     prefill_chunk=prefill_chunk, check_every=check_every)
    model = _GATHERED.get(id(model), model)
    if n < 1 or max_turns < 1 or max_new_tokens < 1:
        raise ValueError(f"n, max_turns and max_new_tokens must be >= 1, got {n}, {max_turns}, {max_new_tokens}")
    prompts = [p.tolist() if isinstance(p, torch.Tensor) else list(p) for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("an empty prompt: a prompt needs at least one token")
    if stop_token_ids is None:
        stop_token_ids = [model.config.eos_token_id]
    stop_t = torch.tensor(sorted(set(int(t) for t in stop_token_ids)), dtype=torch.long)
    if not stop_t.numel():
        raise ValueError("episodes need a stop token: a turn ends at one")
    N = len(prompts) * n
    if N == 0:
        return []
    device = model.lm_head.weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop_d = stop_t.to(device)

    cache, logits, order = _prefill(model, prompts, max_new_tokens, prefill_chunk=prefill_chunk)
    episode = (torch.tensor(order)[:, None] * n + torch.arange(n)).flatten()     # the episode of each cache row
    if n > 1:
        copies = torch.arange(len(prompts), device=device).repeat_interleave(n)
        cache.select(copies)
        logits = logits[copies]
    tokens = [[] for _ in range(N)]
    logprobs = [[] for _ in range(N)]
    raws = [[] for _ in range(N)] if raw_logprobs else None
    masks = [[] for _ in range(N)]
    turns, finish = [0] * N, ["length"] * N

    for turn in range(max_turns):
        B = len(episode)
        cache.extend(cache.pos + max_new_tokens)
        out_t = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
        out_lp = torch.zeros(B, max_new_tokens, device=device)
        out_raw = torch.zeros(B, max_new_tokens, device=device) if raw_logprobs else None
        parts, at = [], torch.arange(B, device=device)       # at: the turn row (of out_t) of each cache row
        live = torch.ones(B, dtype=torch.bool, device=device)
        ran = 0
        for step in range(max_new_tokens):
            noise = None
            if not is_greedy(temperature, top_k):              # every episode's draws, then this batch's rows
                rows = episode.to(device)[at]
                noise = torch.empty(N, logits.shape[-1], device=device).exponential_(generator=generator)[rows]
            tok, lp, raw = sample_tokens(logits, temperature, top_p, top_k, raw=raw_logprobs, noise=noise)
            out_t[at, step], out_lp[at, step] = tok, lp
            if raw is not None:
                out_raw[at, step] = raw
            live = live & ~torch.isin(tok, stop_d)
            ran = step + 1
            if step == max_new_tokens - 1:
                break
            if ran % check_every == 0:
                going = live.nonzero().squeeze(1)                          # the loop's one host sync
                if going.numel() == 0:
                    break
                if going.numel() <= live.numel() // 2:  # park the stopped rows' caches until the turn ends
                    parked = (~live).nonzero().squeeze(1)
                    parts.append((cache.take(parked), at[parked]))
                    cache.select(going)
                    at, tok, live = at[going], tok[going], live[going]
            # a row that has stopped feeds padding: its state stays its history (no host sync here)
            logits = _last_logits(model, tok[:, None], attention_mask=live[:, None], cache=cache)
        parts.append((cache, at))

        out_t, out_lp = out_t[:, :ran].cpu(), out_lp[:, :ran].cpu()
        out_raw = out_raw[:, :ran].cpu() if out_raw is not None else None
        is_stop = torch.isin(out_t, stop_t)
        stopped = is_stop.any(dim=1)
        length = torch.where(stopped, is_stop.int().argmax(dim=1) + 1, ran).tolist()
        for r, e in enumerate(episode.tolist()):
            k = length[r]
            tokens[e] += out_t[r, :k].tolist()
            logprobs[e] += out_lp[r, :k].tolist()
            if raws is not None:
                raws[e] += out_raw[r, :k].tolist()
            masks[e] += [1] * k
            turns[e] += 1
        asked = [r for r in range(B) if stopped[r] and len(tokens[int(episode[r])]) <= max_tokens]
        replies = respond([int(episode[r]) for r in asked], [out_t[r, :length[r]].tolist() for r in asked]) \
            if asked else []
        reply_of = {}
        for r, reply in zip(asked, replies):
            e = int(episode[r])
            if reply is None:
                finish[e] = "stop"
            elif turn + 1 < max_turns and len(tokens[e]) + len(reply) < max_tokens:
                tokens[e] += reply
                logprobs[e] += [0.0] * len(reply)
                if raws is not None:
                    raws[e] += [0.0] * len(reply)
                masks[e] += [0] * len(reply)
                reply_of[r] = [tokens[e][len(tokens[e]) - len(reply) - 1]] + list(reply)  # the stop token, fed now
        if not reply_of:
            break
        # the episodes that go on, from every part of the turn, in one cache; their replies, left-padded,
        # prefilled at the shared position
        kept = []
        for part, rows in parts:
            sel = [j for j, r in enumerate(rows.tolist()) if r in reply_of]
            if sel:
                kept.append((part.select(torch.tensor(sel, device=device)) if len(sel) < len(rows) else part,
                             [rows[j].item() for j in sel]))
        cache = InferenceCache.concat([part for part, _ in kept]) if len(kept) > 1 else kept[0][0]
        order_rows = [r for _, rows in kept for r in rows]
        episode = episode[order_rows]
        ids, pad = _left_pad([reply_of[r] for r in order_rows])
        cache.extend(cache.pos + ids.shape[1] + max_new_tokens)
        logits = _last_logits(model, ids.to(device), attention_mask=pad.to(device), cache=cache)

    # an episode's tokens past max_tokens (its last turn ran over) are cut, and it ends "length"
    out = []
    for e in range(N):
        if len(tokens[e]) > max_tokens:
            finish[e] = "length"
        k = min(len(tokens[e]), max_tokens)
        out.append(Completion(tokens[e][:k], logprobs[e][:k], finish[e], raws[e][:k] if raws is not None else None,
                              mask=masks[e][:k], turns=turns[e]))
    return out


@dataclass
class Episodes:
    """What run_episodes returns: one entry per episode, grouped by prompt (episode j of prompt i at i * n + j)."""
    completions: list[Completion]
    rewards: list[float]            # the environment's final reward; 0 for an episode that ran out of its budget
    outcomes: list[str]             # "done" (the environment ended it), "turns" or "tokens" (out of budget: 0)


def run_episodes(model: Model, tokenizer, examples: list[dict], prompts: list[list[int]], max_new_tokens: int,
                 n: int = 1, max_turns: int = 0, max_tokens: int = 1024, thinking: bool = True, workers: int = 0,
                 **sampling) -> Episodes:
    """
    Roll out n episodes of each example of a multi-turn domain (tasks.ENVIRONMENTS) with generate_episodes: one
    environment per episode (tasks.make_env), stepped with each assistant turn's text (the template's opener
    and the sampled tokens, as response_text gives it); its tool observations come back as encode_reply ids.
    prompts: the examples' encode_prompts ids (the environments' reset() messages). max_turns: 0 = each
    environment's own max_turns. The environments of a turn are stepped in parallel threads (the repair domain
    runs its tests in sandbox processes). sampling: generate_episodes' keyword arguments (temperature, seed...).
    """
    import tasks
    from tokenizer import encode_reply
    envs = [tasks.make_env(ex) for ex in examples for _ in range(n)]
    for env in envs:
        env.reset()
    limit = [max_turns or env.max_turns for env in envs]
    rewards, outcomes, taken = [0.0] * len(envs), ["tokens"] * len(envs), [0] * len(envs)
    def respond(episodes, turns):
        texts = [turn_text(tokenizer, t[:-1], thinking) for t in turns]         # the stop token dropped
        with ThreadPoolExecutor(max_workers=workers or min(2 * (os.cpu_count() or 1), 64)) as pool:
            steps = list(pool.map(lambda et: envs[et[0]].step(et[1]), zip(episodes, texts)))
        replies = []
        for e, (observations, done, reward) in zip(episodes, steps):
            taken[e] += 1
            if done:
                rewards[e], outcomes[e] = float(reward), "done"
                replies.append(None)
            elif taken[e] >= limit[e]:                                    # no turn left: unfinished, 0
                outcomes[e] = "turns"
                replies.append(None)
            else:
                replies.append(encode_reply(tokenizer, observations, thinking))
        return replies

    completions = generate_episodes(model, prompts, max_new_tokens, respond, n=n, max_turns=max(limit, default=1),
                                    max_tokens=max_tokens, stop_token_ids=tokenizer.stop_token_ids, **sampling)
    for e, c in enumerate(completions):
        if c.finish_reason != "stop" or outcomes[e] != "done":                # cut by a budget: reward 0
            rewards[e] = 0.0
            if outcomes[e] == "done":
                outcomes[e] = "tokens"
    return Episodes(completions, rewards, outcomes)


def sample_groups(model: Model, tokenizer, examples: list[dict], prompts: list[list[int]], n: int,
                  max_new_tokens: int, per_call: int, seed_of_call: Callable[[int], int], *, max_turns: int = 0,
                  max_episode_tokens: int = 1024, thinking: bool = True, **sampling):
    """
    n rollouts of each prompt, what RL and MOPD train on, with the raw log-probs: a single-turn example's are
    completions of generate, a multi-turn example's are episodes of run_episodes (their environments score
    them as they play). per_call: prompts per generate call (0 = all at once; bounds the cache memory);
    call c is seeded seed_of_call(c), single-turn calls first. Returns (completions, rewards, outcomes), the
    first two grouped by prompt (rollout j of prompt i at i * n + j): rewards hold the environments' rewards
    and None where a verifier is still to grade the completion (single-turn); outcomes counts how episodes
    ended (run_episodes' outcomes).
    """
    import tasks
    single = [j for j, ex in enumerate(examples) if ex["domain"] not in tasks.ENVIRONMENTS]
    multi = [j for j, ex in enumerate(examples) if ex["domain"] in tasks.ENVIRONMENTS]
    per_call = per_call or max(len(prompts), 1)
    outs, rewards, outcomes = [None] * (len(prompts) * n), [None] * (len(prompts) * n), collections.Counter()
    calls = [(single, s) for s in range(0, len(single), per_call)] + \
            [(multi, s) for s in range(0, len(multi), per_call)]
    with sampling_weights(model):                           # the weights are gathered once for all the calls
        for c, (part, start) in enumerate(calls):
            js = part[start:start + per_call]
            kw = dict(sampling, n=n, raw_logprobs=True, seed=seed_of_call(c))
            if part is multi:
                played = run_episodes(model, tokenizer, [examples[j] for j in js], [prompts[j] for j in js],
                                      max_new_tokens, max_turns=max_turns, max_tokens=max_episode_tokens,
                                      thinking=thinking, **kw)
                got = played.completions
                outcomes.update(played.outcomes)
                for k, j in enumerate(js):
                    rewards[j * n:(j + 1) * n] = played.rewards[k * n:(k + 1) * n]
            else:
                got = generate(model, [prompts[j] for j in js], max_new_tokens,
                               stop_token_ids=tokenizer.stop_token_ids, **kw)
            for k, j in enumerate(js):
                outs[j * n:(j + 1) * n] = got[k * n:(k + 1) * n]
    return outs, rewards, outcomes


# ----------------------------------------------------------------------------------------------------------------
# evaluate


def response_text(tokenizer, completion: Completion, thinking: bool = True) -> str:
    """The assistant turn as text for the verifiers: the template's opener (`<think>\\n` or `<think></think>`) plus
    the sampled tokens, decoded with special tokens kept (the think tags are special), the stop token dropped.
    With the opener in front the text says by itself whether it is a thinking response."""
    return turn_text(tokenizer, completion.tokens[:-1] if completion.finish_reason == "stop" else completion.tokens,
                     thinking)


def turn_text(tokenizer, tokens, thinking: bool = True) -> str:
    """The template's opener and the decoded tokens (no stop token): an assistant turn as the verifiers and the
    environments read it."""
    return ("<think>\n" if thinking else "<think></think>") + tokenizer.decode(tokens)


def encode_prompts(tokenizer, examples: list[dict], thinking: bool, context: int, max_new_tokens: int,
                   long_prompt: str = "refuse", source: str = "the eval set",
                   hint: str = "shorten it or lower the generation budget") -> list[list[int]]:
    """Each example's prompt ids (chat template with its tools, generation prompt, thinking or not), every one
    fitted to the model's context with the generation budget (fit_context) before anything is generated: a long
    one is refused, naming it, or cut with a warning. Stages call this up front, before a model loads."""
    import tasks
    from tokenizer import encode_prompt
    return [fit_context(encode_prompt(tokenizer, tasks.prompt_messages(ex), tools=ex.get("tools"), thinking=thinking),
                        context, max_new_tokens, long_prompt, f"{source}: example {i} ({ex['domain']})'s prompt", hint)
            for i, ex in enumerate(examples)]


def evaluate(model: Model, tokenizer, examples: list[dict], n: int = 1, max_new_tokens: int = 1024,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, thinking: bool = True,
             batch_size: int = 32, seed: Optional[int] = 0, progress: bool = False, return_responses: bool = False,
             prompts: Optional[list[list[int]]] = None, max_episode_tokens: int = 1024, **score_kwargs) -> dict:
    """
    Held-out scores of a model: render each example's prompt with the chat template (generation prompt,
    thinking or not), sample n responses per example (batch_size prompts per generate call, prompts sorted by
    length so a batch pads little), and grade them with tasks.score_responses (extra keyword arguments go to
    it). An example of a multi-turn domain (tasks.ENVIRONMENTS) is played as n episodes instead (run_episodes:
    max_new_tokens per turn, max_episode_tokens in all), scored by its environment. Returns the per-domain
    pass@1 / avg@n ... of tasks.summarise_rewards, plus "generation": the share of responses cut off at their
    budget, their mean length (policy tokens) and the sampling settings (and "responses", the texts per
    example, with return_responses=True: for an episode, its whole text after the prompt). The stage scripts
    import this for their held-out evaluations; `python sample.py --ckpt DIR --eval FILE` is its command line.
    prompts: the examples' encode_prompts ids, if already made; otherwise they are made here, and one longer
    than the model's context is refused before anything is generated.
    """
    import tasks

    if prompts is None:
        prompts = encode_prompts(tokenizer, examples, thinking, model.config.max_position_embeddings, max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses: list[list[str]] = [[] for _ in examples]
    rewards: list[list[float]] = [[] for _ in examples]
    n_tokens, n_cut = 0, 0
    t0 = time.perf_counter()
    single = [i for i in order if examples[i]["domain"] not in tasks.ENVIRONMENTS]
    multi = [i for i in order if examples[i]["domain"] in tasks.ENVIRONMENTS]
    for part, start in [(single, s) for s in range(0, len(single), batch_size)] + \
                       [(multi, s) for s in range(0, len(multi), batch_size)]:
        batch = part[start:start + batch_size]
        call_seed = None if seed is None else seed + start + (len(single) if part is multi else 0)
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=call_seed)
        if part is multi:
            played = run_episodes(model, tokenizer, [examples[i] for i in batch], [prompts[i] for i in batch],
                                  max_new_tokens, n=n, max_tokens=max_episode_tokens, thinking=thinking, **sampling)
            outs = played.completions
        else:
            outs = generate(model, [prompts[i] for i in batch], max_new_tokens, n=n,
                            stop_token_ids=tokenizer.stop_token_ids, **sampling)
        for k, i in enumerate(batch):
            group = outs[k * n:(k + 1) * n]
            responses[i] = [response_text(tokenizer, c, thinking) for c in group]
            if part is multi:
                rewards[i] = played.rewards[k * n:(k + 1) * n]
            n_tokens += sum(len(c.policy(c.tokens)) for c in group)
            n_cut += sum(c.finish_reason == "length" for c in group)
        if progress:
            done = len(single) if part is multi else 0
            done += min(start + batch_size, len(part))
            print(f"\r  generated {done}/{len(order)} prompts x {n} ({n_tokens / (time.perf_counter() - t0):,.0f} "
                  f"tokens/s)", end="" if done < len(order) else "\n", file=sys.stderr, flush=True)
    graded = tasks.score_responses([examples[i] for i in single], [responses[i] for i in single], **score_kwargs)
    for i, rs in zip(single, graded["rewards"]):
        rewards[i] = rs
    result = dict(tasks.summarise_rewards(examples, rewards))
    total = max(len(examples) * n, 1)
    result["generation"] = dict(n=n, temperature=temperature, top_p=top_p, top_k=top_k, thinking=thinking,
                                max_new_tokens=max_new_tokens, truncated=n_cut / total,
                                mean_tokens=n_tokens / total, seconds=time.perf_counter() - t0)
    if return_responses:
        result["responses"] = responses
    return result


def prompt_pools(examples, domains, tokenizer, thinking, max_new_tokens, context, source):
    """
    Per domain, its examples and their chat-template prompt ids (generation prompt, thinking or not). Named errors
    for a domain with no prompts in `source` and for a prompt that does not fit the model's context with the
    generation budget. The ids are int32 arrays (4 bytes a token, where a list holds a 36-byte Python int per
    token): take .tolist() of the ones drawn.
    """
    pools, prompt_ids = [], []
    for dom in domains:
        pool = [ex for ex in examples if ex["domain"] == dom]
        if not pool:
            raise options.ConfigError(f"{source} has no prompts of domain {dom!r}")
        prompt_ids.append([np.asarray(ids, dtype=np.int32) for ids in
                           encode_prompts(tokenizer, pool, thinking, context, max_new_tokens,
                                                 source=f"{source}, domain {dom!r}",
                                                 hint="shorten it or lower max_new_tokens")])
        pools.append(pool)
    return pools, prompt_ids


def evaluate_domains(model, tokenizer, examples, d: common.Dist, max_new_tokens, thinking=True, batch_size=64,
                     max_episode_tokens=1024):
    """
    Greedy pass@1 per domain ({domain: fraction}) of the model on held-out examples (a multi-turn domain's: one
    greedy episode, max_new_tokens per turn, max_episode_tokens in all). Every process generates
    and grades its share (examples[rank::world]); the per-example rewards are gathered. Works on the sharded
    model that trains: the weights are gathered once for the whole evaluation.
    """
    mine = examples[d.rank::d.world_size]
    with sampling_weights(model):
        result = evaluate(model, tokenizer, mine, n=1, max_new_tokens=max_new_tokens, temperature=0.0,
                          thinking=thinking, batch_size=batch_size, seed=0, max_episode_tokens=max_episode_tokens)
    pairs = [(ex["domain"], rs[0]) for ex, rs in zip(mine, result["rewards"])]
    if d.world_size > 1:
        gathered = [None] * d.world_size
        torch.distributed.all_gather_object(gathered, pairs)
        pairs = [p for part in gathered for p in part]
    by_domain = collections.defaultdict(list)
    for domain, r in pairs:
        by_domain[domain].append(r)
    return {domain: sum(rs) / len(rs) for domain, rs in sorted(by_domain.items())}


# ----------------------------------------------------------------------------------------------------------------
# CLI


class _Streamer:
    """
    Prints one completion as it is sampled. Byte-level BPE can split a character across tokens, so the text is
    re-decoded per segment and only the new, complete suffix is printed. In thinking mode the thought (up to
    </think>) is dimmed on a terminal and wrapped in literal <think>...</think> tags elsewhere. Stop tokens are
    not printed.
    """

    DIM, RESET = "\033[2m", "\033[0m"

    def __init__(self, tokenizer, thinking: bool, stop_ids, out=sys.stdout):
        self.tok, self.out, self.stop_ids = tokenizer, out, set(stop_ids)
        self.tty = out.isatty()
        self.think_close = tokenizer.tokenizer.token_to_id("</think>")
        self.in_thought = thinking
        self.segment, self.printed = [], ""
        if thinking:
            self._write(self.DIM if self.tty else "<think>\n")

    def _write(self, s):
        self.out.write(s)
        self.out.flush()

    def _flush(self, final=False):
        text = self.tok.decode(self.segment)
        if text.endswith("\ufffd") and not final:           # half a character: wait for the next token
            return
        self._write(text[len(self.printed):])
        self.printed = text

    def __call__(self, indices, tokens):
        token = tokens[0]
        if token in self.stop_ids:
            return
        if self.in_thought and token == self.think_close:
            self._flush(final=True)
            self._write(self.RESET + "\n" if self.tty else "</think>\n")
            self.in_thought, self.segment, self.printed = False, [], ""
            return
        self.segment.append(token)
        self._flush()

    def end(self):
        self._flush(final=True)
        if self.in_thought and self.tty:
            self._write(self.RESET)
        self._write("\n")


def _pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _pick_dtype(name, device):
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[name]


def _reply(model, tokenizer, messages, args, thinking, seed=None):
    """Stream one assistant turn; return its text (stop token dropped) and the completion."""
    from tokenizer import encode_prompt
    prompt = fit_context(encode_prompt(tokenizer, messages, thinking=thinking), args.context, args.max_new_tokens,
                         args.long_prompt)
    streamer = _Streamer(tokenizer, thinking, tokenizer.stop_token_ids)
    t0 = time.perf_counter()
    c = generate(model, [prompt], args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                 top_k=args.top_k, stop_token_ids=tokenizer.stop_token_ids, seed=seed, on_step=streamer,
                 progress=True)[0]
    streamer.end()
    dt = time.perf_counter() - t0
    print(f"[{len(c.tokens)} tokens, {len(c.tokens) / dt:.1f} tokens/s, finish: {c.finish_reason}]",
          file=sys.stderr, flush=True)
    return response_text(tokenizer, c, thinking), c


class PromptTooLong(options.ConfigError):
    pass


CLI_LONG_PROMPT_HINT = "shorten it, lower --max-new-tokens, or pass --long-prompt cut"


def fit_context(prompt, context, max_new_tokens, long_prompt="refuse", what="the prompt",
                hint=CLI_LONG_PROMPT_HINT):
    """The prompt, if it and max_new_tokens fit the model's context; else refused (PromptTooLong, its message
    ending with `hint`) or, with long_prompt "cut", its oldest tokens dropped with a warning."""
    room = context - max_new_tokens
    if len(prompt) <= room:
        return prompt
    why = (f"{what} has {len(prompt)} tokens; with {max_new_tokens} new tokens the model's context "
           f"of {context} leaves room for {max(room, 0)}")
    if long_prompt == "refuse" or room < 1:
        raise PromptTooLong(f"{why}: {hint}")
    print(f"warning: {why}; cutting its first {len(prompt) - room} tokens", file=sys.stderr, flush=True)
    return prompt[-room:]


def _history_entry(text):
    """An assistant turn for the history. The template drops earlier turns' thinking anyway, so keep the answer;
    if the thought never closed (cut at --max-new-tokens), keep its text without the tag as the answer."""
    from tokenizer import parse_response
    parsed = parse_response(text)
    content = parsed["answer"] if parsed["thinking_closed"] else (parsed["thinking"] or "")
    return {"role": "assistant", "content": content}


def chat(model, tokenizer, args):
    thinking = not args.no_think
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(f"chat ({'thinking' if thinking else 'non-thinking'} mode). /reset clears the history, /exit or "
          f"Ctrl-D quits.", file=sys.stderr)
    if hasattr(sys.stdin, "reconfigure"):       # undecodable bytes arrive as surrogates instead of ending the chat
        sys.stdin.reconfigure(errors="surrogateescape")
    for turn in itertools.count():
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            print("[that line is not valid UTF-8 (check the terminal's encoding); type it again]", file=sys.stderr)
            continue
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            seed = None if args.seed is None else args.seed + turn          # a fresh draw every turn
            text, _ = _reply(model, tokenizer, messages, args, thinking, seed)
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr)
            messages.pop()
            continue
        except PromptTooLong as e:
            print(f"[{e}; /reset clears the history]", file=sys.stderr)
            messages.pop()
            continue
        messages.append(_history_entry(text))


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Chat with, prompt, or evaluate a checkpoint (an HF export dir: config.json, safetensors, "
                    "tokenizer.json).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint directory")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json or HF directory (None = the checkpoint's)")
    ap.add_argument("--prompt", default=None, help="answer this one user message and exit")
    ap.add_argument("--system", default=None, help="system prompt for chat / --prompt")
    ap.add_argument("--no-think", action="store_true", help="non-thinking mode (empty <think></think>)")
    ap.add_argument("--eval", default=None, metavar="FILE.jsonl",
                    help="evaluate on these examples (any file tasks.load_examples reads, or 'tiny' for the shipped "
                         "eval split): per-domain table + JSON")
    ap.add_argument("--n", type=int, default=1, help="samples per eval example (avg@n / pass@n)")
    ap.add_argument("--out", default="scores.json", help="where --eval writes its scores")
    ap.add_argument("--save-responses", action="store_true", help="also write every response into --out")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    ap.add_argument("--batch-size", type=int, default=32, help="eval prompts per generate call")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    ap.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    ap.add_argument("--max-new-tokens", type=int, default=1024, help="tokens per response at most")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (-1 = unseeded)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto = cuda if available, else cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto = bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--long-prompt", default="refuse", choices=["refuse", "cut"],
                    help="a prompt that does not fit the model's context (max_position_embeddings) with "
                         "--max-new-tokens: refuse it, or cut its oldest tokens with a warning")
    args = ap.parse_args(argv)
    if args.seed is not None and args.seed < 0:
        args.seed = None

    # every argument, the checkpoint's config, the eval file and --out are checked before the model loads
    from model import ModelConfig, safetensors_shards
    from tokenizer import load_tokenizer
    for name, value, lowest in (("--n", args.n, 1), ("--limit", args.limit, 1), ("--batch-size", args.batch_size, 1),
                                ("--max-new-tokens", args.max_new_tokens, 1), ("--top-k", args.top_k, 0),
                                ("--temperature", args.temperature, 0)):
        if value is not None and not value >= lowest:
            ap.error(f"{name} {value}: must be >= {lowest}")
    if not 0 < args.top_p <= 1:
        ap.error(f"--top-p {args.top_p}: must be in (0, 1]")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available here")
    if not os.path.isdir(args.ckpt):
        ap.error(f"--ckpt {args.ckpt}: no such directory (an HF export: config.json, safetensors, tokenizer.json)")
    try:
        config = ModelConfig.from_path(args.ckpt)
        safetensors_shards(args.ckpt, check=True)
        if why := options.tokenizer_source(args.tokenizer or args.ckpt):      # the checkpoint's own by default
            raise ValueError(f"--tokenizer {args.tokenizer or args.ckpt}: {why}")
        examples = common.load_eval_examples(args.eval, "--eval", limit=args.limit) if args.eval else None
        if args.eval and args.out and (why := options.writable_file(args.out)):
            raise ValueError(f"--out {args.out}: {why}")
        tokenizer = load_tokenizer(args.tokenizer or args.ckpt)
        args.context = config.max_position_embeddings
        prompts = (encode_prompts(tokenizer, examples, not args.no_think, args.context, args.max_new_tokens,
                                  args.long_prompt, f"--eval {args.eval}", CLI_LONG_PROMPT_HINT)
                   if args.eval else None)
    except (OSError, ValueError) as e:
        ap.error(str(e))

    device = _pick_device(args.device)
    try:
        model = Model.from_pretrained(args.ckpt, dtype=_pick_dtype(args.dtype, device), device=device).eval()
    except (OSError, ValueError) as e:
        ap.error(str(e))
    if tokenizer.vocab_size > model.config.vocab_size:
        print(f"warning: tokenizer has {tokenizer.vocab_size} tokens, the model {model.config.vocab_size}",
              file=sys.stderr)

    if args.eval:
        import tasks
        if args.n > 1 and args.temperature == 0:
            print("warning: --n > 1 with --temperature 0 samples the same response n times", file=sys.stderr)
        result = evaluate(model, tokenizer, examples, n=args.n, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          thinking=not args.no_think, batch_size=args.batch_size, seed=args.seed, progress=True,
                          return_responses=args.save_responses, prompts=prompts)
        print(tasks.format_score_table(result))
        g = result["generation"]
        print(f"{len(examples)} examples x {args.n}: {g['mean_tokens']:.0f} tokens per response, "
              f"{g['truncated']:.1%} cut at --max-new-tokens, {g['seconds']:.1f} s")
        result["ckpt"], result["eval_file"] = os.path.abspath(args.ckpt), os.path.abspath(args.eval)
        if args.out:
            common.write_json_atomic(args.out, result)
            print(f"wrote {args.out}")
        return result
    thinking = not args.no_think
    if args.prompt is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        try:
            _reply(model, tokenizer, messages + [{"role": "user", "content": args.prompt}], args, thinking, args.seed)
        except PromptTooLong as e:
            ap.error(f"--prompt: {e}")
        return None
    chat(model, tokenizer, args)
    return None


if __name__ == "__main__":
    main()
