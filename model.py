"""
NemotronH: the hybrid Mamba-2 / attention / MoE language model of Nemotron 3 Nano and Nemotron-Cascade 2,
in plain PyTorch.

The layer pattern string gives one character per layer:  M Mamba-2 mixer,  * attention,  E MoE,  - dense MLP.
Every layer is pre-norm with a residual:  h = h + mixer(RMSNorm(h)).  The end:  logits = lm_head(RMSNorm(h)).
There is no positional encoding anywhere: the Mamba layers carry position.

Parameter names equal the released HF checkpoint's (backbone.layers.{i}.mixer....), except that routed experts
are stacked into [E, I, H] / [E, H, I] tensors for the grouped matmul; from_pretrained / save_pretrained convert.
"""
import difflib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import moe_kernels

LAYER_KINDS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
HF_BLOCK_TYPES = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}  # transformers 5 names
# Tensors kept in fp32 whatever the model dtype: the SSM decay, the skip, and everything that picks experts
# (the correction bias in bf16 flips expert choices).
FP32_TENSORS = (".A_log", ".D", ".gate.weight", ".gate.e_score_correction_bias")

# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    # Field names are the HF NemotronH config.json's; defaults are Nemotron 3 Nano 30B-A3B.
    vocab_size: int = 131072
    hidden_size: int = 2688
    hybrid_override_pattern: str = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    # attention
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    # Mamba-2
    mamba_num_heads: int = 64
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    use_conv_bias: bool = True
    use_bias: bool = False                # in_proj / out_proj bias
    chunk_size: int = 128
    time_step_min: float = 0.001          # init range of dt
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple = (0.0, float("inf"))
    # MoE and dense MLP (relu^2, not gated)
    n_routed_experts: int = 128
    num_experts_per_tok: int = 6
    n_shared_experts: int = 1
    moe_intermediate_size: int = 1856
    moe_shared_expert_intermediate_size: int = 3712
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    intermediate_size: int = 1856         # dense MLP ('-') width
    mlp_bias: bool = False
    mlp_hidden_act: str = "relu2"
    mamba_hidden_act: str = "silu"
    # init and tokens
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    max_position_embeddings: int = 262144
    # ours, not HF's: which MoE kernels run ("auto" = Triton on CUDA, torch elsewhere)
    moe_impl: str = "auto"
    # ours, not HF's: aux-loss-free balancing step of e_score_correction_bias (MoE.update_correction_bias); 0 = off
    moe_bias_update_rate: float = 0.0

    def __post_init__(self):
        self.time_step_limit = tuple(float(v) for v in self.time_step_limit)
        self.validate()

    @property
    def num_hidden_layers(self):
        return len(self.hybrid_override_pattern)

    def validate(self):
        def bad(field, why):
            raise ValueError(f"ModelConfig.{field}: {why}")
        unknown = sorted(set(self.hybrid_override_pattern) - set(LAYER_KINDS))
        if not self.hybrid_override_pattern or unknown:
            bad("hybrid_override_pattern", f"unknown layer characters {unknown} in {self.hybrid_override_pattern!r}; "
                f"allowed: {''.join(LAYER_KINDS)}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"{self.num_key_value_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads}")
        if self.mamba_num_heads % self.n_groups:
            bad("n_groups", f"{self.n_groups} does not divide mamba_num_heads={self.mamba_num_heads}")
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            bad("num_experts_per_tok", f"{self.num_experts_per_tok} must be in [1, n_routed_experts="
                f"{self.n_routed_experts}]")
        if self.n_shared_experts not in (0, 1):
            bad("n_shared_experts", f"{self.n_shared_experts}: NemotronH has at most one shared expert")
        if (self.n_group, self.topk_group) != (1, 1):
            bad("n_group", f"group-limited routing (n_group={self.n_group}, topk_group={self.topk_group}) is not "
                "implemented; NemotronH uses 1/1")
        if self.mlp_hidden_act != "relu2":
            bad("mlp_hidden_act", f"{self.mlp_hidden_act!r}: only 'relu2' (NemotronH) is implemented")
        if self.mamba_hidden_act != "silu":
            bad("mamba_hidden_act", f"{self.mamba_hidden_act!r}: only 'silu' is implemented")
        if self.tie_word_embeddings:
            bad("tie_word_embeddings", "tied embeddings are not supported (NemotronH releases are untied)")
        if self.chunk_size < 1 or self.conv_kernel < 1:
            bad("chunk_size", "chunk_size and conv_kernel must be positive")
        if self.moe_impl not in moe_kernels.MOE_IMPLS:
            bad("moe_impl", f"{self.moe_impl!r} must be one of {moe_kernels.MOE_IMPLS}")
        if not self.moe_bias_update_rate >= 0:
            bad("moe_bias_update_rate", f"{self.moe_bias_update_rate} must be >= 0 (0 turns balancing off)")

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Build from an HF config.json dict. Unused HF fields are ignored; contradictions raise ValueError."""
        d = dict(d)
        pattern = d.get("hybrid_override_pattern")
        if d.get("layers_block_type") is not None:      # transformers 5 writes a list of block types
            to_char = {v: k for k, v in HF_BLOCK_TYPES.items()}
            unknown = [t for t in d["layers_block_type"] if t not in to_char]
            if unknown:
                raise ValueError(f"ModelConfig.layers_block_type: unknown block types {unknown}")
            from_list = "".join(to_char[t] for t in d["layers_block_type"])
            if pattern is not None and pattern != from_list:
                raise ValueError(f"ModelConfig.hybrid_override_pattern: {pattern!r} contradicts "
                                 f"layers_block_type {from_list!r}")
            d["hybrid_override_pattern"] = pattern = from_list
        n_layers = d.get("num_hidden_layers")
        if pattern is not None and n_layers is not None and n_layers != len(pattern):
            raise ValueError(f"ModelConfig.num_hidden_layers: {n_layers} contradicts hybrid_override_pattern "
                             f"{pattern!r} of length {len(pattern)}")
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known and v is not None})

    def to_hf(self) -> dict:
        """The HF config.json dict (transformers' NemotronHConfig reads it). moe_impl and moe_bias_update_rate are
        ours (run-time / training choices): left out."""
        d = asdict(self)
        d.pop("moe_impl")
        d.pop("moe_bias_update_rate")
        d["time_step_limit"] = list(self.time_step_limit)
        d.update(architectures=["NemotronHForCausalLM"], model_type="nemotron_h",
                 num_hidden_layers=self.num_hidden_layers, attention_bias=False, mamba_proj_bias=self.use_bias)
        return d

    @classmethod
    def from_path(cls, path) -> "ModelConfig":
        """The config of an HF checkpoint directory (its config.json) or of a config.json file."""
        return Model.config_from_pretrained(path) if os.path.isdir(path) else cls.from_json(path)

    @classmethod
    def from_json(cls, path) -> "ModelConfig":
        """A config.json, checked whole: an unknown key (a typo like `hiden_size`) or a missing field that fixes
        a tensor shape is an error naming it, never a silent 30B default."""
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object of config fields")
        ours = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in ours and k not in HF_CONFIG_KEYS and not k.startswith(("_", "mtp_"))]
        if unknown:
            hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, ours, 1, 0.8)) else k
                     for k in unknown[:8]] + ([f"and {len(unknown) - 8} more"] if len(unknown) > 8 else [])
            what = " (this is not a model config.json)" if len(unknown) > len(d) / 2 else ""
            raise ValueError(f"{path}: unknown key(s) {', '.join(hints)}{what}")
        pattern = d.get("hybrid_override_pattern") or ""
        if not pattern and isinstance(d.get("layers_block_type"), list):      # transformers 5's spelling
            pattern = "".join({v: k for k, v in HF_BLOCK_TYPES.items()}.get(t, "?") for t in d["layers_block_type"])
        needed = ["vocab_size", "hidden_size"] + [k for kind, keys in SHAPE_KEYS.items() if kind in pattern
                                                  for k in keys]
        missing = [k for k in needed if d.get(k) is None]
        if not pattern:
            missing.insert(0, "hybrid_override_pattern")
        if missing:
            raise ValueError(f"{path}: missing field(s) {', '.join(missing)} (no defaults: they fix the model's "
                             "shapes; see configs/tiny_model.json)")
        try:
            return cls.from_hf(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None


# The fields a config.json must set for each layer kind in its pattern (they fix tensor shapes).
SHAPE_KEYS = {"M": ["mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups"],
              "*": ["num_attention_heads", "num_key_value_heads", "head_dim"],
              "E": ["n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"],
              "-": ["intermediate_size"]}
# Keys an HF NemotronH config.json may hold that ModelConfig does not use (transformers' NemotronHConfig and
# PretrainedConfig fields): accepted and ignored. Anything else is refused as a likely typo.
HF_CONFIG_KEYS = set("""
    architectures model_type torch_dtype dtype transformers_version auto_map num_hidden_layers layers_block_type
    attention_bias attention_dropout hidden_dropout expand mamba_proj_bias mamba_ssm_cache_dtype residual_in_fp32
    sliding_window use_cache use_mamba_kernels moe_latent_size moe_shared_expert_overlap num_logits_to_keep
    num_nextn_predict_layers output_router_logits router_aux_loss_coef rope_theta rope_scaling hidden_act
    return_dict output_hidden_states output_attentions torchscript use_bfloat16 tf_legacy_loss pruned_heads
    chunk_size_feed_forward is_encoder_decoder is_decoder cross_attention_hidden_size add_cross_attention
    tie_encoder_decoder max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty
    temperature top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size
    encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores return_dict_in_generate
    forced_bos_token_id forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens
    begin_suppress_tokens finetuning_task id2label label2id tokenizer_class prefix sep_token_id
    decoder_start_token_id task_specific_params problem_type quantization_config
    attention_head_dim mamba_n_groups mamba_d_conv mamba_expand mamba_dt_min mamba_dt_max mamba_dt_limit
    mamba_dt_init_floor mamba_conv_bias mamba_chunk_size
""".split())  # the last line: other NemotronH ports' spellings (vLLM), accepted beside ours


def safetensors_shards(path, check=False):
    """The safetensors file names of an HF checkpoint directory (one file, or the shards its index names). With
    check=True every file's header is opened and read (cheap: no tensor data), so a missing, truncated or
    corrupt file is named before any work."""
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            try:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{index_path}: not a safetensors index (no readable weight_map: "
                                 f"{type(e).__name__} {e})") from None
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
    if check:
        for shard in shards:
            with _open_safetensors(os.path.join(path, shard), "cpu"):
                pass
    return shards


def _open_safetensors(file, device):
    """safe_open, with an error that names the file when it is missing, truncated or corrupt."""
    from safetensors import SafetensorError, safe_open
    try:
        return safe_open(file, framework="pt", device=device)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e}); it is missing, truncated or corrupt: "
                         "export or download it again") from None


# ----------------------------------------------------------------------------------------------------------------
# Norms


def cast(t, dtype=torch.float32):
    """t in dtype: t itself when it already is. Same result as t.to(dtype), without the call: in fp32 those no-op
    casts were 125 of the 678 ops a decode step issues (each a dispatch of a microsecond or two)."""
    return t if t.dtype == dtype else t.to(dtype)


class RMSNorm(nn.Module):
    """y = weight * x / rms(x), computed in fp32 (weight multiplied in fp32 too), cast back."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = cast(x)
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return cast(cast(self.weight) * xf, x.dtype)


class GatedGroupRMSNorm(nn.Module):
    """Mamba-2's output norm: y = groupRMSNorm(x * silu(z)) * weight, one RMS per group of channels, in fp32."""

    def __init__(self, dim, n_groups, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.n_groups, self.eps = n_groups, eps

    def forward(self, x, z):
        y = cast(x) * F.silu(cast(z))
        y = y.unflatten(-1, (self.n_groups, -1))
        y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + self.eps)
        return cast(self.weight) * y.flatten(-2)


# ----------------------------------------------------------------------------------------------------------------
# Mamba-2


def causal_conv1d(x, weight, bias, past=None, same_doc=None, lead=None):
    """
    Depthwise causal conv over time:  out[t, c] = bias[c] + sum_j weight[c, j] * x[t - (K-1) + j, c].
    x [B, T, C]; weight [C, K]; past [B, K-1, C] holds the inputs before x (zeros at a sequence start);
    same_doc [B, T, K] (optional) zeroes taps that reach into another packed document.
    lead [B] (optional): row b's first lead[b] inputs are padding (a cache continued with left-padded new
    tokens, or a frozen row's decode step, lead = T): its past is moved to just before its first real input, so
    the real inputs see the real history, not the padding, and a row of padding only keeps its past unchanged.
    Written as K shifted multiply-adds: as fast as F.conv1d on CPU, and the document mask fits in naturally.
    Returns (out [B, T, C], new_past [B, K-1, C]).
    """
    K, T = weight.shape[-1], x.shape[1]
    if past is None:
        past = x.new_zeros(x.shape[0], K - 1, x.shape[2])
    xp = torch.cat([cast(past, x.dtype), x], dim=1)
    if lead is not None and T == 1:  # a decode step: a frozen row (lead 1) keeps its past
        out, new_past = causal_conv1d(x, weight, bias, past)
        return out, torch.where(lead.bool()[:, None, None], cast(past, x.dtype), new_past)
    if lead is not None:  # [past, pad * p, real] -> [pad * p, past, real]: a gather along time
        j = torch.arange(K - 1 + T, device=x.device)[None]
        p = lead[:, None]
        src = torch.where(j < p, j + K - 1, torch.where(j < p + K - 1, j - p, j))
        xp = xp.gather(1, src.unsqueeze(-1).expand(-1, -1, xp.shape[2]))
    out = bias if bias is not None else 0
    for j in range(K):
        tap = xp[:, j:j + T] * weight[:, j]
        if same_doc is not None:
            tap = tap * same_doc[:, :, j:j + 1].to(x.dtype)
        out = out + tap
    return out, xp[:, xp.shape[1] - (K - 1):]


def segsum(a):
    """
    seg[..., i, j] = a[..., j+1] + ... + a[..., i] for j <= i, -inf above the diagonal; exp(seg) is the decay
    from step j to step i. Summed by masking and cumsum, not by differences of a cumsum: stable, and exact
    when a holds -inf (a document start), where a difference would give inf - inf = nan.
    """
    L = a.shape[-1]
    x = a.unsqueeze(-1).expand(*a.shape, L)                       # x[..., i, j] = a[..., i]
    below = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), diagonal=-1)
    seg = x.masked_fill(~below, 0).cumsum(dim=-2)
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device))
    return seg.masked_fill(~causal, float("-inf"))


def ssd_scan(x, dt, A, B, C, chunk_size, initial_state=None, reset=None, group_tokens=4096):
    """
    The Mamba-2 selective scan in its chunked (SSD) form. All fp32.
        S_t = exp(dt_t * A) * S_{t-1} + dt_t * outer(x_t, B_t)      state [p, n] per head
        y_t = S_t @ C_t
    x [b, T, h, p]; dt [b, T, h] (after softplus); A [h] (negative); B, C [b, T, g, n], head i uses group
    i // (h/g); reset [b, T] bool: the state is zeroed before step t (packed document starts).
    Within a chunk the recurrence is a masked decay matrix (attention-like); between chunks a short loop
    carries the chunk states. The outputs are computed group_tokens at a time, so without autograd only one
    group's [l, l] decay matrices (per head: the bulk of the memory) exist at once; under autograd the mixer
    bounds what is kept by running the scan over segments it recomputes (Mamba2Mixer.segment_tokens).
    Returns (y [b, T, h, p], final state [b, h, p, n]).
    """
    b, T, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    a = dt * A                                                     # log decay per step, <= 0
    if reset is not None:
        a = a.masked_fill(reset.unsqueeze(-1), float("-inf"))
    xdt = x * dt.unsqueeze(-1)
    pad = (-T) % chunk_size
    if pad:  # zero input and zero log-decay: padding steps change nothing
        xdt, a, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (xdt, a, B, C))
    c, l = (T + pad) // chunk_size, chunk_size
    xdt = xdt.reshape(b, c, l, g, r, p)
    B, C = B.reshape(b, c, l, g, n), C.reshape(b, c, l, g, n)
    a = a.reshape(b, c, l, g, r).permute(0, 1, 3, 4, 2)             # [b, c, g, r, l]

    # 1. each chunk's own contribution to the state at its end: decay from step l to the chunk end
    a_after = F.pad(a.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1))   # a_{l+1} + ... + a_last (shift, no diff)
    xdt_end = xdt * torch.exp(a_after).permute(0, 1, 4, 2, 3).unsqueeze(-1)     # [b, c, l, g, r, p]
    chunk_states = torch.einsum("bclgn,bclgrp->bcgrpn", B, xdt_end)

    # 2. carry states across chunks: S_c = exp(sum of chunk c's log decays) * S_{c-1} + chunk_states_c
    state = x.new_zeros(b, g, r, p, n) if initial_state is None else initial_state.reshape(b, g, r, p, n).float()
    chunk_decay = torch.exp(a.sum(-1))                              # [b, c, g, r]
    start_states = []
    for ci in range(c):
        start_states.append(state)
        state = state * chunk_decay[:, ci, ..., None, None] + chunk_states[:, ci]
    start_states = torch.stack(start_states, dim=1)                  # [b, c, g, r, p, n]

    # 3. outputs, a group of chunks at a time (without autograd, only one group's [l, l] matrices exist at once)
    per = max(1, group_tokens // l)
    y = torch.cat([_chunk_outputs(xdt[:, s:s + per], a[:, s:s + per], B[:, s:s + per], C[:, s:s + per],
                                  start_states[:, s:s + per]) for s in range(0, c, per)], dim=1)
    y = y.reshape(b, c * l, h, p)[:, :T]
    return y, state.reshape(b, h, p, n)


def _chunk_outputs(xdt, a, B, C, start_states):
    """y of a group of chunks: within each chunk y_l = sum_{s <= l} (C_l . B_s) exp(a_{s+1} + ... + a_l) dt_s x_s,
    plus the carried-in state seen from inside the chunk, C_l . S_start exp(a_1 + ... + a_l)."""
    decay = torch.exp(segsum(a))                                    # [b, c, g, r, l, s]
    CB = torch.einsum("bclgn,bcsgn->bcgls", C, B)
    y = torch.einsum("bcgrls,bcsgrp->bclgrp", CB.unsqueeze(3) * decay, xdt)
    return y + torch.einsum("bclgn,bcgrpn,bcgrl->bclgrp", C, start_states, torch.exp(a.cumsum(-1)))


def ssm_step(state, x, dt, A, B, C):
    """
    One token of the same recurrence, for decoding: S = exp(dt A) S + dt x B^T;  y = S C.
    state [b, h, p, n] fp32 is updated in place (it is the cache's own tensor); x [b, h, p]; dt [b, h];
    B, C [b, g, n]. Returns (y [b, h, p], state).
    """
    b, h, p, n = state.shape
    g = B.shape[1]
    S = state.view(b, g, h // g, p, n)                       # heads grouped: B and C broadcast, not repeated
    S.mul_(torch.exp(dt * A).view(b, g, -1, 1, 1))
    S.addcmul_((dt.unsqueeze(-1) * x).view(b, g, -1, p, 1), B.view(b, g, 1, 1, n))    # + outer(dt x, B)
    # elementwise, not bmm: b*h matrix-vector products of [p, n] are 3x slower through bmm on CPU
    y = (S * C.view(b, g, 1, 1, n)).sum(-1).view(b, h, p)
    return y, state


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.head_dim, self.n_groups, self.d_state = (
            cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size)
        self.d_inner = self.n_heads * self.head_dim                 # not expand * hidden
        self.conv_dim = self.d_inner + 2 * self.n_groups * self.d_state
        self.in_proj = nn.Linear(cfg.hidden_size, self.d_inner + self.conv_dim + self.n_heads, bias=cfg.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.conv_kernel, groups=self.conv_dim,
                                bias=cfg.use_conv_bias)           # kept as nn.Conv1d for the checkpoint's names
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = GatedGroupRMSNorm(self.d_inner, self.n_groups, cfg.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.d_inner, cfg.hidden_size, bias=cfg.use_bias)

    # Under autograd, sequences longer than this run the conv + scan + gated norm segment by segment (the conv
    # tail and the SSM state carried across), each segment recomputed in backward: what a Mamba layer keeps per
    # token is its in_proj output and its norm output, whatever T, and the [l, l] decay matrices and the fp32
    # copies exist for one segment at a time.
    segment_tokens = 4096

    def forward(self, u, valid=None, doc=None, cache=None, lead=None):
        """u [B, T, H]; valid [B, T] bool (False = padding); doc: dict with reset [B, T] and same_doc [B, T, K];
        lead [B]: leading padding per row of a cache continuation (see causal_conv1d)."""
        T = u.shape[1]
        zxbcdt = self.in_proj(u)
        if cache is None and T > self.segment_tokens and torch.is_grad_enabled():
            ys, past, state, G = [], None, None, self.segment_tokens
            for s in range(0, T, G):
                seg = (None if valid is None else valid[:, s:s + G],
                       None if doc is None else {k: t[:, s:s + G] for k, t in doc.items()})
                y, past, state = checkpoint(self.mix, zxbcdt[:, s:s + G], *seg, past, state, use_reentrant=False)
                ys.append(y)
                past = past.clone()         # a view of the whole segment's conv input: keep only the K-1 rows
            return self.out_proj(torch.cat(ys, dim=1))
        y, conv_past, ssm_state = self.mix(zxbcdt, valid, doc, cache["conv"] if cache else None,
                                           cache["ssm"] if cache else None, step=cache is not None and T == 1,
                                           lead=lead)
        if cache is not None and torch.is_grad_enabled():
            # a continuation that trains (rollouts sharing a prompt, common.rollout_logprobs): new tensors, so
            # the state the prompt's pass handed over stays as autograd saved it
            cache["conv"], cache["ssm"] = conv_past, ssm_state
        elif cache is not None:     # in place: the cache's tensors are fixed buffers (a CUDA graph replays them)
            cache["conv"].copy_(conv_past)
            cache["ssm"].copy_(ssm_state)                             # (a no-op after ssm_step: the same tensor)
        return self.out_proj(y)

    def mix(self, zxbcdt, valid, doc, conv_past=None, ssm_state=None, step=False, lead=None):
        """in_proj output -> gated, normed SSM output [B, T, d_inner] in the input's dtype, continuing from
        conv_past [B, K-1, conv_dim] and ssm_state [B, h, p, n] (None = a sequence start); returns (y, conv_past,
        ssm_state) after the last token. step: one token, ssm_state updated in place. A padding token changes
        neither state: its input is zeroed and its dt is 0 (no decay), and `lead` keeps the conv history."""
        z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        if valid is not None:           # padding must not leak into the state: zero inputs, no decay
            xBC = xBC * valid.unsqueeze(-1).to(xBC.dtype)
        conv_w, conv_b = self.conv1d.weight.squeeze(1), self.conv1d.bias     # fp32 under FSDP bf16: compute
        conv_b = cast(conv_b, xBC.dtype) if conv_b is not None else None     # in the activations' dtype
        xBC, conv_past = causal_conv1d(xBC, cast(conv_w, xBC.dtype), conv_b, past=conv_past,
                                       same_doc=doc["same_doc"] if doc else None, lead=lead)
        xBC = F.silu(xBC)
        x, B, C = xBC.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        x = cast(x).unflatten(-1, (self.n_heads, self.head_dim))
        B = cast(B).unflatten(-1, (self.n_groups, self.d_state))
        C = cast(C).unflatten(-1, (self.n_groups, self.d_state))
        dt = F.softplus(cast(dt) + cast(self.dt_bias))
        lo, hi = self.cfg.time_step_limit
        if (lo, hi) != (0.0, float("inf")):
            dt = dt.clamp(lo, hi)
        if valid is not None:
            dt = dt * valid.unsqueeze(-1)
        A = -torch.exp(cast(self.A_log))

        if step:
            y, ssm_state = ssm_step(ssm_state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
            y = y.unsqueeze(1)
        else:
            y, ssm_state = ssd_scan(x, dt, A, B, C, self.cfg.chunk_size, initial_state=ssm_state,
                                    reset=doc["reset"] if doc else None)
        y = y + x * cast(self.D)[:, None]
        y = self.norm(y.flatten(-2), z)                               # gate before the norm
        return cast(y, zxbcdt.dtype), conv_past, ssm_state


# ----------------------------------------------------------------------------------------------------------------
# Attention (GQA, no positional encoding)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, attn_mask=None, cache=None, pos=0):
        """attn_mask [B, 1, T, S] bool (True = may attend) or None for plain causal; cache: dict of k, v buffers
        [B, n_kv, max_len, head_dim] written at positions [pos, pos + T). A decode step (see
        Model.hidden_states) passes pos as a device tensor [1] and goes to decode_attention."""
        bsz, T, _ = x.shape
        q = self.q_proj(x).view(bsz, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, T, self.n_kv, self.head_dim).transpose(1, 2)
        if isinstance(pos, torch.Tensor):
            return self.o_proj(decode_attention(q, k, v, cache, pos, attn_mask).reshape(bsz, 1, -1))
        if cache is not None and torch.is_grad_enabled():       # a continuation that trains (see Mamba2Mixer)
            cache["k"] = k = torch.cat([cache["k"][:, :, :pos], k], dim=2) if pos else k
            cache["v"] = v = torch.cat([cache["v"][:, :, :pos], v], dim=2) if pos else v
        elif cache is not None:
            cache["k"][:, :, pos:pos + T] = k
            cache["v"][:, :, pos:pos + T] = v
            k, v = cache["k"][:, :, :pos + T], cache["v"][:, :, :pos + T]
        if isinstance(attn_mask, Segments):
            return self.o_proj(segment_attention(q, k, v, attn_mask).transpose(1, 2).reshape(bsz, T, -1))
        # kv head j serves q heads [j*g, (j+1)*g): enable_gqa repeats them inside SDPA
        # attn_mask None means plain causal for a fresh sequence, or no mask at all for one decoded token
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(bsz, T, -1))


class Segments:
    """
    Each row cut into runs of consecutive positions that attend causally among themselves only: packed
    documents, and the padding before (left-padded prompts) or after (packed rows) the real tokens. Built once
    per forward from doc_ids and the attention mask (one host sync), and used by every attention layer instead
    of a dense [B, 1, T, S] mask. spans[b] = [(start, end), ...] covering row b.
    """

    def __init__(self, ids):
        """ids [B, T]: equal adjacent values = same run (a document id, or -1 / -2 for padding)."""
        starts = F.pad(ids[:, 1:] != ids[:, :-1], (1, 0), value=True)
        b, t = starts.nonzero(as_tuple=True)
        self.spans = [[] for _ in range(ids.shape[0])]
        for row, start in zip(b.tolist(), t.tolist()):
            if self.spans[row]:
                self.spans[row][-1] = (self.spans[row][-1][0], start)
            self.spans[row].append((start, ids.shape[1]))


def segment_attention(q, k, v, segments):
    """
    Causal attention within each run of Segments: per run one fused SDPA call (flash kernels on CUDA and CPU),
    so the extra memory is O(T) however long the row, and the g = n_heads / n_kv query heads sharing a kv head
    use it in place (enable_gqa, no repeated K/V). q [B, n_heads, T, d]; k, v [B, n_kv, S, d], S >= T: the
    queries are the last T positions (a prefill continuing a cache, S = cached + T), and the runs cover all S.
    """
    gqa, T, S = q.shape[1] != k.shape[1], q.shape[2], k.shape[2]
    if all(len(spans) == 1 for spans in segments.spans):          # one run per row: the batch in one call
        return _causal_attention(q, k, v, gqa)
    rows = []
    for b, spans in enumerate(segments.spans):
        rows.append(torch.cat([_causal_attention(q[b:b + 1, :, max(s, S - T) - (S - T):e - (S - T)],
                                                 k[b:b + 1, :, s:e], v[b:b + 1, :, s:e], gqa)
                               for s, e in spans if e > S - T], dim=2))
    return torch.cat(rows)


def _causal_attention(q, k, v, gqa):
    """SDPA, causal with the queries aligned to the last keys (lower right: query i sees keys up to S - T + i);
    plain is_causal when T == S. torch runs the lower-right form in its flash kernel where that applies (CUDA)
    and with a materialised [T, S] mask, one for all rows and heads, elsewhere."""
    if q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    from torch.nn.attention.bias import causal_lower_right
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]),
                                          enable_gqa=gqa)


def decode_attention(q, k, v, cache, pos, valid):
    """
    One new token per row against the KV cache. q [B, n_heads, 1, d]; k, v [B, n_kv, 1, d] are written at
    position pos (a device tensor [1]: no host sync, and the same kernels every step, as a CUDA graph needs);
    valid [B, 1, 1, S] bool: which of the first S cached positions hold real tokens (S = pos + 1, or the whole
    cache for fixed shapes). GQA without repeating K/V: the g = n_heads / n_kv query heads that share a kv head
    are one [g, d] x [d, S] matmul against it. Softmax in fp32. Returns [B, n_heads, d].
    """
    B, n_kv, S, d = q.shape[0], k.shape[1], valid.shape[-1], q.shape[-1]
    cache["k"].index_copy_(2, pos, k)
    cache["v"].index_copy_(2, pos, v)
    q = q.reshape(B, n_kv, -1, d)                                   # heads [j*g, (j+1)*g) share kv head j
    scores = cast(torch.matmul(q, cache["k"][:, :, :S].transpose(-1, -2))) * d ** -0.5   # [B, n_kv, g, S]
    probs = cast(scores.masked_fill(~valid, float("-inf")).softmax(dim=-1), q.dtype)
    return torch.matmul(probs, cache["v"][:, :, :S]).reshape(B, -1, d)


# ----------------------------------------------------------------------------------------------------------------
# MLP and MoE (relu^2, not gated)


class MLP(nn.Module):
    def __init__(self, hidden, width, bias=False):
        super().__init__()
        self.up_proj = nn.Linear(hidden, width, bias=bias)
        self.down_proj = nn.Linear(width, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(F.relu(self.up_proj(x)).square())


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # Picks experts, never weighs them; updated by the aux-loss-free balancing rule, not by the optimizer.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))


class Experts(nn.Module):
    """
    Routed experts stacked for the grouped matmul: up_proj [E, I, H], down_proj [E, H, I], each expert's matrix
    shaped like an nn.Linear weight (the checkpoint's per-expert tensors). Stored transposed: the memory holds
    each w[e].T contiguous ([E, H, I] and [E, I, H]), so y = x @ w[e].T is a plain (NN) GEMM. On CPU, MKL's
    small-row GEMM reads that 1.3x faster than a transposed operand: a decode step has 1-8 rows per expert,
    and bench_sample.py's decode step at 16 rows is 11-14% faster. A layout, not a shape: names, shapes, init
    values and checkpoints are the same either way. FSDP2 shards contiguous tensors only (common.shard_model
    makes them so; sample.sampling_weights gathers into this one).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, I, H = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.up_proj = nn.Parameter(torch.empty(E, H, I).transpose(1, 2))
        self.down_proj = nn.Parameter(torch.empty(E, I, H).transpose(1, 2))

    def forward(self, x, topk_ids, topk_weights, impl):
        # a module call (not a bare use of the tensors), so that FSDP2 gathers these as a group of their own
        return moe_kernels.moe_experts(x, topk_ids, topk_weights, self.up_proj, self.down_proj, impl=impl)


class MoE(nn.Module):
    """
    Routed experts (top-k of E by sigmoid score + correction bias) plus the always-on shared expert.

    Aux-loss-free balancing (DeepSeek-V3): every training forward adds its per-expert token counts to
    `expert_load` (a metric to log, e.g. max/mean); the trainer calls `update_correction_bias()` once per optimizer
    step, which moves e_score_correction_bias by cfg.moe_bias_update_rate toward under-loaded experts (0 = off).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_shared_expert_intermediate_size, cfg.mlp_bias)
                               if cfg.n_shared_experts else None)
        # [E] fp32 tokens routed to each expert since the last update_correction_bias(); None before any.
        # A plain attribute, not a buffer: never saved, never cast by set_dtype.
        self.expert_load = None

    def forward(self, x):
        cfg = self.cfg
        impl = moe_kernels.resolve_moe_impl(cfg.moe_impl, x.device)
        flat = x.reshape(-1, x.shape[-1])
        logits = F.linear(cast(flat), cast(self.gate.weight))                    # router in fp32
        topk_weights, topk_ids = moe_kernels.route_topk(
            logits, self.gate.e_score_correction_bias, cfg.num_experts_per_tok, cfg.routed_scaling_factor,
            cfg.norm_topk_prob, impl=impl)
        if self.training and torch.is_grad_enabled() and not self._in_backward():  # not the checkpoint recompute
            ids = topk_ids.flatten()
            load = torch.zeros(cfg.n_routed_experts, device=x.device).index_add_(
                0, ids, torch.ones(ids.numel(), device=x.device))            # no host sync (unlike bincount)
            self.expert_load = load if self.expert_load is None else self.expert_load + load
        out = self.experts(flat, topk_ids, topk_weights, impl).view_as(x)
        if self.shared_experts is not None:                                         # always on, no gate
            out = out + self.shared_experts(x)
        return out

    @torch.no_grad()
    def update_correction_bias(self):
        """
        The aux-loss-free balancing rule, once per optimizer step:  bias_e += rate * sign(mean_load - load_e),
        so over-loaded experts are picked less and under-loaded ones more (the bias only picks, never weighs).
        A no-op when cfg.moe_bias_update_rate is 0 (the default). Returns the load it used (None if no training
        forward ran since the last call) and resets it. With data parallelism, all-reduce (sum) expert_load over
        the ranks before calling, so that every rank applies the same update.
        """
        load, self.expert_load = self.expert_load, None
        rate = self.cfg.moe_bias_update_rate
        if load is not None and rate > 0:
            self.gate.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))
        return load

    @staticmethod
    def _in_backward():
        """True inside the autograd engine, e.g. while gradient checkpointing recomputes a forward."""
        return getattr(torch._C, "_current_graph_task_id", lambda: -1)() != -1


# ----------------------------------------------------------------------------------------------------------------
# The model


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        if kind == "mamba":
            self.mixer = Mamba2Mixer(cfg)
        elif kind == "attention":
            self.mixer = Attention(cfg)
        elif kind == "moe":
            self.mixer = MoE(cfg)
        else:
            self.mixer = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, h, valid=None, doc=None, attn_mask=None, cache=None, pos=0, lead=None):
        x = self.norm(h)
        if self.kind == "mamba":
            x = self.mixer(x, valid=valid, doc=doc, cache=cache, lead=lead)
        elif self.kind == "attention":
            x = self.mixer(x, attn_mask=attn_mask, cache=cache, pos=pos)
        else:
            x = self.mixer(x)
        return h + x


class InferenceCache:
    """
    Decoding state for a batch of left-padded rows, one entry per layer:
      attention: k, v [B, n_kv, max_len, head_dim] (model dtype)
      Mamba:     conv [B, K-1, conv_dim] (the last K-1 conv inputs), ssm [B, n_heads, head_dim, state] (fp32)
    `valid` [B, max_len] marks cached positions that hold real tokens; `pos` counts positions written so far
    (the same for every row: rows are left-padded, and a row continued after others, as the turns of episodes of
    different lengths, has masked gaps, harmless because attention has no positional encoding), and `pos_t`
    holds the same count on the device for decode steps. Every tensor is updated in place, so a captured CUDA
    graph can replay a decode step; under autograd (a continuation that trains: rollouts sharing a prompt,
    common.shared_prompt_logprobs) the layers put new tensors in its dict instead, so what autograd saved stays.
    static_shapes: decode steps attend over all max_len positions (masked) instead of the first pos + 1, so
    every step runs the same kernels on the same shapes (what CUDA-graph capture needs).
    """

    def __init__(self, cfg: ModelConfig, batch_size, max_len, device=None, dtype=torch.float32,
                 static_shapes=False):
        self.max_len, self.pos, self.static_shapes = max_len, 0, static_shapes
        self.pos_t = torch.zeros(1, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.layers = []
        for c in cfg.hybrid_override_pattern:
            if c == "*":
                shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
                self.layers.append(dict(k=torch.zeros(shape, device=device, dtype=dtype),
                                        v=torch.zeros(shape, device=device, dtype=dtype)))
            elif c == "M":
                conv_dim = cfg.mamba_num_heads * cfg.mamba_head_dim + 2 * cfg.n_groups * cfg.ssm_state_size
                self.layers.append(dict(
                    conv=torch.zeros(batch_size, cfg.conv_kernel - 1, conv_dim, device=device, dtype=dtype),
                    ssm=torch.zeros(batch_size, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size,
                                    device=device, dtype=torch.float32)))
            else:
                self.layers.append(None)

    @property
    def batch_size(self):
        return self.valid.shape[0]

    def decode_step(self, live=None):
        """Positions for one decoded token per row: marks position pos valid, on the device (no host sync); with
        live [B] bool, only for the live rows (a frozen row's token is padding: it changes none of its state).
        Returns (pos_t, the attention mask [B, 1, 1, S] over the first S cached positions)."""
        if self.pos + 1 > self.max_len:
            raise ValueError(f"cache holds {self.max_len} positions, all used")
        if live is None:
            self.valid.index_fill_(1, self.pos_t, True)
        else:
            self.valid.index_copy_(1, self.pos_t, live[:, None])
        S = self.max_len if self.static_shapes else self.pos + 1
        return self.pos_t, self.valid[:, None, None, :S]

    def advance(self, T):
        self.pos += T
        self.pos_t += T

    def window(self, rows: slice, start: int):
        """
        A view of this cache's rows `rows` and positions [start, max_len), as a cache of its own at position 0:
        a prefill into it writes into this cache. generate() prefills a bucket of shorter prompts this way: left-
        padded by `start` positions that are never written (never valid, zero state), without computing them.
        """
        w = object.__new__(InferenceCache)
        w.max_len, w.pos, w.static_shapes = self.max_len - start, 0, self.static_shapes
        w.pos_t = torch.zeros_like(self.pos_t)
        w.valid = self.valid[rows, start:]
        w.layers = [None if layer is None else {key: t[rows, :, start:] if key in ("k", "v") else t[rows]
                                                 for key, t in layer.items()} for layer in self.layers]
        return w

    def extend(self, max_len):
        """Room for max_len positions in all (a multi-turn episode's history grows turn by turn): the attention
        layers' buffers and `valid` are copied into longer ones; the Mamba state does not grow."""
        extra = max_len - self.max_len
        if extra <= 0:
            return self
        pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], extra, *t.shape[3:])], dim=2) if t.dim() == 4 \
            else torch.cat([t, t.new_zeros(t.shape[0], extra)], dim=1)
        self.valid = pad(self.valid)
        for layer in self.layers:
            if layer is not None and "k" in layer:
                layer["k"], layer["v"] = pad(layer["k"]), pad(layer["v"])
        self.max_len = max_len
        return self

    def take(self, rows: torch.Tensor):
        """A new cache holding copies of rows `rows`, at this one's position (this one is left as it is)."""
        part = object.__new__(InferenceCache)
        part.max_len, part.pos, part.static_shapes = self.max_len, self.pos, self.static_shapes
        part.pos_t, part.valid = self.pos_t.clone(), self.valid[rows]
        part.layers = [None if layer is None else {key: t[rows] for key, t in layer.items()} for layer in self.layers]
        return part

    @staticmethod
    def concat(parts):
        """One cache of the rows of `parts` (caches of equal max_len) in order, at the furthest one's position: a
        row from a part that stopped earlier has invalid (masked) positions up to there."""
        first = max(parts, key=lambda c: c.pos)
        out = object.__new__(InferenceCache)
        out.max_len, out.pos, out.static_shapes = first.max_len, first.pos, first.static_shapes
        out.pos_t = first.pos_t.clone()
        out.valid = torch.cat([c.valid for c in parts])
        out.layers = [None if layer is None else {key: torch.cat([c.layers[i][key] for c in parts]) for key in layer}
                      for i, layer in enumerate(first.layers)]
        return out

    def select(self, rows: torch.Tensor):
        """Keep, reorder or repeat rows (e.g. drop finished rows, or copy a prompt's prefill n times)."""
        self.valid = self.valid[rows]
        for layer in self.layers:
            if layer is not None:
                for key in layer:
                    layer[key] = layer[key][rows]
        return self


def build_attn_mask(T, valid_k, q_pos, doc_q=None, doc_k=None):
    """
    [B, 1, T, S] bool: query i (absolute position q_pos + i) may see key j if j <= q_pos + i, key j is a real
    token and, for packed sequences, both lie in the same document. Each query always sees itself, so rows of
    padding never get an all-masked softmax (their outputs are unused).
    """
    S = valid_k.shape[1]
    qi = torch.arange(T, device=valid_k.device)[:, None] + q_pos
    kj = torch.arange(S, device=valid_k.device)[None, :]
    mask = (kj <= qi)[None] & valid_k[:, None, :]
    if doc_q is not None:
        mask = mask & (doc_q[:, :, None] == doc_k[:, None, :])
    mask = mask | (kj == qi)[None]
    return mask.unsqueeze(1)


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = nn.ModuleDict(dict(
            embeddings=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList([Block(config, LAYER_KINDS[c]) for c in config.hybrid_override_pattern]),
            norm_f=RMSNorm(config.hidden_size, config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    # -- forward ---------------------------------------------------------------------------------------------

    def hidden_states(self, input_ids, attention_mask=None, doc_ids=None, cache=None):
        """
        Final normed hidden states [B, T, H].
        attention_mask [B, T]: 1 for real tokens, 0 for (left) padding; with a cache that holds tokens already,
        padding before a row's new tokens (or a row of padding only: a frozen row) leaves its state as it was, so
        rows of different lengths can each continue their own history. doc_ids [B, T]: packed-document ids;
        tokens only see earlier tokens of their own document, and the Mamba state restarts at each document.
        cache: an InferenceCache to prefill (T > 1) or step (T == 1); it advances by T positions.
        """
        bsz, T = input_ids.shape
        valid = attention_mask.bool() if attention_mask is not None else None
        pos = cache.pos if cache is not None else 0
        doc, attn_mask = None, None
        step = cache is not None and T == 1 and doc_ids is None      # one decoded token per row
        lead = None
        if cache is not None and valid is not None and cache.pos > 0:
            # a continuation with left-padded new tokens (the next turn of an episode), or a step in which some
            # rows are frozen: the padding per row must leave the conv history alone (see causal_conv1d)
            lead = (~valid[:, 0]).int() if T == 1 else (~valid).int().cumprod(dim=1).sum(dim=1)
        if step:
            # position and mask on the device: no host sync
            pos, attn_mask = cache.decode_step(None if valid is None else valid[:, 0])
        elif cache is not None:
            if pos + T > cache.max_len:
                raise ValueError(f"cache holds {cache.max_len} positions, {pos} used, {T} more asked")
            cache.valid[:, pos:pos + T] = True if valid is None else valid
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("doc_ids (packed documents) are for training; they cannot be used with a cache")
            K = self.config.conv_kernel
            prev = F.pad(doc_ids, (K - 1, 0), value=-1).unfold(1, K, 1)      # [B, T, K]: the conv taps' docs
            doc = dict(reset=F.pad(doc_ids[:, 1:] != doc_ids[:, :-1], (1, 0), value=True),
                       same_doc=prev == doc_ids.unsqueeze(-1))
            # padding (attention_mask 0) is a run of its own; doc_ids must not use -2
            attn_mask = Segments(doc_ids if valid is None else doc_ids.masked_fill(~valid, -2))
        elif cache is not None and not step:
            # a prefill from position 0, or a piece of a long prompt's prefill after the first (every row's
            # padding before all of its tokens): causal within the left padding and within the prompt, the new
            # tokens the last of each run (Segments); a later multi-token step with a gap in some row's positions
            # (an episode's next turn after rows of other lengths) takes the dense mask
            seen = cache.valid[:, :pos + T]
            if pos == 0 or bool((seen[:, 1:] >= seen[:, :-1]).all()):
                attn_mask = Segments(seen.long())
            else:
                attn_mask = build_attn_mask(T, seen, pos)
        elif valid is not None and not step:            # left padding: two runs per row, no dense mask
            attn_mask = Segments(valid.long())

        h = self.backbone.embeddings(input_ids)
        for i, block in enumerate(self.backbone.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and layer_cache:
                # a continuation that trains (common.shared_prompt_logprobs): the layer's state goes in and comes
                # out as tensors, so the recompute in backward starts from the state this forward started from
                keys = list(layer_cache)

                def run(h, *state, block=block, keys=keys):
                    c = dict(zip(keys, state))
                    return (block(h, valid=valid, doc=doc, attn_mask=attn_mask, cache=c, pos=pos, lead=lead),
                            *(c[k] for k in keys))
                h, *state = checkpoint(run, h, *(layer_cache[k] for k in keys), use_reentrant=False)
                layer_cache.update(zip(keys, state))
            elif self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, valid, doc, attn_mask, layer_cache, pos, lead, use_reentrant=False)
            else:
                h = block(h, valid=valid, doc=doc, attn_mask=attn_mask, cache=layer_cache, pos=pos, lead=lead)
        if cache is not None:
            cache.advance(T)
        return self.backbone.norm_f(h)

    def forward(self, input_ids, attention_mask=None, doc_ids=None, cache=None, targets=None, temperature=1.0,
                chunk_tokens=None):
        """logits [B, T, V]; or, given targets, their log-probs [B, T] (see token_logprobs)."""
        h = self.hidden_states(input_ids, attention_mask, doc_ids, cache)
        if targets is None:
            return self.lm_head(h)
        # chunked: never [B*T, V] fp32 logits at once; under autograd each chunk is recomputed in backward. Only
        # the positions with a target go through lm_head: prompts (SFT's system and user turns, a rollout's
        # prompt) are half or more of a packed row's tokens, and lm_head is a quarter of the tiny model's FLOPs
        chunk_tokens = chunk_tokens or max(64, 2**24 // self.config.vocab_size)
        flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        scored = (flat_t >= 0).nonzero().squeeze(1)
        lp = ChunkedLogprobs.apply(flat_h[scored], self.lm_head.weight, flat_t[scored], temperature, chunk_tokens)
        return lp.new_zeros(flat_t.shape).index_put((scored,), lp).view_as(targets)

    def token_logprobs(self, input_ids, targets, attention_mask=None, doc_ids=None, temperature=1.0,
                       chunk_tokens=None):
        """
        log p(targets[b, t] | input_ids[b, :t+1]) as [B, T] fp32, without materialising [B*T, V] fp32 logits:
        the lm_head and log-softmax run over chunks of tokens, and under autograd each chunk is recomputed in
        backward instead of stored. Targets < 0 (ignored positions) get logprob 0. chunk_tokens defaults to
        about 16M logits per chunk (128 tokens at vocab 131072). Goes through __call__, so FSDP's hooks run.
        """
        return self(input_ids, attention_mask=attention_mask, doc_ids=doc_ids, targets=targets,
                    temperature=temperature, chunk_tokens=chunk_tokens)

    # -- init and size ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, generator=None):
        """
        Training from scratch: normal(0, initializer_range) for projections and embeddings, residual-output
        projections scaled by 1/sqrt(2 * n_layers) (GPT-2), and Mamba-2's own init for A, dt and D.
        Works on an FSDP2-sharded model (built on meta, fully_shard-ed, to_empty-ed) as on a plain one, with the
        same values: each tensor is drawn in blocks of rows, each block from its own generator seeded by
        (one draw from `generator` or the global RNG, tensor, block), and a process draws only the blocks that
        overlap its rows. So no process ever holds a whole tensor, and 1 or N processes start from one model.
        """
        base = int(torch.randint(2**62, (), generator=generator))
        for i, (name, p) in enumerate(self.named_parameters()):
            local, first = _local_rows(p)
            if not local.numel():
                continue
            row = max(1, math.prod(p.shape[1:]))
            block_rows = max(1, 2**20 // row)
            for b in range(first // block_rows, -(-(first + local.shape[0]) // block_rows)):
                gen = torch.Generator(local.device).manual_seed(hash((base, i, b)) % 2**63)
                lo, hi = b * block_rows, min((b + 1) * block_rows, p.shape[0])
                block = self._init_values(name, (hi - lo, *p.shape[1:]), gen, local.device)
                a, z = max(lo, first), min(hi, first + local.shape[0])        # the rows this process holds
                local[a - first:z - first].copy_(block[a - lo:z - lo])
        for name, b in self.named_buffers():
            b.zero_()                                                       # e_score_correction_bias

    def _init_values(self, name, shape, gen, device):
        cfg, std = self.config, self.config.initializer_range
        out_std = std / math.sqrt(2 * cfg.num_hidden_layers) if cfg.rescale_prenorm_residual else std
        leaf = name.rsplit(".", 1)[-1]
        t = torch.empty(shape, device=device)
        if name.endswith(("norm.weight", "norm_f.weight")) or leaf == "D":
            return t.fill_(1.0)
        if leaf == "bias":
            return t.zero_()
        if leaf == "A_log":         # A = -uniform(1, 16)
            return t.uniform_(1, 16, generator=gen).log_()
        if leaf == "dt_bias":       # softplus(dt_bias) = dt ~ log-uniform(time_step_min, time_step_max)
            lo, hi = math.log(cfg.time_step_min), math.log(cfg.time_step_max)
            dt = torch.exp(t.uniform_(lo, hi, generator=gen)).clamp(min=cfg.time_step_floor)
            return dt + torch.log(-torch.expm1(-dt))                        # inverse softplus
        if "conv1d" in name:
            bound = 1 / math.sqrt(cfg.conv_kernel)                          # nn.Conv1d's default fan-in bound
            return t.uniform_(-bound, bound, generator=gen)
        if name.endswith(("out_proj.weight", "o_proj.weight", "down_proj.weight", "experts.down_proj")):
            return t.normal_(0.0, out_std, generator=gen)
        return t.normal_(0.0, std, generator=gen)

    def num_params(self):
        """{'total', 'active' (what one token uses: k of E routed experts), 'embedding'} parameter counts."""
        cfg = self.config
        total = sum(p.numel() for p in self.parameters())
        routed = sum(p.numel() for n, p in self.named_parameters() if ".experts." in n)
        active = total - routed + routed * cfg.num_experts_per_tok // cfg.n_routed_experts
        return dict(total=total, active=active, embedding=self.backbone.embeddings.weight.numel())

    def set_dtype(self, dtype):
        """Cast to dtype, keeping FP32_TENSORS in fp32 (use this rather than .to(dtype), which casts them too)."""
        for name, t in list(self.named_parameters()) + list(self.named_buffers()):
            t.data = t.data.to(torch.float32 if name.endswith(FP32_TENSORS) else dtype)
        return self

    def new_cache(self, batch_size, max_len, static_shapes=False):
        """KV and conv caches in the dtype of the layers that fill them (the Mamba state is always fp32)."""
        p = self.lm_head.weight
        return InferenceCache(self.config, batch_size, max_len, device=p.device, dtype=p.dtype,
                              static_shapes=static_shapes)

    # -- HF checkpoints --------------------------------------------------------------------------------------

    @staticmethod
    def hf_layout(state_dict):
        """(hf_name, our name, expert index or None) for each tensor of the released layout: one per expert."""
        for name, t in state_dict.items():
            if name.endswith(("experts.up_proj", "experts.down_proj")):
                prefix, proj = name.rsplit(".", 1)
                for e in range(t.shape[0]):
                    yield f"{prefix}.{e}.{proj}.weight", name, e
            else:
                yield name, name, None

    def hf_tensors(self, state_dict=None):
        """Yield (hf_name, tensor) in the released layout."""
        sd = state_dict if state_dict is not None else self.state_dict()
        for hf_name, name, e in self.hf_layout(sd):
            yield hf_name, sd[name] if e is None else sd[name][e]

    @staticmethod
    def config_from_pretrained(path, moe_impl=None) -> "ModelConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            hint = ""
            if os.path.exists(os.path.join(path, "export", "config.json")):        # a stage's out_dir
                hint = f"; the run's HF export is {os.path.join(path, 'export')}"
            elif os.path.exists(os.path.join(path, "trainer_state.json")) or os.path.basename(
                    os.path.normpath(path)) == "checkpoints":                       # a training checkpoint
                run_dir = os.path.dirname(os.path.normpath(path))
                run_dir = os.path.dirname(run_dir) if os.path.basename(run_dir) == "checkpoints" else run_dir
                hint = (f"; {path} is a training checkpoint (sharded model + optimizer for resuming), not a model: "
                        f"load the run's HF export, {os.path.join(run_dir, 'export')}")
            raise FileNotFoundError(f"{cfg_path}: no config.json in checkpoint directory {path}{hint}")
        config = ModelConfig.from_json(cfg_path)
        if moe_impl is not None:
            config.moe_impl = moe_impl
            config.validate()
        return config

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, moe_impl=None):
        """
        Load an HF NemotronH directory (config.json + model.safetensors or model.safetensors.index.json shards).
        The model is built on the meta device, allocated once, and filled one tensor at a time from the shards,
        so a 30B checkpoint never sits in memory twice. dtype None = the config's torch_dtype (fp32 if absent);
        FP32_TENSORS stay fp32 regardless.
        """
        config = cls.config_from_pretrained(path, moe_impl)
        if dtype is None:
            with open(os.path.join(path, "config.json")) as f:
                raw = json.load(f)
            dtype = getattr(torch, raw.get("torch_dtype") or raw.get("dtype") or "float32")
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=torch.device(device or "cpu"))
        model.set_dtype(dtype)
        return model.load_hf_weights(path)

    @torch.no_grad()
    def load_hf_weights(self, path):
        """
        Fill this model's tensors from the safetensors of an HF directory, one tensor at a time, checking every
        name and shape: missing, unexpected and mis-shaped tensors are reported together in one ValueError.
        Works on an FSDP2-sharded model too (built on meta, fully_shard-ed, to_empty-ed): each process then reads
        from disk only the rows of its own shard (dim 0, as fully_shard splits it), and only its own experts.
        """
        ours = dict(self.state_dict(keep_vars=True))
        # hf name -> (our tensor, expert index or None, the released tensor's global shape)
        targets = {hf_name: (ours[name], e, tuple(ours[name].shape[1:] if e is not None else ours[name].shape))
                   for hf_name, name, e in self.hf_layout(ours)}

        shards = safetensors_shards(path)
        seen, unexpected, misshaped = set(), [], []
        device = str(self.lm_head.weight.device)
        for shard in shards:
            with _open_safetensors(os.path.join(path, shard), device) as f:
                for name in f.keys():
                    if name.startswith("mtp."):          # multi-token-prediction head: not used here
                        continue
                    seen.add(name)
                    found = tuple(f.get_slice(name).get_shape())
                    if name not in targets:
                        unexpected.append(f"{name} {found} (in {shard})")
                        continue
                    param, e, expected = targets[name]
                    if found != expected:
                        misshaped.append(f"{name}: expected {expected}, found {found} (in {shard})")
                        continue
                    local, first_row = _local_rows(param)
                    if e is None:
                        local.copy_(f.get_slice(name)[first_row:first_row + local.shape[0]])
                    elif first_row <= e < first_row + local.shape[0]:       # this process holds expert e
                        local[e - first_row].copy_(f.get_tensor(name))
        missing = [f"{n}: expected {expected}" for n, (_, _, expected) in targets.items() if n not in seen]
        if missing or unexpected or misshaped:
            report = [f"checkpoint {path} does not match its config.json:"]
            for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
                if items:
                    report.append(f"  {title} ({len(items)}):")
                    report += [f"    {s}" for s in items]
            raise ValueError("\n".join(report))
        return self

    def save_pretrained(self, path, max_shard_bytes=5 * 2**30, state_dict=None, dtype=None):
        """
        Write config.json + safetensors in the released naming (sharded with model.safetensors.index.json above
        max_shard_bytes), so transformers' NemotronHForCausalLM loads it. Written to a temporary directory beside
        `path` and swapped in only when complete: a crash mid-save never leaves a half-written checkpoint.
        state_dict: full tensors to write instead of this module's own (e.g. gathered from FSDP shards);
        dtype: cast on the way out, FP32_TENSORS excepted.
        """
        from safetensors.torch import save_file

        def out(name, t):
            t = t.detach()
            if dtype is not None and t.is_floating_point():
                t = t.to(torch.float32 if name.endswith(FP32_TENSORS) else dtype)
            return t.contiguous()

        tensors = [(n, out(n, t)) for n, t in self.hf_tensors(state_dict)]
        shards, size = [[]], 0
        for n, t in tensors:
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((n, t))
            size += nbytes
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-save-", dir=parent)
        try:
            cfg = self.config.to_hf()
            cfg["torch_dtype"] = str(dtype or self.lm_head.weight.dtype).removeprefix("torch.")
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(cfg, f, indent=2)
            if len(shards) == 1:
                save_file(dict(shards[0]), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            else:
                weight_map = {}
                for i, shard in enumerate(shards):
                    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                    save_file(dict(shard), os.path.join(tmp, fname), metadata={"format": "pt"})
                    weight_map.update({n: fname for n, _ in shard})
                total = sum(t.numel() * t.element_size() for _, t in tensors)
                with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            _swap_dir(tmp, path)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)


def _local_rows(param):
    """(this process's part of a tensor, the global index of its first row along dim 0). A plain tensor is all
    of itself; an FSDP2 DTensor sharded on dim 0 over a 1-D mesh holds rows [r * ceil(n / W), ...) of rank r."""
    from torch.distributed.tensor import DTensor, Shard
    if not isinstance(param, DTensor):
        return param.data, 0
    if param.device_mesh.ndim != 1 or param.placements[0] != Shard(0):
        raise ValueError(f"load_hf_weights supports 1-D meshes sharded on dim 0, got {param.placements}")
    rank, world = param.device_mesh.get_local_rank(), param.device_mesh.size()
    return param.to_local(), rank * math.ceil(param.shape[0] / world)


def _chunk_logits(h, targets, lm_weight, temperature):
    logits = F.linear(h, lm_weight).float() / temperature
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logits, torch.where(targets >= 0, picked - logits.logsumexp(-1), 0.0)


class ChunkedLogprobs(torch.autograd.Function):
    """
    logprob[t] = log_softmax(h[t] @ W^T / temperature)[targets[t]] over chunks of tokens, [N] fp32. Backward
    recomputes each chunk's logits (nothing [N, V] is ever stored) and sums the lm_head weight gradient over the
    chunks in fp32: a bf16 running sum loses the small late chunks (measured 28% off at 256K tokens), while each
    chunk's own [V, H] product, a matmul over at most chunk tokens, is accurate in the compute dtype.
        d logprob[t] / d logits[t] = (onehot(targets[t]) - softmax(logits[t])) / temperature
    """

    @staticmethod
    def forward(ctx, h, weight, targets, temperature, chunk):
        ctx.save_for_backward(h, weight, targets)
        ctx.temperature, ctx.chunk = temperature, chunk
        if h.shape[0] == 0:                  # nothing to score (an empty pass): still a node, so lm_head gets a grad
            return torch.zeros(0, dtype=torch.float32, device=h.device)
        return torch.cat([_chunk_logits(h[s:s + chunk], targets[s:s + chunk], weight, temperature)[1]
                          for s in range(0, h.shape[0], chunk)])

    @staticmethod
    def backward(ctx, grad):
        h, weight, targets = ctx.saved_tensors
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] \
            else None
        for s in range(0, h.shape[0], ctx.chunk):
            hs, ts = h[s:s + ctx.chunk], targets[s:s + ctx.chunk]
            logits, _ = _chunk_logits(hs, ts, weight, ctx.temperature)
            g = torch.where(ts >= 0, grad[s:s + ctx.chunk], 0.0)                   # ignored targets: no gradient
            dlogits = logits.softmax(-1).mul_(-g[:, None])
            dlogits.scatter_add_(-1, ts.clamp(min=0)[:, None], g[:, None])
            dlogits = dlogits.div_(ctx.temperature).to(weight.dtype)
            if dh is not None:
                dh[s:s + ctx.chunk] = dlogits @ weight
            if dw is not None:
                dw += (dlogits.T @ hs).float()
        return dh, dw.to(weight.dtype) if dw is not None else None, None, None, None


def _swap_dir(src, dst):
    """Replace directory dst by src with a rename; the old dst is removed only after the new one is in place."""
    if os.path.exists(dst):
        old = dst.rstrip("/") + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        os.replace(src, dst)


if __name__ == "__main__":
    # Inspect a config: parameter counts (on the meta device, so even the 30B config costs nothing), and for
    # small models one timed forward pass. With --memory, the memory model's report (memory.py).
    import argparse
    import sys
    import time

    if "--memory" in sys.argv:
        import memory
        memory.main([a for a in sys.argv[1:] if a != "--memory"])
        raise SystemExit
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("config", nargs="?", default="configs/tiny_model.json", help="HF-style config.json")
    ap.add_argument("--batch", type=int, default=4, help="batch size of the test forward pass")
    ap.add_argument("--seq-len", "--seq_len", type=int, default=256, help="sequence length of the test forward pass")
    ap.add_argument("--memory", action="store_true", help="the memory model's report instead (python memory.py "
                    "--help lists its options)")
    ap.add_argument("--max-params", type=float, default=1e9, help="skip the forward pass above this many parameters")
    args = ap.parse_args()
    config = ModelConfig.from_json(args.config)
    with torch.device("meta"):
        counts = Model(config).num_params()
    print(f"{args.config}: pattern {config.hybrid_override_pattern} ({config.num_hidden_layers} layers)")
    print("parameters: " + ", ".join(f"{k} {v / 1e6:,.2f}M" for k, v in counts.items()))
    if counts["total"] <= args.max_params:
        torch.manual_seed(0)
        model = Model(config).eval()
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len))
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = model(ids)
        dt = time.perf_counter() - t0
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        print(f"forward {tuple(ids.shape)} -> logits {tuple(logits.shape)} in {dt * 1e3:.0f} ms "
              f"({ids.numel() / dt:,.0f} tokens/s); loss at init {loss:.3f} (ln V = {math.log(config.vocab_size):.3f})")
