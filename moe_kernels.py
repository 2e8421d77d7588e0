"""
MoE ops: routing, token alignment (permutation), grouped matmul, unpermutation; forward and backward.

Every op has a plain-torch reference here. It is the CPU path, the oracle the tests compare the Triton kernels
against, and the readable spec of what each kernel computes. The model calls only the two entry points at the
bottom, `route_topk` and `moe_experts`, and picks the implementation with `ModelConfig.moe_impl`:

    auto    Triton on CUDA, torch elsewhere
    torch   the reference below (uses torch._grouped_mm where it is fast, else a per-expert loop)
    triton  the Triton kernels (on CPU only under TRITON_INTERPRET=1, for tests)

Shapes: T tokens, H hidden, E routed experts, k experts per token, I expert width, P = T*k (token, slot) pairs.
Expert weights are stacked like nn.Linear weights: w_up [E, I, H], w_down [E, H, I].

The Triton path (vLLM's fused_moe alignment + ScatterMoE's gather/scatter GEMMs and backward):

    route      _route_topk_fwd_kernel      logits [T, E] -> weights [T, k] fp32, ids [T, k]
    align      _align_*_kernel (4 small)   ids -> pairs sorted by expert, segments padded to BLOCK_M, expert per block
    up         _grouped_mm_kernel          u[row]  = x[token(row)] @ w_up[e]^T              (gather, grouped rows)
    down       _grouped_mm_kernel          y[pair] = w_pair * relu(u[row])^2 @ w_down[e]^T  (scatter, gate epilogue)
    combine    torch                       out[t]  = sum_j y[t*k + j]                        (fp32 sum over k slots)

Backward (autograd.Function `_MoEExpertsFn`; u is the only activation saved besides the inputs):

    g, du      _grouped_mm_kernel          g = dout[token] @ w_down[e];  dgate = <relu(u)^2, g>;  du = w g 2relu(u)
    dW_down    _grouped_dw_kernel          dW_down[e] = sum over e's rows of (w dout[token])^T relu(u)^2
    dW_up      _grouped_dw_kernel          dW_up[e]   = sum over e's rows of du^T x[token]
    dx         _grouped_mm_kernel          dx[pair]   = du[row] @ w_up[e], then summed over the k slots of a token

Triton decides between compiling and interpreting when a function is decorated with @triton.jit, i.e. when
triton (whose tl.sigmoid, tl.argmax, ... are jit functions too) and this module are imported. Without CUDA the
interpreter is the only way these kernels can run, so this module turns it on (TRITON_INTERPRET=1, unless the
variable is already set) before importing triton. It is still opt-in: `auto` picks the torch path on CPU.
"""
import os
import sys
from collections import namedtuple

import torch
import torch.nn.functional as F

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

MOE_IMPLS = ("auto", "torch", "triton")


def resolve_moe_impl(impl: str, device: torch.device) -> str:
    """Turn the config's `moe_impl` into the implementation that runs on `device`."""
    if impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("moe_impl='triton' on CPU needs TRITON_INTERPRET=1 (Triton's interpreter); "
                         "use moe_impl='torch' or 'auto' for CPU runs")
    return impl


# ----------------------------------------------------------------------------------------------------------------
# Torch reference ops


def route_topk_torch(router_logits, correction_bias, top_k, routed_scaling_factor=1.0, norm_topk_prob=True,
                     scoring="sigmoid"):
    """
    DeepSeek-V3 style routing (NemotronH uses it with sigmoid scoring):
        s      = sigmoid(logits)                          # [T, E] fp32
        chosen = topk(s + correction_bias, k)             # the bias only picks experts, it never weighs them
        w      = s[chosen] / sum(s[chosen]) * scale       # renormalised over the k chosen, then scaled
    Returns (topk_weights [T, k] fp32, topk_ids [T, k] int64). Differentiable w.r.t. router_logits.
    """
    logits = router_logits.float()
    scores = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(dim=-1)
    choice = scores.detach() + correction_bias.float() if correction_bias is not None else scores.detach()
    topk_ids = choice.topk(top_k, dim=-1, sorted=False).indices
    topk_weights = scores.gather(1, topk_ids)
    if norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_weights * routed_scaling_factor, topk_ids


def permute_tokens_torch(topk_ids, num_experts):
    """
    Sort the T*k (token, slot) pairs by expert so that each expert's rows are contiguous.
    Returns (order [T*k]: flat pair index in expert order, counts [E]: rows per expert).
    Row r of the grouped layout is token order[r] // k, slot order[r] % k.
    """
    flat = topk_ids.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


# The padded grouped layout the Triton GEMMs iterate over (see align_tokens_torch for a worked example).
Alignment = namedtuple("Alignment", "sorted_pair_ids block_expert seg_start counts block_m num_pairs top_k")


def _max_blocks(num_pairs, num_experts, block_m):
    # sum_e ceil(c_e / BM) <= (P + E*(BM-1)) // BM, and every used block holds at least one real pair (<= P)
    return min(num_pairs, (num_pairs + num_experts * (block_m - 1)) // block_m)


def align_tokens_torch(topk_ids, num_experts, block_m):
    """
    The layout the grouped matmul runs over: (token, slot) pairs sorted by expert (stable), each expert's segment
    padded to a multiple of block_m rows with the sentinel P = T*k, and the expert of every block_m-row block.

    Worked example: T=3, k=2, E=3, block_m=4, topk_ids = [[2, 0], [0, 2], [2, 1]]
        pairs p = t*k + j       p0:e2  p1:e0  p2:e0  p3:e2  p4:e2  p5:e1       (P = 6 is the sentinel)
        counts                  [2, 1, 3]       -> padded to [4, 4, 4], seg_start [0, 4, 8]
        sorted_pair_ids         [1 2 6 6 | 5 6 6 6 | 0 3 4 6]                  (grouped row r -> pair, or 6)
        block_expert            [0, 1, 2]                                      (-1 for unused trailing blocks)
    Grouped row 9 is pair 3: token 3 // 2 = 1, slot 3 % 2 = 1, expert 2.

    Returns Alignment(sorted_pair_ids [max_blocks*block_m] int32, block_expert [max_blocks] int32,
    seg_start [E] int32, counts [E] int32, block_m, num_pairs P, top_k k); max_blocks = _max_blocks(P, E, block_m).
    """
    P = topk_ids.numel()
    dev = topk_ids.device
    flat = topk_ids.flatten()
    order, counts = permute_tokens_torch(topk_ids, num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    seg_start = padded.cumsum(0) - padded
    expert = flat[order]                                                     # expert of each sorted pair
    rank = torch.arange(P, device=dev) - (counts.cumsum(0) - counts)[expert]  # position inside its segment
    max_blocks = _max_blocks(P, num_experts, block_m)
    sorted_pair_ids = torch.full((max_blocks * block_m,), P, dtype=torch.int32, device=dev)
    sorted_pair_ids[seg_start[expert] + rank] = order.to(torch.int32)
    block_expert = torch.full((max_blocks,), -1, dtype=torch.int32, device=dev)
    used = torch.repeat_interleave(torch.arange(num_experts, device=dev), padded // block_m)
    block_expert[:used.numel()] = used.to(torch.int32)
    return Alignment(sorted_pair_ids, block_expert, seg_start.to(torch.int32), counts.to(torch.int32), block_m,
                     P, topk_ids.shape[-1])


def _use_grouped_mm(x):
    # torch._grouped_mm is fast for fp32 on CPU and bf16 on CUDA Hopper+; elsewhere the loop is the safe path.
    if not hasattr(torch, "_grouped_mm"):
        return False
    return (x.device.type == "cpu" and x.dtype == torch.float32) or \
        (x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0))


def grouped_matmul_torch(x, w, counts):
    """
    y[rows of expert e] = x[rows of expert e] @ w[e].T for every expert, rows grouped contiguously by expert.
    x [M, K] (M = counts.sum()), w [E, N, K], counts [E]. Returns [M, N].
    """
    if _use_grouped_mm(x):
        offs = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    chunks = x.split(counts.tolist())
    return torch.cat([xe @ w[e].T for e, xe in enumerate(chunks)], dim=0)


def unpermute_torch(y, order, topk_weights, num_tokens):
    """
    out[t] = sum_j topk_weights[t, j] * y[row of (t, j)], in fp32 (like the reference implementation), cast back.
    y [T*k, H] in grouped (expert) order.
    """
    k = topk_weights.shape[1]
    w = topk_weights.flatten()[order].unsqueeze(-1)
    out = torch.zeros(num_tokens, y.shape[-1], device=y.device, dtype=torch.float32)
    out.index_add_(0, order // k, y.float() * w)
    return out.to(y.dtype)


def moe_experts_torch(x, topk_ids, topk_weights, w_up, w_down):
    """out[t] = sum_j w_tj * down_e(relu(up_e(x_t))^2) with e = topk_ids[t, j]."""
    num_tokens, k = topk_ids.shape
    order, counts = permute_tokens_torch(topk_ids, w_up.shape[0])
    h = grouped_matmul_torch(x[order // k], w_up, counts)       # gathered copy: the Triton kernel avoids it
    h = F.relu(h).square()
    y = grouped_matmul_torch(h, w_down, counts)
    return unpermute_torch(y, order, topk_weights, num_tokens)


def moe_experts_loop(x, topk_ids, topk_weights, w_up, w_down):
    """The naive baseline: one Python iteration per expert (index_select, two matmuls, index_add)."""
    out = torch.zeros(x.shape[0], x.shape[1], device=x.device, dtype=torch.float32)
    for e in range(w_up.shape[0]):
        tok, slot = torch.where(topk_ids == e)
        if tok.numel():
            y = F.relu(x[tok] @ w_up[e].T).square() @ w_down[e].T
            out.index_add_(0, tok, y.float() * topk_weights[tok, slot].unsqueeze(-1))
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
#
# Conventions: program ids are named after the tile they own; `rows` are rows of the padded grouped layout,
# `pair` = t*k + j is a (token, slot) pair, `token` = pair // k. Matmuls accumulate in fp32 (tl.dot with acc).
# Row offsets are cast to int64 before multiplying by strides (P*H passes 2^31 around 64K tokens at Nano shapes).


@triton.jit
def _router_scores(logits_ptr, rows, cols, row_ok, col_ok, stride_lt, SOFTMAX: tl.constexpr):
    """The [BLOCK_T, BLOCK_E] tile of router scores: elementwise sigmoid, or softmax over the real experts."""
    logits = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_lt + cols[None, :],
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if SOFTMAX:
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        scores = p / tl.sum(p, axis=1)[:, None]
    else:
        scores = tl.sigmoid(logits)
    return scores


# Routing. One program owns BLOCK_T token rows and all E experts (BLOCK_E = next_pow2(E) columns):
#
#       logits tile [BLOCK_T, BLOCK_E] --sigmoid/softmax--> s;   choice = s + bias  (padding columns = -inf)
#       repeat k times:  e_j = argmax(choice) (lowest index on ties),  s_j = s[e_j],  choice[e_j] = -inf
#       w_j = s_j / (sum_j s_j + 1e-20) * scale          (or s_j * scale without renormalisation)
#
# The k picks live in a [BLOCK_T, BLOCK_K] register tile, filled one column per iteration with tl.where, so no
# scatter to memory is needed. Picks come out in descending order of choice.
@triton.jit
def _route_topk_fwd_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, T, E, stride_lt, scale,
                           K: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTMAX: tl.constexpr, NORM: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_t = tl.program_id(0)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    row_ok = rows < T
    col_ok = cols < E
    scores = _router_scores(logits_ptr, rows, cols, row_ok, col_ok, stride_lt, SOFTMAX)
    choice = scores
    if HAS_BIAS:
        choice += tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    choice = tl.where(col_ok[None, :], choice, float("-inf"))

    ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for j in tl.static_range(K):
        best = tl.argmax(choice, axis=1, tie_break_left=True)               # [BLOCK_T]
        hit = cols[None, :] == best[:, None]                                # one-hot of the pick
        s_j = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        ids = tl.where(kcols[None, :] == j, best[:, None], ids)
        w = tl.where(kcols[None, :] == j, s_j[:, None], w)
        choice = tl.where(hit, float("-inf"), choice)
    if NORM:
        w = w / (tl.sum(w, axis=1)[:, None] + 1e-20)
    w = w * scale
    out = rows[:, None].to(tl.int64) * K + kcols[None, :]
    ok = row_ok[:, None] & (kcols[None, :] < K)
    tl.store(weights_ptr + out, w, mask=ok)
    tl.store(ids_ptr + out, ids.to(tl.int64), mask=ok)


# Routing backward, same tiling. With S = sum_j s_j, D = S + 1e-20, c = scale and g_j = dL/dw_j:
#
#       dL/ds_j = c * (g_j / D - sum_i g_i s_i / D^2)        (renormalised; c * g_j otherwise)
#       ds      = scatter of dL/ds_j into columns e_j (zero elsewhere: unpicked scores get no gradient via w)
#       dlogits = ds * s * (1 - s)                           sigmoid
#       dlogits = s * (ds - sum(ds * s))                     softmax (every column gets gradient)
#
# Scores are recomputed from the logits (cheaper than saving [T, E]); the correction bias gets no gradient.
@triton.jit
def _route_topk_bwd_kernel(logits_ptr, ids_ptr, dw_ptr, dlogits_ptr, T, E, stride_lt, scale,
                           K: tl.constexpr, SOFTMAX: tl.constexpr, NORM: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_t = tl.program_id(0)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    row_ok = rows < T
    col_ok = cols < E
    mask = row_ok[:, None] & col_ok[None, :]
    scores = _router_scores(logits_ptr, rows, cols, row_ok, col_ok, stride_lt, SOFTMAX)
    pk = rows[:, None].to(tl.int64) * K + kcols[None, :]
    pk_ok = row_ok[:, None] & (kcols[None, :] < K)
    ids = tl.load(ids_ptr + pk, mask=pk_ok, other=-1).to(tl.int32)        # [BLOCK_T, BLOCK_K]
    g = tl.load(dw_ptr + pk, mask=pk_ok, other=0.0)
    # picked scores s_j, as a [BLOCK_T, BLOCK_K] tile
    s_sel = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for j in tl.static_range(K):
        id_j = tl.sum(tl.where(kcols[None, :] == j, ids, 0), axis=1)
        s_j = tl.sum(tl.where(cols[None, :] == id_j[:, None], scores, 0.0), axis=1)
        s_sel = tl.where(kcols[None, :] == j, s_j[:, None], s_sel)
    if NORM:
        D = tl.sum(s_sel, axis=1) + 1e-20
        dot = tl.sum(g * s_sel, axis=1)
        ds_sel = scale * (g / D[:, None] - (dot / (D * D))[:, None])
    else:
        ds_sel = scale * g
    ds = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for j in tl.static_range(K):
        id_j = tl.sum(tl.where(kcols[None, :] == j, ids, 0), axis=1)
        ds_j = tl.sum(tl.where(kcols[None, :] == j, ds_sel, 0.0), axis=1)
        ds += tl.where(cols[None, :] == id_j[:, None], ds_j[:, None], 0.0)
    if SOFTMAX:
        dlogits = scores * (ds - tl.sum(ds * scores, axis=1)[:, None])
    else:
        dlogits = ds * scores * (1.0 - scores)
    tl.store(dlogits_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], dlogits, mask=mask)


# Alignment, step 1 of 4: count. Program c owns the BLOCK_P pairs [c*BLOCK_P, (c+1)*BLOCK_P) and writes how many
# of them go to each expert into row c of a [C, E] table (a one-hot [BLOCK_P, BLOCK_E] summed over pairs). No
# atomics: the table keeps the chunks apart, which is what makes the final order stable and deterministic.
@triton.jit
def _align_count_kernel(ids_ptr, chunk_counts_ptr, P, E, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    c = tl.program_id(0)
    offs = c * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.arange(0, BLOCK_E)
    e = tl.load(ids_ptr + offs, mask=offs < P, other=-1).to(tl.int32)
    onehot = (e[:, None] == cols[None, :]).to(tl.int32)
    tl.store(chunk_counts_ptr + c * E + cols, tl.sum(onehot, axis=0), mask=cols < E)


# Alignment, step 2 of 4: per-expert scan over chunks. Program e walks column e of the [C, E] table in pieces of
# BLOCK_C chunks, replaces it in place by its exclusive prefix sum (rows of expert e in earlier chunks) and writes
# the column total, counts[e].
@triton.jit
def _align_scan_kernel(chunk_counts_ptr, counts_ptr, C, E, BLOCK_C: tl.constexpr):
    e = tl.program_id(0)
    carry = 0
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        n = tl.load(chunk_counts_ptr + cs * E + e, mask=cs < C, other=0)
        tl.store(chunk_counts_ptr + cs * E + e, carry + tl.cumsum(n, axis=0) - n, mask=cs < C)
        carry += tl.sum(n, axis=0)
    tl.store(counts_ptr + e, carry)


# Alignment, step 3 of 4 (one program): pad each expert's count to a multiple of BLOCK_M, lay the segments end to
# end (seg_start = exclusive cumsum of the padded counts), and label every BLOCK_M-row block with its expert:
#       expert(b) = #{e : seg_end[e] <= b*BLOCK_M}     (empty experts have empty segments and are skipped)
# computed as a [BLOCK_B, BLOCK_E] comparison; blocks past the last segment get -1 (the GEMMs skip them).
@triton.jit
def _align_blocks_kernel(counts_ptr, seg_start_ptr, block_expert_ptr, E, max_blocks,
                         BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr):
    cols = tl.arange(0, BLOCK_E)
    n = tl.load(counts_ptr + cols, mask=cols < E, other=0)
    padded = tl.cdiv(n, BLOCK_M) * BLOCK_M
    seg_end = tl.cumsum(padded, axis=0)
    tl.store(seg_start_ptr + cols, seg_end - padded, mask=cols < E)
    used_blocks = tl.sum(padded, axis=0) // BLOCK_M
    for b0 in range(0, max_blocks, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        ended = (seg_end[None, :] <= b[:, None] * BLOCK_M) & (cols[None, :] < E)
        expert = tl.sum(ended.to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(b < used_blocks, expert, -1), mask=b < max_blocks)


# Alignment, step 4 of 4: scatter. Program c recomputes its chunk's one-hot; the running count down each column
# (tl.cumsum over pairs) gives every pair its rank among the chunk's pairs of the same expert, so
#       row(pair) = seg_start[e] + (rows of e in earlier chunks) + (rank inside this chunk)
# and sorted_pair_ids[row] = pair. Within an expert pairs keep their original order (a stable sort by expert).
@triton.jit
def _align_scatter_kernel(ids_ptr, chunk_offsets_ptr, seg_start_ptr, sorted_pair_ptr, P, E,
                          BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    c = tl.program_id(0)
    offs = c * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = offs < P
    cols = tl.arange(0, BLOCK_E)
    e = tl.load(ids_ptr + offs, mask=ok, other=-1).to(tl.int32)
    onehot = (e[:, None] == cols[None, :]).to(tl.int32)
    rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1
    base = tl.load(seg_start_ptr + e, mask=ok, other=0) + tl.load(chunk_offsets_ptr + c * E + e, mask=ok, other=0)
    tl.store(sorted_pair_ptr + base + rank, offs, mask=ok)


# Grouped matmul, one launch for all experts. Program (pid_m, pid_n) owns rows [pid_m*BLOCK_M, +BLOCK_M) of the
# padded grouped layout (all of one expert e = block_expert[pid_m]) and columns [pid_n*BLOCK_N, +BLOCK_N):
#
#                 K (BLOCK_K steps)                N                                 N
#             +-----------------+         +-----------------+              +-----------------+
#   BLOCK_M   | A rows, gathered|    @    | W[e]^T  tile    |   ---->      | C rows (grouped |
#   rows of e | by index        |         | [BLOCK_K,BLOCK_N]|             | or scattered)   |
#             +-----------------+         +-----------------+              +-----------------+
#
#   A row r = a[token(r)]      when GATHER_A (x or dout, read in place: no permuted copy of the activations)
#           = a[r]             otherwise (a tensor already in grouped layout, e.g. u)
#   RELU2_A: A = relu(A)^2 on load (the down projection reads the up projection's pre-activation u)
#   acc     = A @ W[e]^T  with W[e] read through strides, so W[e] itself (transposed) is the same kernel
#   epilogue:
#     DGATE:     acc is g = dout[token] @ w_down[e] (backward of the down projection). Store the partial row
#                dot <relu(u)^2, g> over this column block (= this block's share of dL/dgate, summed over pid_n
#                by the caller), then acc = gate * g * 2 relu(u) = du.
#     GATE_C:    acc *= gate[pair]  (the combine weight, applied once per row)
#     SCATTER_C: store row r at c[pair(r)] (pair-major [P, N]), else at c[r] (grouped layout)
# Padding rows (sentinel pair = P) load zeros and store nothing; blocks labelled -1 return at once. Programs are
# ordered in GROUP_M-tall column groups (Triton matmul tutorial) so that neighbours share W[e] tiles in L2.
@triton.jit
def _grouped_mm_kernel(a_ptr, w_ptr, c_ptr, sorted_pair_ptr, block_expert_ptr, gate_ptr, u_ptr, dgate_ptr,
                       N, K, num_pairs, top_k, num_blocks,
                       stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_cm, stride_cn,
                       stride_um, stride_un,
                       GATHER_A: tl.constexpr, RELU2_A: tl.constexpr, SCATTER_C: tl.constexpr,
                       GATE_C: tl.constexpr, DGATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_in_group = GROUP_M * num_pid_n
    first_m = (pid // pids_in_group) * GROUP_M
    group_m = min(num_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_in_group) % group_m
    pid_n = (pid % pids_in_group) // group_m

    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ptr + rows)
    row_ok = pair < num_pairs
    if GATHER_A:
        a_rows = (pair // top_k).to(tl.int64)
    else:
        a_rows = rows.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if RELU2_A:
            r = tl.maximum(a.to(tl.float32), 0.0)
            a = (r * r).to(a_ptr.dtype.element_ty)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if DGATE or GATE_C:
        gate = tl.load(gate_ptr + pair, mask=row_ok, other=0.0)
    if DGATE:
        u = tl.load(u_ptr + rows[:, None].to(tl.int64) * stride_um + offs_n[None, :] * stride_un,
                    mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        r = tl.maximum(u, 0.0)
        h = (r * r).to(u_ptr.dtype.element_ty).to(tl.float32)       # h exactly as the forward's down proj saw it
        tl.store(dgate_ptr + pid_n * num_pairs + pair, tl.sum(acc * h, axis=1), mask=row_ok)
        acc = acc * gate[:, None] * (2.0 * r)
    if GATE_C:
        acc = acc * gate[:, None]
    if SCATTER_C:
        c_rows = pair.to(tl.int64)
    else:
        c_rows = rows.to(tl.int64)
    c_ptrs = c_ptr + c_rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


# Weight gradient, one launch for all experts: dW[e] = sum over expert e's rows r of dY[r]^T A[r]   ([N, K]).
# Program (e, tile) owns one [BLOCK_N, BLOCK_K] tile of dW[e] and walks e's contiguous grouped rows
# [seg_start[e], seg_start[e] + counts[e]) BLOCK_R at a time:
#
#       acc[BLOCK_N, BLOCK_K] += dY^T [BLOCK_N, BLOCK_R]  @  A [BLOCK_R, BLOCK_K]
#
#   dY row r = dy[token(r)] (* gate[pair(r)] when GATE_DY)   when GATHER_DY: dout read in place, scaled on load
#            = dy[r]                                         otherwise (du, grouped)
#   A  row r = a[token(r)] when GATHER_A (x), else a[r], with relu(.)^2 on load when RELU2_A (h from u)
# Each tile is written once (no atomics), so the result is deterministic; an expert with no rows gets zeros.
@triton.jit
def _grouped_dw_kernel(dy_ptr, a_ptr, dw_ptr, sorted_pair_ptr, seg_start_ptr, counts_ptr, gate_ptr,
                       N, K, top_k,
                       stride_dym, stride_dyn, stride_am, stride_ak, stride_dwe, stride_dwn, stride_dwk,
                       GATHER_DY: tl.constexpr, GATE_DY: tl.constexpr, GATHER_A: tl.constexpr,
                       RELU2_A: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    e = tl.program_id(0)
    pid = tl.program_id(1)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    offs_n = (pid // num_pid_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = (pid % num_pid_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    k_ok = offs_k < K
    start = tl.load(seg_start_ptr + e)
    count = tl.load(counts_ptr + e)

    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for r0 in range(0, count, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < count
        rows = (start + offs_r).to(tl.int64)
        pair = tl.load(sorted_pair_ptr + rows, mask=r_ok, other=0)
        token = (pair // top_k).to(tl.int64)
        if GATHER_DY:
            dy_rows = token
        else:
            dy_rows = rows
        dy = tl.load(dy_ptr + dy_rows[None, :] * stride_dym + offs_n[:, None] * stride_dyn,   # [BLOCK_N, BLOCK_R]
                     mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        if GATE_DY:
            gate = tl.load(gate_ptr + pair, mask=r_ok, other=0.0)
            dy = (dy.to(tl.float32) * gate[None, :]).to(dy_ptr.dtype.element_ty)
        if GATHER_A:
            a_rows = token
        else:
            a_rows = rows
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak,          # [BLOCK_R, BLOCK_K]
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        if RELU2_A:
            r = tl.maximum(a.to(tl.float32), 0.0)
            a = (r * r).to(a_ptr.dtype.element_ty)
        acc = tl.dot(dy, a, acc, input_precision=DOT_PRECISION)
    tl.store(dw_ptr + e.to(tl.int64) * stride_dwe + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk,
             acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


# Autotuned variants for CUDA (H100/H200, bf16): 128-row blocks with 64-deep K steps and 3-4 stages of software
# pipelining are the usual sweet spot; BLOCK_M is not tuned because the alignment is padded to it beforehand.
# Every config overwrites its whole output, so benchmarking configs on live buffers is safe.
_MM_CONFIGS = [triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_stages=s, num_warps=w)
               for bn, bk, s, w in [(128, 64, 4, 4), (128, 64, 3, 8), (256, 64, 3, 8), (128, 128, 3, 8),
                                    (64, 64, 4, 4), (64, 128, 3, 4)]]
_MM_KEY = ["N", "K", "BLOCK_M", "GATHER_A", "RELU2_A", "SCATTER_C", "GATE_C", "DGATE"]
_grouped_mm_tuned = triton.autotune(configs=_MM_CONFIGS, key=_MM_KEY)(_grouped_mm_kernel)
# The DGATE launch writes one partial dot per column block: a fixed BLOCK_N keeps that buffer's shape known. Its
# epilogue holds a u tile beside the accumulator: with 4 warps a 128x128 tile spills registers (sm_90 cubin), so 8.
_DGATE_BLOCK_N = 128
_grouped_mm_dgate_tuned = triton.autotune(
    configs=[c for c in _MM_CONFIGS if c.kwargs["BLOCK_N"] == _DGATE_BLOCK_N and c.num_warps == 8],
    key=_MM_KEY)(_grouped_mm_kernel)
_DW_CONFIGS = [triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br), num_stages=s, num_warps=w)
               for bn, bk, br, s, w in [(128, 128, 64, 3, 8), (128, 128, 32, 4, 8), (128, 64, 64, 4, 4),
                                        (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]]
_grouped_dw_tuned = triton.autotune(configs=_DW_CONFIGS,
                                    key=["N", "K", "GATHER_DY", "GATE_DY", "GATHER_A", "RELU2_A"])(_grouped_dw_kernel)

# Small fixed tiles for the interpreter (numpy): tiny shapes, several blocks per dimension, tails exercised.
_INTERP_MM = dict(BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
_INTERP_DW = dict(BLOCK_N=16, BLOCK_K=16, BLOCK_R=16)
_INTERP_BLOCK_M = 16


def _interpreting():
    """True when this module's kernels and triton's own jit functions were built for the interpreter."""
    return isinstance(_grouped_mm_kernel, InterpretedFunction) and isinstance(tl.cdiv, InterpretedFunction)


def _dgate_block_n():
    return _INTERP_MM["BLOCK_N"] if _interpreting() else _DGATE_BLOCK_N


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_device(*tensors):
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"moe_impl='triton': tensors on different devices ({dev} and {t.device})")
    if dev.type != "cuda" and not _interpreting():
        raise ValueError(f"moe_impl='triton' on {dev.type} tensors needs Triton's interpreter, which must be on "
                         "(TRITON_INTERPRET=1) before triton and moe_kernels are first imported")


def _dot_precision(dtype):
    # fp32 inputs: follow torch's matmul setting (tf32 only when allowed); 16-bit inputs ignore this.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# ----------------------------------------------------------------------------------------------------------------
# Launchers: shape checks, buffers and grids around the kernels


def route_topk_triton(router_logits, correction_bias, top_k, routed_scaling_factor=1.0, norm_topk_prob=True,
                      scoring="sigmoid"):
    """route_topk_torch with the routing kernels. Ties in score + bias go to the lowest expert index."""
    if router_logits.dim() != 2 or not router_logits.is_floating_point():
        raise ValueError(f"route_topk: router_logits must be a float [T, E] tensor, got "
                         f"{router_logits.dtype} {tuple(router_logits.shape)}")
    T, E = router_logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"route_topk: top_k={top_k} must be in [1, E={E}]")
    if E > 4096:
        raise ValueError(f"route_topk: E={E} experts is more than the routing kernel keeps in registers (4096)")
    if scoring not in ("sigmoid", "softmax"):
        raise ValueError(f"route_topk: scoring must be 'sigmoid' or 'softmax', got {scoring!r}")
    if correction_bias is not None and tuple(correction_bias.shape) != (E,):
        raise ValueError(f"route_topk: correction_bias must be [E={E}], got {tuple(correction_bias.shape)}")
    logits = router_logits.float().contiguous()
    bias = None if correction_bias is None else correction_bias.detach().float().contiguous()
    _check_device(logits, *([] if bias is None else [bias]))
    return _RouteTopKFn.apply(logits, bias, top_k, float(routed_scaling_factor), bool(norm_topk_prob),
                              scoring == "softmax")


def _route_tiles(E, top_k):
    block_e = triton.next_power_of_2(E)
    block_t = 4 if _interpreting() else max(1, min(64, 4096 // block_e))
    return dict(BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k))


class _RouteTopKFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, bias, top_k, scale, norm, softmax):
        T, E = logits.shape
        weights = torch.empty(T, top_k, device=logits.device, dtype=torch.float32)
        ids = torch.empty(T, top_k, device=logits.device, dtype=torch.int64)
        tiles = _route_tiles(E, top_k)
        if T:
            _route_topk_fwd_kernel[(triton.cdiv(T, tiles["BLOCK_T"]),)](
                logits, logits if bias is None else bias, weights, ids, T, E, logits.stride(0), scale,
                K=top_k, HAS_BIAS=bias is not None, SOFTMAX=softmax, NORM=norm, **tiles)
        ctx.save_for_backward(logits, ids)
        ctx.mark_non_differentiable(ids)
        ctx.cfg = (top_k, scale, norm, softmax)
        return weights, ids

    @staticmethod
    def backward(ctx, dweights, _dids):
        logits, ids = ctx.saved_tensors
        top_k, scale, norm, softmax = ctx.cfg
        T, E = logits.shape
        dlogits = torch.empty_like(logits)
        tiles = _route_tiles(E, top_k)
        if T:
            _route_topk_bwd_kernel[(triton.cdiv(T, tiles["BLOCK_T"]),)](
                logits, ids, dweights.float().contiguous(), dlogits, T, E, logits.stride(0), scale,
                K=top_k, SOFTMAX=softmax, NORM=norm, **tiles)
        return dlogits, None, None, None, None, None


def align_tokens_triton(topk_ids, num_experts, block_m):
    """align_tokens_torch with the four alignment kernels (same Alignment, bit for bit)."""
    P = topk_ids.numel()
    E = num_experts
    dev = topk_ids.device
    ids = topk_ids.reshape(-1).contiguous()
    block_e = triton.next_power_of_2(E)
    block_p = 16 if _interpreting() else max(16, min(256, 16384 // block_e))
    C = triton.cdiv(P, block_p)
    max_blocks = _max_blocks(P, E, block_m)
    chunk_counts = torch.empty(C, E, dtype=torch.int32, device=dev)
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    seg_start = torch.empty(E, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    sorted_pair_ids = torch.full((max_blocks * block_m,), P, dtype=torch.int32, device=dev)
    if P:
        _align_count_kernel[(C,)](ids, chunk_counts, P, E, BLOCK_P=block_p, BLOCK_E=block_e, num_warps=8)
        _align_scan_kernel[(E,)](chunk_counts, counts, C, E, BLOCK_C=4 if _interpreting() else 1024)
        _align_blocks_kernel[(1,)](counts, seg_start, block_expert, E, max_blocks, BLOCK_M=block_m,
                                   BLOCK_E=block_e, BLOCK_B=max(16, min(256, 16384 // block_e)), num_warps=8)
        _align_scatter_kernel[(C,)](ids, chunk_counts, seg_start, sorted_pair_ids, P, E,
                                    BLOCK_P=block_p, BLOCK_E=block_e, num_warps=8)
    else:
        counts.zero_()
        seg_start.zero_()
    return Alignment(sorted_pair_ids, block_expert, seg_start, counts, block_m, P, topk_ids.shape[-1])


def grouped_mm_triton(a, w, align, *, gather_a=False, relu2_a=False, transpose_w=False, scatter_c=False,
                      gate=None, u=None, dgate=None):
    """
    One grouped-matmul launch (see _grouped_mm_kernel): for every row r of the padded grouped layout `align`
        C[r] or C[pair(r)] = epilogue( A(r) @ W[e]^T )          (A(r) @ W[e] when transpose_w)
    a: [T, K] token-major when gather_a, else [rows, K] grouped; w: [E, N, K] ([E, K, N] when transpose_w);
    gate [P] fp32 multiplies the stored rows; with u ([rows, N] grouped) and dgate ([cdiv(N, _dgate_block_n()), P]
    fp32) it selects the down projection's backward epilogue instead (see the kernel comment).
    Returns C: [P, N] pair-major when scatter_c, else [rows, N] grouped (padding rows left unwritten).
    """
    N, K = (w.shape[2], w.shape[1]) if transpose_w else (w.shape[1], w.shape[2])
    stride_wk, stride_wn = (w.stride(1), w.stride(2)) if transpose_w else (w.stride(2), w.stride(1))
    if a.shape[-1] != K:
        raise ValueError(f"grouped_mm: A has {a.shape[-1]} columns, W[e] needs {K}")
    P, num_blocks = align.num_pairs, align.block_expert.numel()
    c = a.new_empty(P if scatter_c else align.sorted_pair_ids.numel(), N)
    dg = dgate is not None
    gate_c = gate is not None and not dg
    if num_blocks == 0:
        return c
    args = (a, w, c, align.sorted_pair_ids, align.block_expert, gate if gate is not None else c,
            u if dg else c, dgate if dg else c, N, K, P, align.top_k, num_blocks,
            a.stride(0), a.stride(1), w.stride(0), stride_wk, stride_wn, c.stride(0), c.stride(1),
            u.stride(0) if dg else 0, u.stride(1) if dg else 0)
    flags = dict(GATHER_A=gather_a, RELU2_A=relu2_a, SCATTER_C=scatter_c, GATE_C=gate_c, DGATE=dg,
                 DOT_PRECISION=_dot_precision(a.dtype), BLOCK_M=align.block_m)
    if _interpreting():
        tiles = dict(_INTERP_MM)
        _grouped_mm_kernel[(num_blocks * triton.cdiv(N, tiles["BLOCK_N"]),)](*args, **flags, **tiles)
    else:
        kernel = _grouped_mm_dgate_tuned if dg else _grouped_mm_tuned
        kernel[lambda meta: (num_blocks * triton.cdiv(N, meta["BLOCK_N"]),)](*args, **flags)
    return c


def grouped_dw_triton(dy, a, align, num_experts, *, gather_dy=False, gate=None, gather_a=False, relu2_a=False):
    """
    Per-expert weight gradient in one launch (see _grouped_dw_kernel): dW[e] = sum over e's rows of dY^T A.
    dy: [T, N] token-major when gather_dy (optionally scaled by gate [P] on load), else [rows, N] grouped;
    a: [T, K] token-major when gather_a, else [rows, K] grouped (relu(.)^2 on load when relu2_a).
    Returns dW [E, N, K] in a's dtype.
    """
    N, K = dy.shape[1], a.shape[1]
    dw = a.new_empty(num_experts, N, K)
    args = (dy, a, dw, align.sorted_pair_ids, align.seg_start, align.counts, gate if gate is not None else dw,
            N, K, align.top_k, dy.stride(0), dy.stride(1), a.stride(0), a.stride(1),
            dw.stride(0), dw.stride(1), dw.stride(2))
    flags = dict(GATHER_DY=gather_dy, GATE_DY=gate is not None, GATHER_A=gather_a, RELU2_A=relu2_a,
                 DOT_PRECISION=_dot_precision(a.dtype))
    if _interpreting():
        grid = (num_experts, triton.cdiv(N, _INTERP_DW["BLOCK_N"]) * triton.cdiv(K, _INTERP_DW["BLOCK_K"]))
        _grouped_dw_kernel[grid](*args, **flags, **_INTERP_DW)
    else:
        grid = lambda meta: (num_experts, triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]))  # noqa
        _grouped_dw_tuned[grid](*args, **flags)
    return dw


def _sum_slots(pairs, num_tokens, top_k):
    """out[t] = sum_j pairs[t*k + j], accumulated in fp32, cast back (the combine step, and dx's sum over k)."""
    return pairs.view(num_tokens, top_k, -1).sum(1, dtype=torch.float32).to(pairs.dtype)


class _MoEExpertsFn(torch.autograd.Function):
    """
    out = sum_j gate_tj * relu(x_t @ w_up[e_tj]^T)^2 @ w_down[e_tj]^T, with gradients for x, the gate weights and
    both expert weights. Saves u = x[token] @ w_up[e]^T (grouped rows, the pre-activation) and recomputes h from it.
    """

    @staticmethod
    def forward(ctx, x, gate, w_up, w_down, align):
        T, k = x.shape[0], align.top_k
        gate_flat = gate.reshape(-1)
        u = grouped_mm_triton(x, w_up, align, gather_a=True)                                  # [rows, I]
        y = grouped_mm_triton(u, w_down, align, relu2_a=True, scatter_c=True, gate=gate_flat)  # [P, H]
        ctx.save_for_backward(x, gate_flat, w_up, w_down, u)
        ctx.align = align
        return _sum_slots(y, T, k)

    @staticmethod
    def backward(ctx, dout):
        x, gate, w_up, w_down, u = ctx.saved_tensors
        align = ctx.align
        T, k, E, I = x.shape[0], align.top_k, w_up.shape[0], w_up.shape[1]
        need_x, need_gate, need_up, need_down = ctx.needs_input_grad[:4]
        dout = dout.to(x.dtype)
        # g = dout[token] @ w_down[e]; the epilogue turns it into du and the partial dots <h, g> = dL/dgate
        dgate_parts = torch.empty(triton.cdiv(I, _dgate_block_n()), align.num_pairs, device=x.device,
                                  dtype=torch.float32)
        du = grouped_mm_triton(dout, w_down, align, gather_a=True, transpose_w=True, gate=gate, u=u,
                               dgate=dgate_parts)
        dgate = dgate_parts.sum(0).view(T, k) if need_gate else None
        dw_down = (grouped_dw_triton(dout, u, align, E, gather_dy=True, gate=gate, relu2_a=True)
                   if need_down else None)
        dw_up = grouped_dw_triton(du, x, align, E, gather_a=True) if need_up else None
        dx = (_sum_slots(grouped_mm_triton(du, w_up, align, transpose_w=True, scatter_c=True), T, k)
              if need_x else None)
        return dx, dgate, dw_up, dw_down, None


def _pick_block_m(num_pairs, num_experts):
    if _interpreting():
        return _INTERP_BLOCK_M
    return 64 if num_pairs < 512 * num_experts else 128     # little padding when experts get few rows


def moe_experts_triton(x, topk_ids, topk_weights, w_up, w_down, block_m=None):
    """moe_experts_torch with the Triton kernels; differentiable w.r.t. x, topk_weights, w_up and w_down."""
    if x.dim() != 2 or w_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError(f"moe_experts: expected x [T, H], w_up [E, I, H], w_down [E, H, I]; got x "
                         f"{tuple(x.shape)}, w_up {tuple(w_up.shape)}, w_down {tuple(w_down.shape)}")
    T, H = x.shape
    E, I, _ = w_up.shape
    if tuple(w_up.shape) != (E, I, H) or tuple(w_down.shape) != (E, H, I):
        raise ValueError(f"moe_experts: with x [T, H={H}] expected w_up [E, I, {H}] and w_down [E, {H}, I]; got "
                         f"w_up {tuple(w_up.shape)}, w_down {tuple(w_down.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"moe_experts: topk_ids and topk_weights must both be [T={T}, k]; got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    if topk_ids.is_floating_point() or topk_ids.is_complex() or topk_ids.dtype == torch.bool:
        raise ValueError(f"moe_experts: topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if not 1 <= topk_ids.shape[1] <= E:
        raise ValueError(f"moe_experts: k={topk_ids.shape[1]} must be in [1, E={E}]")
    if x.dtype not in _DTYPES or w_up.dtype != x.dtype or w_down.dtype != x.dtype:
        raise ValueError(f"moe_experts: x, w_up and w_down must share one dtype of {_DTYPES}; got "
                         f"{x.dtype}, {w_up.dtype}, {w_down.dtype}")
    if E > 4096:
        raise ValueError(f"moe_experts: E={E} experts is more than the alignment kernels handle (4096)")
    _check_device(x, topk_ids, topk_weights, w_up, w_down)
    if x.device.type != "cuda":
        if x.dtype != torch.float32:
            raise ValueError(f"moe_experts: Triton's interpreter computes {x.dtype} wrongly; use float32 on CPU "
                             "(or moe_impl='torch')")
        if topk_ids.numel() and (topk_ids.min() < 0 or topk_ids.max() >= E):   # cheap on CPU; a sync on CUDA
            raise ValueError(f"moe_experts: topk_ids must lie in [0, E={E})")
    if T == 0:
        return moe_experts_torch(x, topk_ids, topk_weights, w_up, w_down)
    align = align_tokens_triton(topk_ids, E, block_m or _pick_block_m(topk_ids.numel(), E))
    return _MoEExpertsFn.apply(x, topk_weights.float().contiguous(), w_up, w_down, align)


# ----------------------------------------------------------------------------------------------------------------
# Entry points used by model.py


def route_topk(router_logits, correction_bias, top_k, routed_scaling_factor, norm_topk_prob, impl="torch",
               scoring="sigmoid"):
    if impl == "triton":
        return route_topk_triton(router_logits, correction_bias, top_k, routed_scaling_factor, norm_topk_prob,
                                 scoring)
    return route_topk_torch(router_logits, correction_bias, top_k, routed_scaling_factor, norm_topk_prob, scoring)


def moe_experts(x, topk_ids, topk_weights, w_up, w_down, impl="torch"):
    if impl == "triton":
        return moe_experts_triton(x, topk_ids, topk_weights, w_up, w_down)
    return moe_experts_torch(x, topk_ids, topk_weights, w_up, w_down)
