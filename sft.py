"""
Stage 1 of Nemotron-Cascade 2: supervised fine-tuning.

Chat examples are rendered with the Nemotron chat template, packed into rows of seq_len tokens (documents never
see each other: block-diagonal attention and a fresh Mamba state at each document start), and trained with
next-token loss on the assistant's tokens only. Defaults train the tiny model on the shipped data on CPU (12
minutes on two AVX-512 cores, 30 on AVX2 ones); `configs/sft_nano_30b.json` holds the paper's settings for the
real model.

    python sft.py                                   # tiny default
    torchrun --nproc_per_node=8 sft.py --config configs/sft_nano_30b.json
    python sft.py --help                            # every option with its default

A run writes to out_dir: metrics.jsonl, curves.png, checkpoints/ (sharded, resumable: rerun the same command
and it continues from the latest complete checkpoint), export/ (HF format + tokenizer) and eval.json.
"""
import bisect
import functools
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

import common
import options
import sample
import tasks
from model import Model, ModelConfig
from tokenizer import encode_chat, load_tokenizer


@dataclass
class SFTConfig:
    # model and data
    model: str = "configs/tiny_model.json"  # HF checkpoint dir to fine-tune, or a config.json to train from scratch
    tokenizer: str = "data/tokenizer.json"  # tokenizer.json (or a dir); empty = the checkpoint dir's own
    train_data: str = "data/sft.jsonl"  # SFT examples: JSONL/parquet path or HF dataset (see tasks.load_examples)
    train_split: str = "train"  # split when train_data is an HF dataset
    train_subset: str = ""  # HF dataset config (e.g. math, science, chat for the Nemotron-Cascade-2 SFT data)
    train_mix: str = ""  # weighted mixture "SOURCE:WEIGHT,...": configs of train_data or files; empty = train_data alone
    cache_dir: str = ""  # tokenized + packed rows cached here, memory-mapped (keyed by data, tokenizer, seq_len)
    data_workers: int = 1  # processes tokenizing when the cache is built
    val_fraction: float = 0.02  # share of the examples held out for validation loss
    eval_data: str = "data/eval.jsonl"  # held-out tasks scored per domain at the end; empty = skip
    eval_per_domain: int = 40  # examples per domain for that final score (0 = all)
    eval_max_new_tokens: int = 160  # generation budget of the final score
    thinking: bool = True  # thinking mode of the final eval prompts (training turns render as written either way)
    out_dir: str = "out/sft"  # metrics, checkpoints and the HF export go here
    # batch
    seq_len: int = 512  # tokens per packed row
    micro_batch: int = 8  # rows per process per forward/backward
    global_batch: int = 8  # rows per optimizer step, across processes and accumulation
    epochs: float = 3.0  # passes over the data (paper: about 1.5; the tiny model learns from scratch)
    max_steps: int = 0  # stop after this many steps (0 = from epochs)
    # optimizer (paper: lr 5e-5 -> 5e-6 cosine, 200 warmup steps, betas (0.9, 0.98), wd 0.1, global batch 64)
    lr: float = 3e-3  # peak learning rate (high: the tiny default learns from scratch)
    min_lr: float = 2e-4  # end of the cosine
    warmup_steps: int = 20  # linear warmup steps
    schedule: str = "cosine"  # cosine or constant
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas
    weight_decay: float = 0.1  # on matrices only
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    moe_bias_update_rate: float = 0.0  # aux-loss-free expert balancing step of the router bias (0 = off)
    # run
    eval_every: int = 50  # validation loss every N steps (0 = only at the end)
    save_every: int = 50  # checkpoint every N steps (0 = only at the end)
    keep_last: int = 2  # checkpoints kept
    seed: int = 0  # model init, data order, sampling
    device: str = "auto"  # auto, cpu or cuda
    dist_timeout_s: int = 3600  # how long a collective waits for the slowest process before the run aborts
    bf16: bool = False  # bf16 compute with fp32 master weights and reductions (FSDP, GPU)
    activation_checkpointing: bool = False  # recompute each layer in backward to save memory
    export_dtype: str = ""  # dtype of the HF export: bfloat16, float32 or empty = as trained
    wandb_project: str = ""  # also log to Weights & Biases when set and wandb is installed
    inject_nan_at_step: int = -1  # fault injection for tests: make this step's loss NaN
    inject_kill_at_step: int = -1  # fault injection for tests: SIGKILL this process as this step starts


# ----------------------------------------------------------------------------------------------------------------
# Data: render, tokenize, pack


def tokenize(examples, tokenizer, thinking, progress=False):
    """Each example -> (ids, mask): mask marks the assistant tokens, the only ones trained on."""
    docs = []
    for ex in tqdm(examples, desc="sft: tokenizing", unit=" examples", disable=not progress, mininterval=2):
        ids, mask = encode_chat(tokenizer, ex["messages"], tools=ex.get("tools"), thinking=thinking)
        docs.append((ids, mask))
    return docs


def pack(docs, seq_len, pad_id):
    """
    Pack documents into rows of seq_len tokens. Returns int64 arrays [rows, seq_len]:
      ids, targets (the next token where it is an assistant token of the same document, else -100), doc_ids
    (each document its own id; padding gets -1 and a target of -100). Documents longer than seq_len are cut.
    Best fit decreasing: the longest document first, each into the row with the least space left that holds it.
    Padding is compute spent on nothing: on the shipped data it is 2% of the tokens, against 20% for packing the
    documents in order (a 490-token conversation then gets a row of its own). Within a row the documents keep
    their order; the rows are shuffled by row_order.
    """
    lengths = [min(len(ids), seq_len) for ids, _ in docs]
    truncated = sum(len(ids) > seq_len for ids, _ in docs)
    rows, free = [], []                       # free: sorted (space left, row) of the rows that have any
    for i in sorted(range(len(docs)), key=lambda i: (-lengths[i], i)):
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k < len(free):
            space, r = free.pop(k)
        else:
            space, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if space > lengths[i]:
            bisect.insort(free, (space - lengths[i], r))
    rows = [[(docs[i][0][:seq_len], docs[i][1][:seq_len]) for i in sorted(row)] for row in rows]
    if truncated:
        print(f"sft: {truncated} documents longer than seq_len={seq_len} were truncated")
    out_ids = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    out_tgt = np.full((len(rows), seq_len), -100, dtype=np.int64)
    out_doc = np.full((len(rows), seq_len), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        pos = 0
        for d, (ids, mask) in enumerate(row):
            n = len(ids)
            out_ids[r, pos:pos + n] = ids
            out_doc[r, pos:pos + n] = d
            nxt, nxt_mask = np.array(ids[1:], dtype=np.int64), np.array(mask[1:], dtype=bool)
            out_tgt[r, pos:pos + n - 1] = np.where(nxt_mask, nxt, -100)
            pos += n
    return out_ids, out_tgt, out_doc


@functools.lru_cache(maxsize=2)
def row_order(num_rows, seed, epoch, mix=None):
    """
    The rows of one epoch in a shuffled order fixed by (seed, epoch): resuming needs only the step count.
    mix: ((first_row, rows, weight), ...) per source: an epoch takes round(weight * rows) of a source's rows
    (each row once, plus a fresh random choice for the fraction; weight 2 = every row twice).
    """
    rng = np.random.default_rng([seed, epoch])
    if mix is None:
        return rng.permutation(num_rows)
    picked = []
    for first, n, weight in mix:
        whole, frac = divmod(round(weight * n), n)
        picked += [np.arange(first, first + n)] * whole + [first + rng.choice(n, frac, replace=False)]
    return rng.permutation(np.concatenate(picked))


def rows_for_step(step, global_batch, num_rows, seed, mix=None):
    """Row indices of optimizer step `step`: a contiguous slice of the endless sequence of shuffled epochs."""
    epoch_len = len(row_order(num_rows, seed, 0, mix))
    return [int(row_order(num_rows, seed, k // epoch_len, mix)[k % epoch_len])
            for k in range(step * global_batch, (step + 1) * global_batch)]


# ----------------------------------------------------------------------------------------------------------------
# The data cache: tokenize and pack once, then every process memory-maps the rows (reading only its own)


def mix_sources(cfg):
    """[(name, train_data, subset, weight)] from --train_mix, or train_data / train_subset alone."""
    if not cfg.train_mix:
        return [(cfg.train_subset or cfg.train_data, cfg.train_data, cfg.train_subset or None, 1.0)]
    out = []
    for item in cfg.train_mix.split(","):
        name, _, weight = item.strip().rpartition(":")
        try:
            w = float(weight)
        except ValueError:
            w = -1
        if not name or not w > 0:
            raise options.ConfigError(f"--train_mix: {item!r} is not SOURCE:WEIGHT with a weight > 0")
        out.append((name, name, None, w) if os.path.exists(name) else (name, cfg.train_data, name, w))
    return out


def _tokenize_worker_init(path):
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(path)


def _tokenize_chunk(args):
    examples, thinking = args
    return tokenize(examples, _worker_tokenizer, thinking)


def tokenize_parallel(examples, tokenizer_path, tokenizer, thinking, workers, progress=False):
    """tokenize() over `workers` processes (each loads the tokenizer once), in the examples' order."""
    if workers <= 1 or len(examples) < 64:
        return tokenize(examples, tokenizer, thinking, progress=progress)
    from concurrent.futures import ProcessPoolExecutor
    size = max(16, len(examples) // (8 * workers))
    chunks = [(examples[i:i + size], thinking) for i in range(0, len(examples), size)]
    with ProcessPoolExecutor(workers, initializer=_tokenize_worker_init, initargs=(tokenizer_path,)) as pool:
        return [doc for part in pool.map(_tokenize_chunk, chunks) for doc in part]


def data_cache_key(cfg, tokenizer, sources):
    """What the rows depend on: the sources (names, and size + mtime of local files), the tokenizer's vocabulary
    and chat template, seq_len, thinking, val_fraction and seed (the held-out split)."""
    import hashlib
    stamp = lambda p: [os.path.getsize(p), os.path.getmtime(p)] if os.path.isfile(p) else None  # noqa: E731
    tok = tokenizer.tokenizer.to_str()                          # vocabulary, merges, special tokens
    parts = dict(sources=[(n, d, s, stamp(d)) for n, d, s, _ in sources], split=cfg.train_split,
                 tokenizer=hashlib.sha256(tok.encode()).hexdigest(),
                 special=[tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token],
                 seq_len=cfg.seq_len, thinking=cfg.thinking, val_fraction=cfg.val_fraction, seed=cfg.seed,
                 version=2)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def build_rows(cfg, tokenizer, d, verbose=True):
    """
    (train, val, mix): train and val are (ids, targets, doc_ids) row arrays, int32 memory maps when --cache_dir is
    set (built by rank 0 once, reused by every later run with the same key; each process then pages in only the
    rows it reads), else in memory; mix is row_order's per-source (first_row, rows, weight), None for one source.
    """
    sources = mix_sources(cfg)
    if not cfg.cache_dir:                                   # every process builds its rows in memory
        return _build_rows(cfg, tokenizer, sources, None, verbose and d.is_main)
    path = os.path.join(cfg.cache_dir, data_cache_key(cfg, tokenizer, sources))
    if not os.path.exists(os.path.join(path, "meta.json")):
        if d.is_main:
            _build_rows(cfg, tokenizer, sources, path, verbose)
        if d.world_size > 1:
            common.dist.barrier()
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    arrays = {name: np.load(os.path.join(path, f"{name}.npy"), mmap_mode="r")
              for name in ("train_ids", "train_targets", "train_docs", "val_ids", "val_targets", "val_docs")}
    train = tuple(arrays[f"train_{k}"] for k in ("ids", "targets", "docs"))
    val = tuple(arrays[f"val_{k}"] for k in ("ids", "targets", "docs")) if len(arrays["val_ids"]) else None
    mix = tuple(tuple(m) for m in meta["mix"]) if len(sources) > 1 else None
    if verbose and d.is_main:
        print(f"sft: {len(train[0])} rows of {cfg.seq_len} from the cache {path}")
    return train, val, mix


def _build_rows(cfg, tokenizer, sources, path, verbose):
    import time as _time
    tokenizer_path = cfg.tokenizer or cfg.model
    trains, vals, mix, first, n_tokens, busy = [], [], [], 0, 0, 0.0
    for name, data, subset, weight in sources:
        if verbose:
            print(f"sft: loading {name}", flush=True)
        examples = tasks.load_examples(data, split=cfg.train_split, config=subset, verbose=verbose)
        examples = [ex for ex in examples if any(m["role"] == "assistant" for m in ex["messages"])]
        if not examples:
            raise options.ConfigError(f"--train_data {name}: no examples with an assistant turn to train on")
        order = np.random.default_rng(cfg.seed).permutation(len(examples))
        n_val = max(1, int(len(examples) * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
        val_ex, train_ex = [examples[i] for i in order[:n_val]], [examples[i] for i in order[n_val:]]
        t0 = _time.perf_counter()
        docs = tokenize_parallel(train_ex, tokenizer_path, tokenizer, cfg.thinking, cfg.data_workers, verbose)
        n_tokens += sum(len(ids) for ids, _ in docs)
        rows = pack(docs, cfg.seq_len, tokenizer.pad_id) if docs else None
        busy += _time.perf_counter() - t0
        if rows is None or not (rows[1] >= 0).any():
            raise options.ConfigError(f"--train_data {name}: nothing to train on: " + (
                f"--val_fraction={cfg.val_fraction} holds out all {len(examples)} examples" if not train_ex else
                f"no assistant token is left within --seq_len={cfg.seq_len} tokens of any row; raise --seq_len"))
        trains.append(rows)
        if val_ex:
            vals.append(pack(tokenize(val_ex, tokenizer, cfg.thinking), cfg.seq_len, tokenizer.pad_id))
        mix.append((first, len(rows[0]), weight))
        first += len(rows[0])
    train = tuple(np.concatenate([r[i] for r in trains]) for i in range(3))
    val = tuple(np.concatenate([r[i] for r in vals]) for i in range(3)) if vals else None
    if verbose:
        print(f"sft: tokenized and packed {n_tokens:,} tokens in {busy:.1f} s ({n_tokens / busy:,.0f} tokens/s, "
              f"{cfg.data_workers} workers) -> {len(train[0])} rows")
    if path is None:
        return train, val, tuple(mix) if len(sources) > 1 else None
    tmp = f"{path}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    empty = tuple(np.zeros((0, cfg.seq_len), np.int32) for _ in range(3))
    for split, arrays in (("train", train), ("val", val or empty)):
        for key, a in zip(("ids", "targets", "docs"), arrays):
            np.save(os.path.join(tmp, f"{split}_{key}.npy"), np.asarray(a, dtype=np.int32))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(dict(mix=mix, sources=sources, seq_len=cfg.seq_len), f)
    os.replace(tmp, path)                   # complete or absent: a killed build is redone


def batch_loss(model, ids, targets, doc_ids, device):
    """Sum of -log p over the target tokens, and their count."""
    ids, targets, doc_ids = (torch.as_tensor(np.asarray(a, dtype=np.int64), device=device)    # cached rows: int32
                             for a in (ids, targets, doc_ids))
    logprobs = model.token_logprobs(ids, targets, doc_ids=doc_ids)
    valid = targets >= 0
    return -(logprobs * valid).sum(), valid.sum()


# ----------------------------------------------------------------------------------------------------------------


def build_model(cfg, d):
    """
    The model to train, sharded over the processes (FSDP2; one process: the plain model). A checkpoint directory
    is loaded straight into the shards: built on the meta device, sharded, allocated, then each process reads
    only its own rows from the safetensors, so no process ever holds the whole model. A config.json starts from
    scratch the same way: meta, sharded, allocated, then each process initialises its own rows (Model.init_weights
    draws the same values for 1 or N processes).
    """
    sharding = dict(bf16=cfg.bf16, activation_checkpointing=cfg.activation_checkpointing)
    if not os.path.exists(cfg.model):
        raise FileNotFoundError(f"--model {cfg.model}: no such checkpoint directory or config file")
    from_checkpoint = os.path.isdir(cfg.model)
    with torch.device("meta"):
        model = Model(Model.config_from_pretrained(cfg.model) if from_checkpoint
                      else ModelConfig.from_json(cfg.model))
    model = common.shard_model(model, d, **sharding)
    model.to_empty(device=d.device)                     # fp32 master weights, this process's shards only
    if from_checkpoint:
        model.load_hf_weights(cfg.model)
    else:
        model.init_weights(torch.Generator().manual_seed(cfg.seed))     # the same model on every process
    model.config.moe_bias_update_rate = cfg.moe_bias_update_rate
    return model


def load_tokenizer_for(cfg):
    path = cfg.tokenizer or cfg.model
    if not os.path.exists(path):
        raise FileNotFoundError(f"--tokenizer {path}: no such file or directory")
    return load_tokenizer(path)


def main(cfg: SFTConfig):
    # every option, the held-out set and the out_dir are checked before any work (parse_config checked the
    # options already; a config built in code is checked here)
    options.check_config(cfg)
    eval_examples = (common.load_eval_examples(cfg.eval_data, "--eval_data", cfg.eval_per_domain)
                     if cfg.eval_data else None)
    model_config = ModelConfig.from_path(cfg.model)
    common.claim_out_dir(cfg.out_dir, "sft", model_config)
    d = common.init_dist(cfg.device, cfg.dist_timeout_s)
    common.seed_everything(cfg.seed)
    tokenizer = load_tokenizer_for(cfg)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise options.ConfigError(f"--tokenizer {cfg.tokenizer or cfg.model} has {tokenizer.vocab_size} tokens but "
                                  f"the model's vocab_size is {model_config.vocab_size}")
    if eval_examples:                       # the final score's prompts fit the context (checked before training)
        sample.encode_prompts(tokenizer, eval_examples, cfg.thinking, model_config.max_position_embeddings,
                              cfg.eval_max_new_tokens, source=f"--eval_data {cfg.eval_data}",
                              hint="shorten it or lower --eval_max_new_tokens")

    # data: hold out a validation slice of each source, tokenize, pack (or memory-map the cached rows)
    train, val, mix = build_rows(cfg, tokenizer, d)
    num_rows = len(train[0])

    per_step = d.world_size * cfg.micro_batch
    if cfg.global_batch % per_step:
        raise ValueError(f"--global_batch {cfg.global_batch} must be a multiple of micro_batch x processes "
                         f"= {cfg.micro_batch} x {d.world_size}")
    accum = cfg.global_batch // per_step
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * num_rows / cfg.global_batch)

    # model, sharding, optimizer
    model = build_model(cfg, d)
    optimizer = common.make_optimizer(model, cfg.lr, cfg.betas, cfg.weight_decay)
    ckpt = common.Checkpointer(cfg.out_dir, d, keep_last=cfg.keep_last)
    start_step, latest = 0, ckpt.latest()
    if latest:
        start_step = ckpt.load(latest, model, optimizer)["step"]
        if d.is_main:
            print(f"sft: resuming from {latest} (step {start_step})")
    log = common.MetricsLog(cfg.out_dir, d, resume_step=start_step, wandb_project=cfg.wandb_project or None,
                            run_config=asdict(cfg))
    if d.is_main:
        n = model.num_params() if hasattr(model, "num_params") else {}
        print(f"sft: {num_rows} train / {len(val[0]) if val is not None else 0} val rows of {cfg.seq_len}; "
              f"{total_steps} steps of {cfg.global_batch} rows ({accum} accumulation x {d.world_size} processes); "
              f"model {n.get('total', 0) / 1e6:.2f}M params")

    def validation_loss():
        model.eval()
        loss_sum, count = torch.zeros((), device=d.device), torch.zeros((), device=d.device)
        with torch.no_grad():
            # every process runs the same number of forwards (FSDP's all-gathers must pair up); a process
            # with no rows left runs row 0 with every target ignored
            for start in range(0, len(val[0]), per_step):
                rows = np.arange(start + d.rank * cfg.micro_batch, start + (d.rank + 1) * cfg.micro_batch)
                rows = rows[rows < len(val[0])]
                ids, tgt, doc = (a[rows] if len(rows) else a[:1] for a in val)
                if not len(rows):
                    tgt = np.full_like(tgt, -100)
                ls, c = batch_loss(model, ids, tgt, doc, d.device)
                loss_sum, count = loss_sum + ls, count + c
        model.train()
        return (common.all_reduce_sum(loss_sum, d) / common.all_reduce_sum(count, d).clamp(min=1)).item()

    model.train()
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="sft",
               disable=not d.is_main, dynamic_ncols=True)
    for step in bar:
        if step == cfg.inject_kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.perf_counter()
        lr = common.lr_at(step, cfg.lr, cfg.warmup_steps, total_steps, cfg.schedule, cfg.min_lr)
        common.set_lr(optimizer, lr)
        step_rows = rows_for_step(step, cfg.global_batch, num_rows, cfg.seed, mix)
        mine = step_rows[d.rank::d.world_size]
        # normalise by the global number of target tokens, so every process count gives the same gradient
        n_tokens = common.all_reduce_sum(torch.tensor(float((train[1][mine] >= 0).sum()), device=d.device), d)
        loss_sum = torch.zeros((), device=d.device)
        for a in range(accum):
            rows = mine[a * cfg.micro_batch:(a + 1) * cfg.micro_batch]
            ls, _ = batch_loss(model, train[0][rows], train[1][rows], train[2][rows], d.device)
            if step == cfg.inject_nan_at_step:
                ls = ls * float("nan")
            (ls / n_tokens * d.world_size).backward()     # FSDP averages gradients over processes
            loss_sum += ls.detach()
        loss = (common.all_reduce_sum(loss_sum, d) / n_tokens).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        common.check_finite(step, loss=loss, grad_norm=grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        imbalance = common.balance_experts(model, d)

        dt = time.perf_counter() - t0
        metrics = dict(loss=loss, lr=lr, grad_norm=grad_norm, tokens=int(n_tokens.item()),
                       tokens_per_s=int((train[2][step_rows] >= 0).sum()) / dt,    # real tokens, not padding
                       expert_imbalance=imbalance,
                       peak_mem_mb=common.peak_memory_mb(d.device))
        done = step + 1
        if val is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or done == total_steps):
            metrics["val_loss"] = validation_loss()
        log.log(done, **metrics)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", gnorm=f"{grad_norm:.2f}",
                        **({"val": f"{metrics['val_loss']:.3f}"} if "val_loss" in metrics else {}))
        if (cfg.save_every and done % cfg.save_every == 0) or done == total_steps:
            ckpt.save(done, model, optimizer, dict(rows_seen=done * cfg.global_batch))
    bar.close()

    # export, plot, and score the result per domain
    export_dir = os.path.join(cfg.out_dir, "export")
    if d.is_main:
        print(f"sft: exporting to {export_dir}", flush=True)
    common.export_hf(model, tokenizer, export_dir, d,
                     dtype=getattr(torch, cfg.export_dtype) if cfg.export_dtype else None)
    common.close_dist()         # the other processes are done: they exit now instead of waiting on rank 0's eval
    if d.is_main:
        common.plot_metrics(log.path, os.path.join(cfg.out_dir, "curves.png"),
                            ["loss", "val_loss", "grad_norm", "lr", "tokens_per_s"])
        print(f"sft: exported {export_dir}")
        if eval_examples:
            score_export(export_dir, eval_examples, cfg.eval_max_new_tokens, cfg.thinking,
                         os.path.join(cfg.out_dir, "eval.json"), d.device, cfg.seed)
    common.release_out_dir(cfg.out_dir)
    return model


def score_export(export_dir, examples, max_new_tokens, thinking, out_json, device, seed):
    """Greedy per-domain pass@1 of an exported checkpoint on held-out examples (common.load_eval_examples);
    prints the table, writes JSON whole or not at all."""
    model = Model.from_pretrained(export_dir, dtype=torch.float32, device=device).eval()
    tok = load_tokenizer(export_dir)
    print(f"sft: scoring {export_dir} on {len(examples)} held-out examples", flush=True)
    scores = sample.evaluate(model, tok, examples, n=1, max_new_tokens=max_new_tokens, temperature=0.0,
                             thinking=thinking, seed=seed, progress=True)
    print(tasks.format_score_table(scores))
    common.write_json_atomic(out_json, scores)
    return scores


if __name__ == "__main__":
    common.run_main(main, options.parse_config(SFTConfig, description=__doc__))
