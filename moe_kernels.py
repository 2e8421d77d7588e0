"""
MoE ops: routing, token permutation, grouped matmul, unpermutation.

Every op has a plain-torch reference here. It is the CPU path, the oracle the tests compare the Triton kernels
against, and the readable spec of what each kernel computes. The model calls only the two entry points at the
bottom, `route_topk` and `moe_experts`, and picks the implementation with `ModelConfig.moe_impl`:

    auto    Triton on CUDA, torch elsewhere
    torch   the reference below (uses torch._grouped_mm where it is fast, else a per-expert loop)
    triton  the Triton kernels (on CPU only under TRITON_INTERPRET=1, for tests)

Shapes: T tokens, H hidden, E routed experts, k experts per token, I expert width.
Expert weights are stacked like nn.Linear weights: w_up [E, I, H], w_down [E, H, I].
"""
import os

import torch
import torch.nn.functional as F

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


def _use_grouped_mm(x):
    # torch._grouped_mm is fast for fp32 on CPU and bf16 on CUDA (Hopper); elsewhere the loop is the safe path.
    if not hasattr(torch, "_grouped_mm"):
        return False
    return (x.device.type == "cpu" and x.dtype == torch.float32) or (x.is_cuda and x.dtype == torch.bfloat16)


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


# ----------------------------------------------------------------------------------------------------------------
# Entry points used by model.py


def route_topk(router_logits, correction_bias, top_k, routed_scaling_factor, norm_topk_prob, impl="torch"):
    if impl == "triton":
        raise NotImplementedError("moe_impl='triton': the Triton routing kernel is not written yet; "
                                  "use moe_impl='torch'")
    return route_topk_torch(router_logits, correction_bias, top_k, routed_scaling_factor, norm_topk_prob)


def moe_experts(x, topk_ids, topk_weights, w_up, w_down, impl="torch"):
    if impl == "triton":
        raise NotImplementedError("moe_impl='triton': the Triton grouped-matmul kernels are not written yet; "
                                  "use moe_impl='torch'")
    return moe_experts_torch(x, topk_ids, topk_weights, w_up, w_down)
