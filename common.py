"""
Stage plumbing shared by sft.py, rl.py and distill.py: the out_dir, torch.distributed + FSDP2, optimizer and
schedule, checkpoints that survive any crash, logging, and the RL stages' shared steps (policy loading, rollout
log-probs, the cascade's score table); the stages' options and their checks are options.py. Kept small and
plain: each piece is a function or a tiny class a stage script calls in its recipe.
"""
import json
import math
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import options
from options import ConfigError

# ----------------------------------------------------------------------------------------------------------------
# The out_dir of a run: one run at a time (an flock, released by the OS however the process ends), and only the
# same stage on the same model architecture (run.json), so no run resumes from or overwrites another's checkpoints.

_held_out_dirs = {}


def claim_out_dir(out_dir, stage, model_config=None):
    """Lock out_dir for this run (rank 0; the lock file names the holder) and check that the checkpoints already
    in it are this stage's and this architecture's. Raises ConfigError naming the other process or run. The lock
    is held until release_out_dir(out_dir) or the end of the process."""
    if int(os.environ.get("RANK", 0)) != 0:
        return
    import fcntl
    import socket
    import sys
    os.makedirs(out_dir, exist_ok=True)
    key = os.path.realpath(out_dir)
    if key not in _held_out_dirs:
        fd = os.open(os.path.join(out_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"--out_dir={out_dir} is in use by {holder}; wait for that run to end or choose "
                              "another --out_dir") from None
        except OSError as e:                 # a filesystem without flock (some NFS / Lustre mounts)
            print(f"warning: cannot lock --out_dir={out_dir} ({e}): a second run into it would not be stopped")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv)})".encode(), 0)
        _held_out_dirs[key] = fd
    try:
        _check_run_record(out_dir, stage, model_config.to_hf() if model_config is not None else None)
    except ConfigError:
        release_out_dir(out_dir)
        raise


def _check_run_record(out_dir, stage, arch):
    """out_dir/run.json names the stage and model architecture of the checkpoints beside it: a run of another
    stage or architecture stops here (rather than with a size mismatch while resuming); otherwise it is written."""
    record = os.path.join(out_dir, "run.json")
    has_results = any(os.path.exists(os.path.join(out_dir, n)) for n in ("checkpoints", "export"))
    previous = None
    if os.path.exists(record):
        with open(record) as f:
            previous = json.load(f)
    elif has_results and os.path.exists(os.path.join(out_dir, "export", "config.json")):
        with open(os.path.join(out_dir, "export", "config.json")) as f:     # a run from before run.json existed
            previous = dict(stage=stage, model=json.load(f))
    if previous is None and arch is not None:           # checkpoints from before run.json: compare their shapes
        differ = _checkpoint_shape_mismatches(out_dir, arch)
        if differ:
            raise ConfigError(f"--out_dir={out_dir} holds checkpoints of another model ({'; '.join(differ[:3])}); "
                              "resuming from them cannot work: choose another --out_dir")
    if previous is not None and has_results:
        if previous.get("stage") != stage:
            raise ConfigError(f"--out_dir={out_dir} holds a {previous.get('stage')} run's checkpoints; a {stage} "
                              "run needs its own --out_dir")
        if arch is not None and previous.get("model") is not None:
            differ = sorted(k for k in arch if k not in ("torch_dtype", "dtype") and k in previous["model"]
                            and previous["model"][k] != arch[k])
            if differ:
                shown = ", ".join(f"{k}: {previous['model'][k]!r} there, {arch[k]!r} now" for k in differ[:4])
                raise ConfigError(f"--out_dir={out_dir} holds checkpoints of another model ({shown}); resuming "
                                  "from them cannot work: choose another --out_dir")
    current = dict(stage=stage, model=arch if arch is not None else (previous or {}).get("model"))
    if current != previous:                  # rewritten only when it changes (a first run, a new out_dir)
        _write_atomic(record, json.dumps(current, indent=2))


def _checkpoint_shape_mismatches(out_dir, arch):
    """'name: shape there, shape now' for each model tensor of out_dir's newest checkpoint (its DCP metadata, no
    tensor read) whose shape differs from the model `arch` (an HF config dict) builds on the meta device."""
    from torch.distributed.checkpoint import FileSystemReader

    from model import Model, ModelConfig
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    steps = sorted(n for n in os.listdir(ckpt_dir) if re.fullmatch(r"step_\d+", n)) if os.path.isdir(ckpt_dir) else []
    if not steps:
        return []
    try:
        saved = FileSystemReader(os.path.join(ckpt_dir, steps[-1])).read_metadata().state_dict_metadata
    except Exception:                       # unreadable metadata: the Checkpointer reports it when it loads
        return []
    with torch.device("meta"):
        ours = {f"model.{k}": tuple(v.shape) for k, v in Model(ModelConfig.from_hf(arch)).state_dict().items()}
    return [f"{k}: {tuple(m.size)} there, {ours[k]} now" for k, m in saved.items()
            if k in ours and hasattr(m, "size") and tuple(m.size) != ours[k]]


def load_eval_examples(source, option="--eval_data", per_domain=0, limit=None):
    """Held-out examples for a score, loaded and checked before the work whose result they grade: every domain
    has a verifier and something is left to score. per_domain keeps the first N of each domain (0 = all)."""
    import tasks
    if source != "tiny" and (why := options.data_source(source)):
        raise ConfigError(f"{option}={source}: {why}")
    examples = tasks.load_examples(source, "eval" if source == "tiny" else None, limit=limit, verbose=False)
    ungraded = sorted({ex["domain"] for ex in examples} - set(tasks.GRADED_DOMAINS))
    if ungraded:
        raise ConfigError(f"{option}={source}: no verifier for domain(s) {ungraded}; graded domains are "
                          f"{', '.join(tasks.GRADED_DOMAINS)}")
    if per_domain:
        taken, kept = {}, []
        for ex in examples:
            taken[ex["domain"]] = taken.get(ex["domain"], 0) + 1
            if taken[ex["domain"]] <= per_domain:
                kept.append(ex)
        examples = kept
    if not examples:
        raise ConfigError(f"{option}={source}: no examples to score")
    return examples


def release_out_dir(out_dir):
    """End of a run: let the next one into out_dir (the OS also releases the lock when the process ends)."""
    fd = _held_out_dirs.pop(os.path.realpath(out_dir), None)
    if fd is not None:
        os.close(fd)


def run_main(main, cfg):
    """A stage script's entry point: main(cfg), where bad input found after parsing (a data row, the out_dir,
    the held-out file: ConfigError or tasks.ExampleError) ends with its one-line message and exit status 2, as an
    option error does, instead of a traceback; the out_dir locks it took are released however it ends."""
    import sys

    from tasks import ExampleError
    try:
        return main(cfg)
    except (ConfigError, ExampleError) as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:                                   # the out_dir is free again however main ended (also when called
        for out_dir in list(_held_out_dirs):   # in a process that lives on, such as a notebook)
            release_out_dir(out_dir)


def write_json_atomic(path, obj):
    """Write a result file whole or not at all: a crash mid-write never leaves a truncated or empty one."""
    _write_atomic(path, json.dumps(obj, indent=2, default=str))


# ----------------------------------------------------------------------------------------------------------------
# Distributed: plain `python stage.py` (one process) or `torchrun --nproc_per_node=N stage.py` (NCCL on CUDA,
# gloo on CPU; multi-node through torchrun's own --nnodes / --rdzv flags).


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def init_dist(device: str = "auto", timeout_s: float = 3600) -> Dist:
    """timeout_s: how long a collective may wait for the slowest rank before the run aborts. torch's default
    (10 min) is shorter than one long-row step plus a checkpoint write at real size: make it generous."""
    import datetime
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ:
        return Dist(device=torch.device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    dev = torch.device(f"cuda:{local_rank}") if device == "cuda" else torch.device("cpu")
    return Dist(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(), device=dev)


def close_dist():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def broadcast_object(obj, d: Dist):
    if d.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_model(model, d: Dist, bf16: bool = False, activation_checkpointing: bool = False):
    """
    FSDP2: fully_shard each layer, then the root (embeddings, final norm, lm_head). With bf16, parameters are
    gathered in bf16 for compute while the fp32 master shards take the optimizer step, and gradients are
    reduced in fp32. A plain `python stage.py` (no process group): no sharding, the same model object.
    """
    model.gradient_checkpointing = activation_checkpointing
    if not dist.is_initialized():
        if bf16:
            raise ValueError("--bf16 needs FSDP's mixed precision: launch with torchrun (--nproc_per_node=1 is fine)")
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    for p in model.parameters():        # FSDP2 shards contiguous parameters only: model.Experts' transposed
        p.data = p.data.contiguous()    # layout is a CPU decode speed-up, dropped here (a copy of the same values)
    mesh = init_device_mesh(d.device.type, (d.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    # FSDP2 casts a whole parameter group to one dtype, and the layer's own group would cast A_log, D and the
    # router (FP32_TENSORS) to bf16 too. So under bf16 the big matrices of Mamba and MoE layers get a bf16 group
    # of their own and the layer's group, holding what is left (A_log, D, dt_bias, conv1d, norms, the router),
    # is gathered in fp32 and does not cast the layer's input (the residual stream stays bf16).
    keep_fp32 = MixedPrecisionPolicy(cast_forward_inputs=False)
    for layer in model.backbone.layers:
        big = {"mamba": ["in_proj", "out_proj"], "moe": ["experts", "shared_experts"]}.get(layer.kind) if bf16 \
            else None
        if big:     # (their inputs are bf16 already; the routing weights stay fp32)
            fully_shard([getattr(layer.mixer, n) for n in big if getattr(layer.mixer, n) is not None], mesh=mesh,
                        mp_policy=MixedPrecisionPolicy(torch.bfloat16, torch.float32, cast_forward_inputs=False))
        fully_shard(layer, mesh=mesh, mp_policy=keep_fp32 if big else mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def full_state_dict(model, d: Dist):
    """The whole model's tensors on CPU, on rank 0 (other ranks get {}); works sharded and unsharded."""
    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ----------------------------------------------------------------------------------------------------------------
# Optimizer and schedule


def make_optimizer(model, lr, betas, weight_decay):
    """AdamW; weight decay on matrices only (not norms, biases, or Mamba's A_log / D / dt_bias)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=1e-8)


def lr_at(step, lr, warmup_steps, total_steps, schedule="cosine", min_lr=0.0, warmup_start_lr=0.0):
    """Linear warmup from warmup_start_lr to lr over warmup_steps, then cosine down to min_lr at total_steps
    (or constant)."""
    if step < warmup_steps:
        return warmup_start_lr + (lr - warmup_start_lr) * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"--schedule: {schedule!r} is not one of cosine, constant")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def balance_experts(model, d: Dist):
    """
    Aux-loss-free MoE balancing, once per optimizer step: sum every MoE layer's per-expert token counts over the
    processes (one all-reduce for all layers), then let each layer nudge its correction bias toward under-loaded
    experts. With balancing off (moe_bias_update_rate 0) there is no collective at all: the counts stay local.
    Returns the mean over layers of max-load / mean-load (1.0 = balanced; this process's own tokens when
    balancing is off), the metric to watch, or None when no MoE layer ran.
    """
    from model import MoE
    layers = [m for m in model.modules() if isinstance(m, MoE) and m.expert_load is not None]
    if not layers:
        return None
    if layers[0].cfg.moe_bias_update_rate > 0:
        summed = all_reduce_sum(torch.stack([m.expert_load for m in layers]), d)
        for m, load in zip(layers, summed):
            m.expert_load = load
    loads = torch.stack([m.update_correction_bias() for m in layers])
    return (loads.max(-1).values / loads.mean(-1).clamp(min=1e-9)).mean().item()


class NonFiniteError(FloatingPointError):
    pass


def check_finite(step, **values):
    """Stop the run before a non-finite loss or gradient can reach the weights (and so any checkpoint)."""
    bad = {k: float(v) for k, v in values.items() if not math.isfinite(float(v))}
    if bad:
        raise NonFiniteError(f"step {step}: non-finite {bad}; stopping before the optimizer step, so the last "
                             "checkpoint on disk is the last good state. Lower the lr or check the data.")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: sharded model + optimizer through torch.distributed.checkpoint, plus the trainer state (step,
# data position, ...) and every rank's RNG states. Written to step_N.tmp and renamed to step_N only when all of
# it is on disk; `latest` names the newest complete one; the last K are kept.


def rng_state():
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _write_atomic(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    def __init__(self, out_dir, d: Dist, keep_last=2):
        self.dir = os.path.join(out_dir, "checkpoints")
        self.d, self.keep_last = d, keep_last
        self.resumed_from = None
        if d.is_main:
            os.makedirs(self.dir, exist_ok=True)
            for name in os.listdir(self.dir):            # leftovers of a save that was killed half-way
                if name.endswith(".tmp"):
                    shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)
        if d.world_size > 1:
            dist.barrier()

    def complete(self):
        """Names of the complete checkpoints (trainer_state.json is written last), oldest first."""
        names = [n for n in os.listdir(self.dir) if re.fullmatch(r"step_\d+", n)
                 and os.path.exists(os.path.join(self.dir, n, "trainer_state.json"))]
        return sorted(names, key=lambda n: int(n[5:]))

    def latest(self):
        """The checkpoint to resume from: the one `latest` names, or, when that marker is missing or names a
        directory that is gone or incomplete, the newest complete step_* (a run must never restart at step 0
        beside its own checkpoints)."""
        marker = os.path.join(self.dir, "latest")
        if os.path.exists(marker):
            with open(marker) as f:
                path = os.path.join(self.dir, f.read().strip())
            if os.path.exists(os.path.join(path, "trainer_state.json")):
                return path
        done = self.complete()
        if done and self.d.is_main:
            print(f"checkpoints: {marker} is missing or broken; resuming from the newest complete {done[-1]}")
        return os.path.join(self.dir, done[-1]) if done else None

    def _state(self, model, optimizer):
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_sd, optim_sd = get_state_dict(model, optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, step, model, optimizer, trainer_state: dict):
        import torch.distributed.checkpoint as dcp
        name = f"step_{step:07d}"
        final, tmp = os.path.join(self.dir, name), os.path.join(self.dir, name + ".tmp")
        if self.d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(os.path.join(tmp, "rng"))
        if self.d.world_size > 1:
            dist.barrier()
        with warnings.catch_warnings():     # one process: DCP warns that it saves without a process group
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(self._state(model, optimizer), checkpoint_id=tmp)
        torch.save(rng_state(), os.path.join(tmp, "rng", f"rank{self.d.rank}.pt"))
        if self.d.world_size > 1:
            dist.barrier()
        if self.d.is_main:
            _write_atomic(os.path.join(tmp, "trainer_state.json"), json.dumps(dict(trainer_state, step=step)))
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(os.path.join(self.dir, "latest"), name)
            # keep the newest keep_last up to this step (never ones from a later, abandoned run, never the one
            # just written) and never the checkpoint this run resumed from
            lineage = [n for n in self.complete() if int(n[5:]) <= step]
            for old in lineage[:-self.keep_last]:
                if os.path.join(self.dir, old) != self.resumed_from:
                    shutil.rmtree(os.path.join(self.dir, old), ignore_errors=True)
        if self.d.world_size > 1:
            dist.barrier()
        return final

    def load(self, path, model, optimizer):
        """Restore model, optimizer and this rank's RNG states from `path`; returns the trainer state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict
        self.resumed_from = path
        state = self._state(model, optimizer)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng_file = os.path.join(path, "rng", f"rank{self.d.rank}.pt")
        if os.path.exists(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=False))
        with open(os.path.join(path, "trainer_state.json")) as f:
            return json.load(f)


def export_hf(model, tokenizer, path, d: Dist, dtype=None):
    """A consolidated HF-format directory (config.json, safetensors, tokenizer) that Model.from_pretrained,
    transformers and sample.py load. Gathers the full weights on rank 0."""
    state = full_state_dict(model, d)
    if d.is_main:
        model.save_pretrained(path, state_dict=state, dtype=dtype)
        tokenizer.save_pretrained(path)
    if d.world_size > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# Logging: metrics.jsonl (one line per step, rank 0), optional Weights & Biases, and PNG plots of the curves.


class MetricsLog:
    def __init__(self, out_dir, d: Dist, resume_step=0, wandb_project=None, run_config=None):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.d, self.wandb = d, None
        if not d.is_main:
            return
        os.makedirs(out_dir, exist_ok=True)
        # on resume, drop lines past the checkpoint: those steps are about to be redone
        if os.path.exists(self.path):
            with open(self.path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            _write_atomic(self.path, "".join(keep))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print("wandb is not installed: logging to metrics.jsonl only (pip install wandb)")
            else:
                id_file = os.path.join(out_dir, "wandb_id.txt")
                run_id = open(id_file).read().strip() if os.path.exists(id_file) else wandb.util.generate_id()
                _write_atomic(id_file, run_id)
                self.wandb = wandb.init(project=wandb_project, id=run_id, resume="allow", config=run_config)

    def log(self, step, **metrics):
        if not self.d.is_main:
            return
        row = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: allocated GPU memory on CUDA, resident memory (RSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_metrics(path):
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def plot_metrics(metrics_path, png_path, keys):
    """One panel per metric key against step; keys missing from the log are skipped."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(metrics_path)
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


# ================================================================================================================
# RL and distillation plumbing (owned by rl.py / distill.py): a policy from an HF export, the padded
# prompt + completion batch, the trainer's log-probs of the completion tokens, held-out scores per domain, and
# cascade.json, the one record of every checkpoint's scores that rl.py, distill.py and the scoreboard read.


def load_policy(path, d: Dist, bf16=False, activation_checkpointing=False, trainable=True):
    """
    A model from an HF export directory, sharded over the processes (FSDP2; one process: the plain model): built
    on the meta device, sharded, allocated, then each process reads only its own rows from the safetensors, so
    no process ever holds the whole model. trainable=False gives a frozen model in eval mode (a reference model
    or an MOPD teacher), sharded like the student.
    """
    from model import Model
    if not os.path.isfile(os.path.join(str(path), "config.json")):
        raise ConfigError(f"{path}: not a checkpoint directory (an HF export with config.json + safetensors)")
    with torch.device("meta"):
        model = Model(Model.config_from_pretrained(path))
    model = shard_model(model, d, bf16=bf16, activation_checkpointing=activation_checkpointing)
    model.to_empty(device=d.device)                 # fp32 master weights
    model.load_hf_weights(path)
    if not trainable:
        model.requires_grad_(False).eval()
    return model


def check_tokenizer(tokenizer, model_config, where):
    """Refuse a tokenizer the checkpoint cannot have been trained with: ids beyond the model's vocabulary, or a
    tokenizer without the chat template's special tokens as single ids (the shipped data is rendered with them)."""
    from tokenizer import IM_END, IM_START, THINK_CLOSE, THINK_OPEN
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{model_config.vocab_size}: not this checkpoint's tokenizer")
    for token in (IM_START, IM_END, THINK_OPEN, THINK_CLOSE):
        try:
            tokenizer.token_id(token)
        except KeyError:
            raise ConfigError(f"{where}: the tokenizer has no single token {token!r}, which the chat template "
                             f"the data is rendered with needs") from None


def micro_batches(prompts, completions, max_tokens, d: "Dist"):
    """
    The rollouts of one step in micro-batches of at most max_tokens tokens, one forward/backward each (see
    rollout_logprobs): the rollouts of one prompt (a GRPO group, MOPD's rollouts of a prompt) go together and run
    their prompt once. A micro-batch counts the tokens its forward computes (forward_tokens: padding included
    where the prompt runs once).
    First-fit by decreasing size; a prompt whose rollouts do not fit one micro-batch is split over several (each
    runs the prompt again), and a single rollout longer than max_tokens gets one of its own. A budget in tokens,
    not in rollouts, bounds activation memory however the lengths vary. Every process gets the same number of
    micro-batches (FSDP's collectives must pair up: a process with fewer runs empty ones). Returns lists of
    indices into completions, each in ascending order.
    """
    clen = lambda i: len(completions[i].tokens)                             # noqa: E731
    size = lambda rows: forward_tokens([prompts[i] for i in rows], [completions[i] for i in rows])[0]  # noqa: E731
    groups = {}
    for i in sorted(range(len(prompts)), key=lambda i: (-clen(i), i)):     # longest first: like lengths together
        groups.setdefault(tuple(prompts[i]), []).append(i)
    units = []
    for rows in groups.values():
        units.append([])
        for i in rows:
            if units[-1] and size(units[-1] + [i]) > max_tokens:
                units.append([])
            units[-1].append(i)
    bins = []
    for unit in sorted(units, key=lambda u: (-size(u), u[0])):
        b = next((b for b in bins if size(b + unit) <= max_tokens), None)
        if b is None:
            bins.append(b := [])
        b += unit
    n = torch.tensor(float(len(bins)), device=d.device)
    if d.world_size > 1:
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return [sorted(b) for b in bins] + [[] for _ in range(int(n.item()) - len(bins))]


def rollout_logprobs(model, prompts, completions, device, pad_id=0):
    """
    log pi of every completion token. Returns (lp [n, C], mask [n, C] bool), C the longest completion: lp[i, t] =
    log pi(completion_i[t] | prompt_i, completion_i[:t]) where mask[i, t], else 0. mask is the completion's own
    mask where it has one (a multi-turn episode: the environment's tokens are context, never trained), else every
    completion token. Through model(..., targets=...), so FSDP's hooks fire and the logits are taken in
    vocab-sized chunks; differentiable unless called under no_grad.
    Rollouts that share a prompt run it once (shared_prompt_logprobs) where that computes fewer tokens
    (forward_tokens); otherwise they are packed into one row (packed_logprobs): rollout i (its prompt and
    completion, less the last token) is document i of the row, and doc_ids keep the documents apart (attention
    and the Mamba state restart at each), so no padding is computed.
    No rollouts (an empty pass, see micro_batches): the model still runs, on two padding tokens, and lp is
    [0, 1], so a loss summed over it is 0 with a full backward.
    """
    shared, width = forward_tokens(prompts, completions)[1], max((len(p) - 1 for p in prompts), default=0)
    if dist.is_initialized() and dist.get_world_size() > 1:
        # every process makes the same model calls (FSDP gathers each layer's shards in each): the layout, and
        # the prompts' width (pass 1's pieces), of the micro-batch are agreed on, one all-reduce
        plan = torch.tensor([float(shared), float(width)], device=device)
        dist.all_reduce(plan, op=dist.ReduceOp.MAX)
        shared, width = bool(plan[0]), int(plan[1])
    if shared:
        return shared_prompt_logprobs(model, prompts, completions, device, pad_id, width)
    return packed_logprobs(model, prompts, completions, device, pad_id)


def forward_tokens(prompts, completions):
    """(tokens, shared): the tokens rollout_logprobs computes for these rollouts, and whether it runs each
    distinct prompt once. Shared: the distinct prompts left-padded to the longest, and every completion
    right-padded to the longest; packed: each rollout whole. The shared layout is taken when it computes under
    90% of the packed row's tokens (its two passes cost a little more per token): the prompt repeated n times
    outweighs the completions' padding for long prompts (tool schemas, documents), not for short ones."""
    if not completions:
        return 0, False
    packed = sum(len(p) + len(c.tokens) - 1 for p, c in zip(prompts, completions))
    distinct = {tuple(p) for p in prompts}
    shared = len(distinct) * max(len(p) - 1 for p in distinct) + len(completions) * max(
        [len(c.tokens) for c in completions] + [2])
    return (shared, True) if shared < 0.9 * packed else (packed, False)


def packed_logprobs(model, prompts, completions, device, pad_id=0):
    """rollout_logprobs with every rollout a document of one packed row (its prompt and completion)."""
    C = max([len(c.tokens) for c in completions] + [1])
    ids, targets, doc_ids = [], [], []
    where = torch.zeros(len(completions), C, dtype=torch.long)      # the row position that predicts each token
    for i, (p, c) in enumerate(zip(prompts, completions)):
        k, first = len(c.tokens), len(ids) + len(p) - 1               # first: the prompt's last position
        doc = (list(p) + list(c.tokens))[:-1]
        ids += doc
        targets += [-100] * (len(p) - 1) + list(c.tokens)
        doc_ids += [i] * len(doc)
        where[i, :k] = torch.arange(first, first + k)
    if not ids:
        ids, targets, doc_ids = [pad_id] * 2, [-100] * 2, [0] * 2
    row = lambda x: torch.tensor([x], dtype=torch.long, device=device)       # noqa: E731
    lp = model(row(ids), doc_ids=row(doc_ids), targets=row(targets))[0]
    mask = completion_mask(completions, C).to(device)
    return lp[where.to(device)] * mask, mask


def shared_prompt_logprobs(model, prompts, completions, device, pad_id=0, width=0):
    """
    rollout_logprobs for rollouts that share prompts, each prompt run once: pass 1 runs every distinct prompt but
    its last token (left-padded) into a cache; the cache's rows are repeated, one per rollout; pass 2 continues
    each row with its prompt's last token and its completion but the last (right-padded: padding after a row's
    tokens changes none of them), and scores the completion. Under autograd the cache hands the prompt's
    attention keys and values and its Mamba state to pass 2 as tensors of the graph, so the gradient reaches the
    prompt's pass once, summed over its rollouts: a group of n rollouts of a P-token prompt costs P + sum |o_i|
    tokens instead of n P + sum |o_i|. Equal to the packed row up to float rounding (tests/test_rl.py).
    width: pass 1 covers at least this many prompt tokens (left padding); no rollouts: one row of padding runs.
    """
    import types

    from model import Mamba2Mixer

    if not completions:
        lp, mask = shared_prompt_logprobs(model, [[pad_id] * 2], [types.SimpleNamespace(tokens=[pad_id] * 2,
                                          mask=None)], device, pad_id, width)
        return lp[:0, :1], mask[:0, :1]
    distinct = {}
    which = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    heads = list(distinct)                                          # the distinct prompts, first-seen order
    # every forward here has 2 or more tokens: one token would be a decode step, which writes the cache in place
    P, C = max([len(h) - 1 for h in heads] + [width]), max([len(c.tokens) for c in completions] + [2])
    P = max(P, 2) if P else 0
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)     # noqa: E731
    cache, anchor = model.new_cache(len(heads), P + C), 0.0
    rows = t([[pad_id] * (P + 1 - len(h)) + list(h) for h in heads])      # each prompt whole, left-padded
    valid = t([[0] * (P + 1 - len(h)) + [1] * len(h) for h in heads])
    # pass 1 in pieces of about segment_tokens (a long prompt's Mamba working set stays one segment's, as in the
    # packed row), each continuing the cache. FSDP2 gathers a layer's weights for backward when the gradient
    # reaches that layer's output; the gradient of pass 2 enters pass 1 through the cache, which bypasses the
    # outputs of its last layers. So each piece scores its last position (the next prompt token) and joins the
    # loss with weight 0 (anchor): every layer's output is then on the gradient's path, and the engine reaches it
    # before the weights that made the cache
    ends = list(range(Mamba2Mixer.segment_tokens, P, Mamba2Mixer.segment_tokens)) + [P] if P else []
    if len(ends) > 1 and ends[-1] - ends[-2] < 2:
        ends.pop(-2)
    for s, e in zip([0] + ends, ends):
        targets = torch.full_like(rows[:, s:e], -100)
        targets[:, -1] = rows[:, e].masked_fill(valid[:, e - 1] == 0, -100)
        lp = model(rows[:, s:e], attention_mask=valid[:, s:e], cache=cache, targets=targets)
        anchor = anchor + 0.0 * lp[:, -1].sum()
    cache.select(t(which))
    ids = t([[p[-1]] + list(c.tokens[:-1]) + [pad_id] * (C - len(c.tokens)) for p, c in zip(prompts, completions)])
    targets = t([list(c.tokens) + [-100] * (C - len(c.tokens)) for c in completions])
    C_out = max(len(c.tokens) for c in completions)
    lp = (model(ids, cache=cache, targets=targets) + anchor)[:, :C_out]
    mask = completion_mask(completions, C_out).to(device)
    return lp * mask, mask


def completion_mask(completions, C):
    """[n, C] bool: the completion tokens that train (a multi-turn episode's own mask: the policy's tokens)."""
    mask = torch.zeros(len(completions), C, dtype=torch.bool)
    for i, c in enumerate(completions):
        mask[i, :len(c.tokens)] = True if c.mask is None else torch.tensor(c.mask, dtype=torch.bool)
    return mask


def start_or_resume(model, out_dir, d: Dist, name, lr, betas, weight_decay, keep_last=2, wandb_project=None,
                    run_config=None):
    """A stage's AdamW, Checkpointer and MetricsLog in out_dir, restored from its latest complete checkpoint when
    there is one. Returns (optimizer, checkpointer, log, start_step)."""
    optimizer = make_optimizer(model, lr, betas, weight_decay)
    ckpt = Checkpointer(out_dir, d, keep_last=keep_last)
    start_step, latest = 0, ckpt.latest()
    if latest:
        start_step = ckpt.load(latest, model, optimizer)["step"]
        if d.is_main:
            print(f"{name}: resuming from {latest} (step {start_step})")
    log = MetricsLog(out_dir, d, resume_step=start_step, wandb_project=wandb_project or None, run_config=run_config)
    return optimizer, ckpt, log, start_step


def draw_prompts(pools, weights, count, *keys):
    """`count` (domain index, example index) draws: a domain by weight, then one of its prompts uniformly. Seeded
    by keys (seed, stage, step, round), so every process draws the same list and a resumed run redraws it."""
    rng = np.random.default_rng([int(k) for k in keys])
    doms = rng.choice(len(pools), size=count, p=np.asarray(weights, dtype=float) / sum(weights))
    return [(int(k), int(rng.integers(len(pools[k])))) for k in doms]


def rollout_seed(*keys):
    """A sampler seed from (seed, stage, step, rank, round): a resumed run samples exactly what it would have."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def read_cascade(path):
    """cascade.json: {"domains": [...], "evaluation": {held-out settings}, "rows": [{"name", "checkpoint",
    "trained", "scores": {domain: pass@1}, ...}, ...]}, rows in pipeline order (SFT, each RL stage, MOPD).
    Empty when the file does not exist yet."""
    if not os.path.exists(path):
        return {"domains": [], "rows": []}
    with open(path) as f:
        try:
            cascade = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cascade, dict) or not isinstance(cascade.get("rows"), list):
        raise ConfigError(f"{path}: expected {{\"domains\": [...], \"rows\": [...]}}")
    for i, row in enumerate(cascade["rows"]):
        missing = [k for k in ("name", "checkpoint", "scores") if k not in row]
        if missing:
            raise ConfigError(f"{path}: rows[{i}] lacks {missing}")
    return cascade


def cascade_row(cascade, name):
    return next((r for r in cascade["rows"] if r["name"] == name), None)


def check_evaluation(cascade, evaluation, path):
    """Rows are comparable only when scored alike: refuse held-out settings other than those cascade.json records."""
    recorded = cascade.get("evaluation")
    if recorded is not None and recorded != evaluation:
        raise ConfigError(f"{path}: its rows were scored with {recorded}, not {evaluation}; use the same held-out "
                          "settings or another out_dir")


def write_cascade_row(path, row, d: Dist, evaluation=None):
    """Add a row to cascade.json, or replace the row of the same name in place; atomic (main process only).
    `evaluation` (the held-out settings every row is scored with) is recorded beside the rows."""
    if d.is_main:
        cascade = read_cascade(path)
        rows = [r for r in cascade["rows"] if r["name"] != row["name"]]
        at = next((i for i, r in enumerate(cascade["rows"]) if r["name"] == row["name"]), len(rows))
        rows.insert(at, row)
        domains = sorted({dom for r in rows for dom in r["scores"]})
        record = {"domains": domains, "evaluation": evaluation or cascade.get("evaluation"), "rows": rows}
        _write_atomic(path, json.dumps(record, indent=2) + "\n")
    if d.world_size > 1:
        dist.barrier()
