"""The Triton MoE kernels (run by Triton's interpreter on CPU, fp32, tiny shapes) against the torch reference ops:
routing, alignment, the grouped matmuls and their backward, the whole MoE layer and the whole model; the errors;
and the aux-loss-free balancing update."""
import os

import pytest
import torch
import torch.nn.functional as F

import moe_kernels as mk
from model import Model, MoE
from tests.conftest import small_config

# Triton picks interpreter or compiler when triton and moe_kernels are first imported (conftest imports model, so
# before this file runs). Without CUDA, moe_kernels turns the interpreter on itself; on a CUDA machine the kernels
# are compiled unless TRITON_INTERPRET=1 is in the environment, and then the interpreter tests skip and the CUDA
# tests run instead.
interpreted = pytest.mark.skipif(not mk._interpreting(), reason="needs TRITON_INTERPRET=1 in the environment")
on_cuda = pytest.mark.skipif(mk._interpreting() or not torch.cuda.is_available(), reason="needs CUDA, compiled")


def route_inputs(T, E, seed=0, bias_scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, E, generator=g), bias_scale * torch.randn(E, generator=g)


def by_expert(weights, ids):
    """Both routings list their k picks in their own order: compare them sorted by expert id."""
    ids, order = ids.sort(dim=-1)
    return weights.gather(1, order), ids


# ---------------------------------------------------------------------------------------------------------------
# Routing


@interpreted
@pytest.mark.parametrize("T,E,k,kw", [
    (13, 6, 2, dict(routed_scaling_factor=2.5)),                            # T not a multiple of the row block
    (9, 8, 1, dict(routed_scaling_factor=2.5)),                             # top-1
    (5, 1, 1, dict()),                                                      # a single expert
    (11, 7, 3, dict(norm_topk_prob=False, routed_scaling_factor=1.5)),
    (10, 6, 2, dict(scoring="softmax")),
    (10, 6, 3, dict(scoring="softmax", norm_topk_prob=False)),
])
@pytest.mark.parametrize("with_bias", [True, False])
def test_route_matches_torch(T, E, k, kw, with_bias):
    logits, bias = route_inputs(T, E)
    bias = bias if with_bias else None
    dw = torch.randn(T, k, generator=torch.Generator().manual_seed(3))
    outs = []
    for fn in (mk.route_topk_torch, mk.route_topk_triton):
        x = logits.clone().requires_grad_()
        w, ids = fn(x, bias, k, **kw)
        w, ids = by_expert(w, ids)
        (grad,) = torch.autograd.grad((w * dw).sum(), x)
        outs.append((w, ids, grad))
    (w_ref, ids_ref, g_ref), (w, ids, g) = outs
    assert ids.dtype == torch.int64 and torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


@interpreted
def test_route_ties_go_to_the_lowest_expert():
    T, E, k = 4, 6, 3
    logits = torch.zeros(T, E)                  # every score 0.5: any 3 experts are a valid top-3
    logits[1, [1, 4]] = 1.0                     # row 1: experts 1 and 4 on top, then a 4-way tie for the third
    logits[2] = torch.tensor([0.0, 2.0, 2.0, 2.0, 2.0, 0.0])
    w, ids = mk.route_topk_triton(logits, torch.zeros(E), k, 2.5)
    assert ids.tolist() == [[0, 1, 2], [1, 4, 0], [1, 2, 3], [0, 1, 2]]
    w_ref, _ = mk.route_topk_torch(logits, torch.zeros(E), k, 2.5)
    # the weights depend only on the picked scores, which ties make equal whichever expert wins
    torch.testing.assert_close(w.sort(-1).values, w_ref.sort(-1).values)


@interpreted
def test_route_bias_picks_but_does_not_weigh():
    logits = torch.zeros(3, 4)
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])
    w, ids = mk.route_topk_triton(logits, bias, 1, 2.5, norm_topk_prob=False)
    assert ids.flatten().tolist() == [2, 2, 2]
    torch.testing.assert_close(w, torch.full((3, 1), 0.5 * 2.5))


# ---------------------------------------------------------------------------------------------------------------
# Alignment


@interpreted
def test_align_worked_example():
    ids = torch.tensor([[2, 0], [0, 2], [2, 1]])
    for fn in (mk.align_tokens_torch, mk.align_tokens_triton):
        a = fn(ids, 3, 4)
        assert a.sorted_pair_ids.tolist()[:12] == [1, 2, 6, 6, 5, 6, 6, 6, 0, 3, 4, 6]
        assert a.block_expert.tolist()[:3] == [0, 1, 2] and set(a.block_expert.tolist()[3:]) <= {-1}
        assert a.seg_start.tolist() == [0, 4, 8] and a.counts.tolist() == [2, 1, 3]


def routed_ids(T, E, k, case, seed=0):
    g = torch.Generator().manual_seed(seed)
    if case == "random":
        return torch.rand(T, E, generator=g).topk(k, dim=-1).indices
    if case == "one_expert_empty":                  # expert 1 gets nothing
        s = torch.rand(T, E, generator=g)
        s[:, 1] = -1
        return s.topk(k, dim=-1).indices
    if case == "all_to_one":                        # every token's first pick is expert E-1
        s = torch.rand(T, E, generator=g)
        s[:, E - 1] = 2
        return s.topk(k, dim=-1).indices
    raise ValueError(case)


ALIGN_CASES = [                                     # T, E, k, case, block_m
    (37, 5, 2, "random", 16),                       # P = 74: not a multiple of the block, several 16-pair chunks
    (37, 5, 2, "one_expert_empty", 16),
    (40, 6, 1, "all_to_one", 16),
    (23, 4, 1, "random", 4),                        # top-1, small blocks: many blocks per expert
    (9, 1, 1, "random", 16),                        # a single expert
    (50, 6, 6, "random", 8),                        # k = E
]


@interpreted
@pytest.mark.parametrize("T,E,k,case,block_m", ALIGN_CASES)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_align_matches_torch(T, E, k, case, block_m, id_dtype):
    ids = routed_ids(T, E, k, case).to(id_dtype)
    ref = mk.align_tokens_torch(ids.long(), E, block_m)
    got = mk.align_tokens_triton(ids, E, block_m)
    for name in ("sorted_pair_ids", "block_expert", "seg_start", "counts"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert (got.num_pairs, got.top_k, got.block_m) == (T * k, k, block_m)
    # the non-sentinel entries are exactly the stable sort by expert of permute_tokens_torch
    order, counts = mk.permute_tokens_torch(ids.long(), E)
    real = got.sorted_pair_ids[got.sorted_pair_ids < T * k]
    assert torch.equal(real.long(), order) and torch.equal(got.counts.long(), counts)


# ---------------------------------------------------------------------------------------------------------------
# Grouped matmuls, one mode at a time, against the torch ops


def expert_inputs(T, H, I, E, k, case="random", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w_up = torch.randn(E, I, H, generator=g) / H ** 0.5
    w_down = torch.randn(E, H, I, generator=g) / I ** 0.5
    ids = routed_ids(T, E, k, case, seed)
    w = torch.rand(T, k, generator=g) + 0.5
    return x, ids, w, w_up, w_down


@interpreted
@pytest.mark.parametrize("T,E,k,case", [(37, 5, 2, "random"), (37, 5, 2, "one_expert_empty"), (20, 1, 1, "random")])
def test_grouped_mm_modes_match_torch(T, E, k, case):
    H, I = 40, 24                                   # neither a multiple of the 16-wide tiles
    x, ids, w, w_up, w_down = expert_inputs(T, H, I, E, k, case)
    a = mk.align_tokens_triton(ids, E, 16)
    order, counts = mk.permute_tokens_torch(ids, E)
    real = a.sorted_pair_ids < T * k                # grouped rows that hold a pair (not padding)

    # up: gather x rows by token, grouped output
    u = mk.grouped_mm_triton(x, w_up, a, gather_a=True)
    u_ref = mk.grouped_matmul_torch(x[order // k], w_up, counts)
    torch.testing.assert_close(u[real], u_ref, rtol=1e-5, atol=1e-5)

    # down: relu^2 on load, gate in the epilogue, scattered to pair-major rows; summed over k = unpermute_torch
    y = mk.grouped_mm_triton(u, w_down, a, relu2_a=True, scatter_c=True, gate=w.flatten())
    y_ref = mk.grouped_matmul_torch(F.relu(u_ref).square(), w_down, counts)
    torch.testing.assert_close(mk._sum_slots(y, T, k), mk.unpermute_torch(y_ref, order, w, T), rtol=1e-5, atol=1e-5)

    # transposed W, grouped input, scattered output (dx before the sum over slots)
    d = torch.randn(a.sorted_pair_ids.numel(), I)
    dx = mk.grouped_mm_triton(d, w_up, a, transpose_w=True, scatter_c=True)
    dx_ref = torch.empty(T * k, H)
    dx_ref[order] = mk.grouped_matmul_torch(d[real], w_up.transpose(1, 2), counts)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)

    # dW per expert over contiguous grouped rows, with gathered + gated dY and relu^2 A
    dout = torch.randn(T, H)
    dw = mk.grouped_dw_triton(dout, u, a, E, gather_dy=True, gate=w.flatten(), relu2_a=True)
    dy = dout[order // k] * w.flatten()[order, None]
    hs = F.relu(u_ref).square()
    dw_ref = torch.stack([dy_e.T @ h_e for dy_e, h_e in zip(dy.split(counts.tolist()), hs.split(counts.tolist()))])
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5)
    if case == "one_expert_empty":
        assert dw[1].abs().max() == 0


# ---------------------------------------------------------------------------------------------------------------
# The MoE layer: forward and gradients against the torch path


def layer(impl, x, router_w, bias, w_up, w_down, k, scale=2.5):
    w, ids = mk.route_topk(x.float() @ router_w.float().T, bias, k, scale, True, impl=impl)   # as the model
    return mk.moe_experts(x, ids, w, w_up, w_down, impl=impl)


@interpreted
@pytest.mark.parametrize("T,E,k,case", [
    (37, 5, 2, "random"),
    (37, 5, 2, "one_expert_empty"),
    (26, 4, 1, "all_to_one"),                       # top-1, every token to the last expert
    (18, 1, 1, "random"),                           # a single expert
])
def test_layer_forward_and_grads_match_torch(T, E, k, case):
    H, I = 40, 24
    g = torch.Generator().manual_seed(1)
    x, _, _, w_up, w_down = expert_inputs(T, H, I, E, k)
    router_w = torch.randn(E, H, generator=g) * 0.2
    bias = 0.1 * torch.randn(E, generator=g)
    if case == "one_expert_empty":
        bias[1] = -10.0
    if case == "all_to_one":
        bias[E - 1] = 10.0
    dout = torch.randn(T, H, generator=g)
    results = {}
    for impl in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in (x, router_w, w_up, w_down)]
        out = layer(impl, *leaves[:2], bias, *leaves[2:], k)
        results[impl] = (out, *torch.autograd.grad((out * dout).sum(), leaves))
    for name, ref, got in zip(("out", "dx", "drouter", "dw_up", "dw_down"), results["torch"], results["triton"]):
        # top-1 renormalised weights are constant (= scale): the router's gradient is 0 up to rounding on both sides
        atol = 1e-4 if (name, k) == ("drouter", 1) else 1e-5
        err = (got - ref).abs().max().item()
        assert err <= atol + 1e-5 * ref.abs().max().item(), f"{name}: max error {err:.2e}"


@interpreted
def test_experts_grads_match_torch_without_router():
    """moe_experts alone: gradients of the gate weights too (the router's path into the experts)."""
    T, H, I, E, k = 29, 40, 24, 5, 3
    x, ids, w, w_up, w_down = expert_inputs(T, H, I, E, k)
    dout = torch.randn(T, H)
    res = []
    for fn in (mk.moe_experts_torch, mk.moe_experts_triton, mk.moe_experts_loop):
        leaves = [t.clone().requires_grad_() for t in (x, w, w_up, w_down)]
        out = fn(leaves[0], ids, *leaves[1:])
        res.append((out, *torch.autograd.grad((out * dout).sum(), leaves)))
    for ref, got, loop in zip(*res):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loop, ref, rtol=1e-5, atol=1e-5)


@interpreted
def test_block_size_does_not_change_the_result():
    T, H, I, E, k = 21, 40, 24, 3, 2
    x, ids, w, w_up, w_down = expert_inputs(T, H, I, E, k)
    outs = [mk.moe_experts_triton(x, ids, w, w_up, w_down, block_m=bm) for bm in (16, 32, 64)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The whole model


@interpreted
def test_model_triton_equals_torch():
    from tests.test_model import randomize
    ref = randomize(Model(small_config(moe_impl="torch")), seed=3)
    tri = Model(small_config(moe_impl="triton"))
    tri.load_state_dict(ref.state_dict())
    ids = torch.randint(0, ref.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(4))
    outs = []
    for model in (ref, tri):
        logits = model(ids)
        logits.float().square().mean().backward()
        outs.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    (l_ref, g_ref), (l_tri, g_tri) = outs
    assert (l_tri - l_ref).abs().max().item() < 1e-4
    assert g_ref.keys() == g_tri.keys()
    for name in g_ref:
        assert g_ref[name] is not None, name
        assert (g_tri[name] - g_ref[name]).abs().max().item() < 1e-4, name


# ---------------------------------------------------------------------------------------------------------------
# Errors


@interpreted
def test_errors_are_clear():
    T, H, I, E, k = 8, 16, 16, 4, 2
    x, ids, w, w_up, w_down = expert_inputs(T, H, I, E, k)
    with pytest.raises(ValueError, match="interpreter computes torch.bfloat16 wrongly"):
        mk.moe_experts_triton(x.bfloat16(), ids, w, w_up.bfloat16(), w_down.bfloat16())
    with pytest.raises(ValueError, match="share one dtype"):
        mk.moe_experts_triton(x, ids, w, w_up.double(), w_down)
    with pytest.raises(ValueError, match="share one dtype"):
        mk.moe_experts_triton(x.double(), ids, w, w_up.double(), w_down.double())
    with pytest.raises(ValueError, match="w_up"):
        mk.moe_experts_triton(x, ids, w, w_up[:, :, :8], w_down)
    with pytest.raises(ValueError, match=r"w_up \[E, I, H\]"):
        mk.moe_experts_triton(x[None], ids, w, w_up, w_down)
    with pytest.raises(ValueError, match="topk_ids and topk_weights"):
        mk.moe_experts_triton(x, ids[:5], w, w_up, w_down)
    with pytest.raises(ValueError, match="integer"):
        mk.moe_experts_triton(x, ids.float(), w, w_up, w_down)
    with pytest.raises(ValueError, match=r"lie in \[0, E=4\)"):
        mk.moe_experts_triton(x, ids + E, w, w_up, w_down)
    logits, bias = route_inputs(T, E)
    with pytest.raises(ValueError, match="top_k=5"):
        mk.route_topk_triton(logits, bias, 5)
    with pytest.raises(ValueError, match="correction_bias"):
        mk.route_topk_triton(logits, bias[:3], 2)
    with pytest.raises(ValueError, match="float"):
        mk.route_topk_triton(logits.long(), bias, 2)
    with pytest.raises(ValueError, match="scoring"):
        mk.route_topk_triton(logits, bias, 2, scoring="relu")


# ---------------------------------------------------------------------------------------------------------------
# Aux-loss-free balancing


def moe_layer(**overrides):
    torch.manual_seed(0)
    cfg = small_config(**overrides)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
        moe.gate.weight.zero_()
        moe.gate.e_score_correction_bias.copy_(torch.tensor([0.5, 0.4, 0.3, 0.0, 0.0, 0.0]))
    return moe                          # with zero router logits the bias alone picks experts 0 and 1 (top-2)


def test_balancing_is_off_by_default_and_counts_load():
    moe = moe_layer()
    assert moe.cfg.moe_bias_update_rate == 0.0
    before = moe.gate.e_score_correction_bias.clone()
    x = torch.randn(2, 5, 64)
    moe.train()(x).sum().backward()
    assert moe.expert_load.tolist() == [10.0, 10.0, 0.0, 0.0, 0.0, 0.0]
    load = moe.update_correction_bias()
    assert load.tolist() == [10.0, 10.0, 0.0, 0.0, 0.0, 0.0] and moe.expert_load is None
    assert torch.equal(moe.gate.e_score_correction_bias, before)
    with torch.no_grad():                              # neither no-grad nor eval forwards count
        moe(x)
    moe.eval()(x)
    assert moe.expert_load is None


@interpreted
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_balancing_moves_bias_toward_underloaded_experts(impl):
    rate = 1e-3
    moe = moe_layer(moe_bias_update_rate=rate, moe_impl=impl).train()
    before = moe.gate.e_score_correction_bias.clone()
    x = torch.randn(2, 5, 64)
    moe(x).sum().backward()
    moe(x).sum().backward()                            # two micro-batches accumulate
    moe.update_correction_bias()
    # load [20, 20, 0, 0, 0, 0], mean 20/3: experts 0, 1 over-loaded (bias down), the rest under-loaded (up)
    expected = before + rate * torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0, 1.0])
    torch.testing.assert_close(moe.gate.e_score_correction_bias, expected)
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.gate.e_score_correction_bias.grad is None
    # a step large enough to close the 0.1 gap between experts 1 and 2 hands expert 1's tokens to expert 2
    moe = moe_layer(moe_bias_update_rate=0.06, moe_impl=impl).train()
    moe(x)
    moe.update_correction_bias()
    moe(x)
    assert moe.expert_load.tolist() == [10.0, 0.0, 10.0, 0.0, 0.0, 0.0]


def test_balancing_rate_is_ours_and_checked():
    assert "moe_bias_update_rate" not in small_config(moe_bias_update_rate=1e-3).to_hf()
    with pytest.raises(ValueError, match="ModelConfig.moe_bias_update_rate"):
        small_config(moe_bias_update_rate=-1e-3)


def test_balancing_counts_once_under_gradient_checkpointing():
    model = Model(small_config(moe_bias_update_rate=1e-3))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    model.gradient_checkpointing = True
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(1))
    model.train()(ids).float().square().mean().backward()      # the backward recomputes every block's forward
    loads = [m.expert_load for m in model.modules() if isinstance(m, MoE)]
    assert len(loads) == 2
    for load in loads:
        assert load.sum().item() == 2 * 7 * model.config.num_experts_per_tok


# ---------------------------------------------------------------------------------------------------------------
# CUDA (compiled kernels; skipped on CPU). fp32 against torch with TF32 off; bf16 against an fp32 reference, where
# the Triton path must be about as close as the torch bf16 path is.


@on_cuda
def test_cuda_align_and_route_match_torch():
    g = torch.Generator(device="cuda").manual_seed(0)
    T, E, k = 5000, 128, 6
    logits = torch.randn(T, E, device="cuda", generator=g)
    bias = 0.01 * torch.randn(E, device="cuda", generator=g)
    w_ref, ids_ref = by_expert(*mk.route_topk_torch(logits, bias, k, 2.5))
    w, ids = by_expert(*mk.route_topk_triton(logits, bias, k, 2.5))
    same = (ids == ids_ref).all(-1)                 # tl.sigmoid and torch's may differ by an ulp: rare near-ties
    assert same.float().mean() > 0.999
    torch.testing.assert_close(w[same], w_ref[same])
    for block_m in (64, 128):
        ref, got = mk.align_tokens_torch(ids, E, block_m), mk.align_tokens_triton(ids, E, block_m)
        for name in ("sorted_pair_ids", "block_expert", "seg_start", "counts"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), name


def cuda_layer_grads(impl, dtype, T=3000, H=512, I=384, E=32, k=4, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, H, device="cuda", generator=g)
    router_w = torch.randn(E, H, device="cuda", generator=g) * 0.05
    bias = 0.01 * torch.randn(E, device="cuda", generator=g)
    w_up = torch.randn(E, I, H, device="cuda", generator=g) / H ** 0.5
    w_down = torch.randn(E, H, I, device="cuda", generator=g) / I ** 0.5
    dout = torch.randn(T, H, device="cuda", generator=g)
    leaves = [x.to(dtype).requires_grad_(), router_w.requires_grad_(), w_up.to(dtype).requires_grad_(),
              w_down.to(dtype).requires_grad_()]
    out = layer(impl, leaves[0], leaves[1], bias, leaves[2], leaves[3], k)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    return [t.float() for t in (out, *grads)]


@on_cuda
def test_cuda_layer_fp32_matches_torch():
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref, got = cuda_layer_grads("torch", torch.float32), cuda_layer_grads("triton", torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    for name, r, t in zip(("out", "dx", "drouter", "dw_up", "dw_down"), ref, got):
        assert (t - r).norm() <= 1e-5 * r.norm() + 1e-6, name


@on_cuda
def test_cuda_layer_bf16_is_as_close_as_torch_bf16():
    ref = cuda_layer_grads("torch", torch.float32)
    torch_bf16, triton_bf16 = cuda_layer_grads("torch", torch.bfloat16), cuda_layer_grads("triton", torch.bfloat16)
    for name, r, a, b in zip(("out", "dx", "drouter", "dw_up", "dw_down"), ref, torch_bf16, triton_bf16):
        err_torch, err_triton = (a - r).norm() / r.norm(), (b - r).norm() / r.norm()
        assert err_triton <= 1.5 * err_torch + 1e-3, f"{name}: triton {err_triton:.2e} vs torch {err_torch:.2e}"


# ---------------------------------------------------------------------------------------------------------------
# The CUDA path compiles: every kernel in every mode the launchers use, built for sm_90 (H100/H200) without a GPU,
# in a subprocess where Triton is not interpreting. Catches type and lowering errors the interpreter lets through,
# and checks that the grouped GEMMs are software-pipelined (cp.async) and fit in shared memory.

_COMPILE_SCRIPT = r'''
import os, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
import moe_kernels as mk
assert not mk._interpreting()
target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)


def build(fn, consts, ptr_types, ones=(), num_warps=4, num_stages=3):
    # what a launch at Nano shapes specialises on: unit strides become constants; pointers, the other strides
    # and N, K (2688, 1856) are multiples of 16
    consts = dict(consts, **{name: 1 for name in ones})
    sig = {n: "constexpr" if n in consts else ptr_types.get(n, "*fp32" if n.endswith("_ptr") else "i32")
           for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n] != "constexpr" and (n.endswith("_ptr") or n.startswith("stride") or n in ("N", "K"))}
    opts = backend.parse_options(dict(num_warps=num_warps, num_stages=num_stages)).__dict__
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=opts)


for softmax in (False, True):
    build(mk._route_topk_fwd_kernel, dict(K=6, HAS_BIAS=True, SOFTMAX=softmax, NORM=True, BLOCK_T=32, BLOCK_E=128,
                                          BLOCK_K=8), {"ids_ptr": "*i64", "scale": "fp32"})
    build(mk._route_topk_bwd_kernel, dict(K=6, SOFTMAX=softmax, NORM=True, BLOCK_T=32, BLOCK_E=128, BLOCK_K=8),
          {"ids_ptr": "*i64", "scale": "fp32"})
i32 = {n: "*i32" for n in ("chunk_counts_ptr", "counts_ptr", "seg_start_ptr", "block_expert_ptr",
                           "chunk_offsets_ptr", "sorted_pair_ptr")}
build(mk._align_count_kernel, dict(BLOCK_P=128, BLOCK_E=128), dict(i32, ids_ptr="*i64"), num_warps=8)
build(mk._align_scan_kernel, dict(BLOCK_C=1024), i32)
build(mk._align_blocks_kernel, dict(BLOCK_M=128, BLOCK_E=128, BLOCK_B=128), i32, num_warps=8)
build(mk._align_scatter_kernel, dict(BLOCK_P=128, BLOCK_E=128), dict(i32, ids_ptr="*i64"), num_warps=8)

bf16 = {n: "*bf16" for n in ("a_ptr", "w_ptr", "c_ptr", "u_ptr", "dy_ptr", "dw_ptr")}
bf16.update(sorted_pair_ptr="*i32", block_expert_ptr="*i32", seg_start_ptr="*i32", counts_ptr="*i32")
no = dict(GATHER_A=False, RELU2_A=False, SCATTER_C=False, GATE_C=False, DGATE=False)
mm_modes = [(dict(no, GATHER_A=True), ("stride_ak", "stride_wk", "stride_cn"), mk._grouped_mm_tuned),       # up
            (dict(no, RELU2_A=True, SCATTER_C=True, GATE_C=True), ("stride_ak", "stride_wk", "stride_cn"),
             mk._grouped_mm_tuned),                                                                       # down
            (dict(no, GATHER_A=True, DGATE=True), ("stride_ak", "stride_wn", "stride_cn", "stride_un"),
             mk._grouped_mm_dgate_tuned),                                                                 # du
            (dict(no, SCATTER_C=True), ("stride_ak", "stride_wn", "stride_cn"), mk._grouped_mm_tuned)]      # dx
for flags, ones, tuned in mm_modes:
    cfg = tuned.configs[0]
    k = build(mk._grouped_mm_kernel, dict(flags, DOT_PRECISION="tf32", BLOCK_M=128, **cfg.kwargs), bf16, ones,
              cfg.num_warps, cfg.num_stages)
    assert "cp.async" in k.asm["ptx"] and k.metadata.shared <= 227 * 1024, (flags, k.metadata.shared)
for flags in (dict(GATHER_DY=True, GATE_DY=True, GATHER_A=False, RELU2_A=True),
              dict(GATHER_DY=False, GATE_DY=False, GATHER_A=True, RELU2_A=False)):
    cfg = mk._grouped_dw_tuned.configs[0]
    k = build(mk._grouped_dw_kernel, dict(flags, DOT_PRECISION="tf32", **cfg.kwargs), bf16,
              ("stride_dyn", "stride_ak", "stride_dwk"), cfg.num_warps, cfg.num_stages)
    assert "cp.async" in k.asm["ptx"], flags
build(mk._grouped_mm_kernel, dict(no, GATHER_A=True, DOT_PRECISION="ieee", BLOCK_M=64, BLOCK_N=64, BLOCK_K=32,
                                  GROUP_M=8), dict(bf16, a_ptr="*fp32", w_ptr="*fp32", c_ptr="*fp32"),
      ("stride_ak", "stride_wk", "stride_cn"))                                                            # fp32
print("compiled")
'''


def test_cuda_kernels_compile_for_sm90(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=root)
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
