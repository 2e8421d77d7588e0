"""
MoE layer benchmark (routing + routed experts; the shared expert is a plain MLP and left out).

    .venv/bin/python bench/bench_moe.py            # CPU part always; the CUDA table too when a GPU is present

CPU: the torch reference layer (forward + backward) against a naive per-expert Python loop at a small fp32 shape,
median of interleaved runs, and their ratio.

CUDA: Nemotron 3 Nano's MoE shapes (hidden 2688, expert width 1856, 128 experts, top-6), bf16, 4K to 32K tokens.
For each token count, forward and forward + backward time and TFLOP/s of
    triton         moe_impl="triton": routing kernel, alignment, gather/scatter grouped GEMMs, Triton backward
    grouped_mm     moe_impl="torch" (torch._grouped_mm where the build has it)
    loop           a per-expert Python loop (the naive baseline)
    triton gemm    the two forward grouped-GEMM launches alone (alignment done beforehand)
    dense          one cuBLAS matmul with the same FLOPs ([T*k, H] @ [H, 2I]; its backward for fwd+bwd)
FLOPs count the expert matmuls only: forward 2 * (2 * T*k * H * I), forward + backward three times that.
Targets (issue 3): triton gemm >= 70% of dense TFLOP/s; triton layer >= grouped_mm and >= 3x loop.
Runs unattended in a few minutes (first calls autotune) and prints one table.
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import moe_kernels as mk  # noqa: E402


def make_layer(T, H, I, E, k, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, H, device=device, generator=g).to(dtype).requires_grad_()
    router_w = (torch.randn(E, H, device=device, generator=g) * H ** -0.5).requires_grad_()
    bias = torch.zeros(E, device=device)
    w_up = (torch.randn(E, I, H, device=device, generator=g) * H ** -0.5).to(dtype).requires_grad_()
    w_down = (torch.randn(E, H, I, device=device, generator=g) * I ** -0.5).to(dtype).requires_grad_()
    dout = torch.randn(T, H, device=device, generator=g).to(dtype)
    return x, router_w, bias, w_up, w_down, dout


def layer_fn(impl, x, router_w, bias, w_up, w_down, k):
    """The model's MoE.forward minus the shared expert: fp32 router, routing, routed experts."""
    logits = F.linear(x.float(), router_w)
    route_impl = "torch" if impl == "loop" else impl
    w, ids = mk.route_topk(logits, bias, k, 2.5, True, impl=route_impl)
    if impl == "loop":
        return mk.moe_experts_loop(x, ids, w, w_up, w_down)
    return mk.moe_experts(x, ids, w, w_up, w_down, impl=impl)


# ----------------------------------------------------------------------------------------------------------------
# CPU


def cpu_bench(T=4096, H=256, I=128, E=32, k=4, reps=7, threads=1):
    # One thread by default: on a shared machine OpenMP threads that wait for a busy core make small matmuls
    # tens of times slower and the figures meaningless.
    torch.set_num_threads(threads)
    x, router_w, bias, w_up, w_down, dout = make_layer(T, H, I, E, k, torch.float32, "cpu")
    leaves = [x, router_w, w_up, w_down]

    def step(impl):
        out = layer_fn(impl, x, router_w, bias, w_up, w_down, k)
        torch.autograd.grad(out, leaves, dout)

    times = {"torch": [], "loop": []}
    for impl in times:                                   # warm up
        step(impl)
    for _ in range(reps):                                # interleaved, so drift hits both alike
        for impl in times:
            t0 = time.perf_counter()
            step(impl)
            times[impl].append(time.perf_counter() - t0)
    med = {impl: statistics.median(ts) * 1e3 for impl, ts in times.items()}
    ref_name = "torch._grouped_mm" if mk._use_grouped_mm(x) else "per-expert cat"
    print(f"CPU MoE layer fwd+bwd, fp32, T={T} H={H} I={I} E={E} k={k}, {torch.get_num_threads()} thread(s), "
          f"median of {reps} interleaved runs")
    print(f"  torch reference ({ref_name}): {med['torch']:8.1f} ms")
    print(f"  per-expert loop:  {' ' * len(ref_name)}{med['loop']:8.1f} ms")
    print(f"  loop / reference: {' ' * len(ref_name)}{med['loop'] / med['torch']:8.2f}x")


# ----------------------------------------------------------------------------------------------------------------
# CUDA


def cuda_bench(tokens=(4096, 8192, 16384, 32768), H=2688, I=1856, E=128, k=6, dtype=torch.bfloat16):
    from triton.testing import do_bench

    def bench(fn):
        return do_bench(fn, warmup=10, rep=60, return_mode="median")

    def note(msg):
        print(msg, file=sys.stderr, flush=True)

    rows = []
    gm = "torch._grouped_mm" if hasattr(torch, "_grouped_mm") else "torch (per-expert cat: no _grouped_mm)"
    for T in tokens:
        x, router_w, bias, w_up, w_down, dout = make_layer(T, H, I, E, k, dtype, "cuda")
        leaves = [x, router_w, w_up, w_down]
        flops = 2 * (2 * T * k * H * I)
        res = {}
        for impl, label in (("triton", "triton layer"), ("torch", gm), ("loop", "per-expert loop")):
            note(f"T={T}: {label}")
            fwd = lambda: layer_fn(impl, x, router_w, bias, w_up, w_down, k)                      # noqa: E731
            fwd_bwd = lambda: torch.autograd.grad(fwd(), leaves, dout)                             # noqa: E731
            with torch.no_grad():
                t_f = bench(fwd)
            res[label] = (t_f, bench(fwd_bwd))
        if T == tokens[0]:                               # sanity: the Triton layer against the torch path
            ref = layer_fn("torch", x, router_w, bias, w_up, w_down, k).float()
            got = layer_fn("triton", x, router_w, bias, w_up, w_down, k).float()
            note(f"check T={T}: |triton - torch| / |torch| = {((got - ref).norm() / ref.norm()).item():.2e}")

        note(f"T={T}: triton grouped GEMMs alone, dense matmul")
        with torch.no_grad():
            w, ids = mk.route_topk(F.linear(x.float(), router_w), bias, k, 2.5, True, impl="triton")
            align = mk.align_tokens_triton(ids, E, mk._pick_block_m(T * k, E))
            gate = w.reshape(-1)
            x_ = x.detach()

            def gemms():
                u = mk.grouped_mm_triton(x_, w_up, align, gather_a=True)
                return mk.grouped_mm_triton(u, w_down, align, relu2_a=True, scatter_c=True, gate=gate)
            res["triton gemm (fwd kernels)"] = (bench(gemms), float("nan"))
        a = torch.randn(T * k, H, device="cuda", dtype=dtype, requires_grad=True)
        b = torch.randn(H, 2 * I, device="cuda", dtype=dtype, requires_grad=True)
        db = torch.randn(T * k, 2 * I, device="cuda", dtype=dtype)
        with torch.no_grad():
            t_f = bench(lambda: a @ b)
        res["dense cuBLAS, same FLOPs"] = (t_f, bench(lambda: torch.autograd.grad(a @ b, [a, b], db)))
        loop_fb = res["per-expert loop"][1]
        for label, (t_f, t_fb) in res.items():
            rows.append((T, label, t_f, flops / t_f / 1e9, t_fb, 3 * flops / t_fb / 1e9, loop_fb / t_fb))
        del x, router_w, w_up, w_down, dout, leaves, a, b, db, align
        torch.cuda.empty_cache()

    print(f"\nCUDA MoE layer, {torch.cuda.get_device_name()}, {str(dtype).removeprefix('torch.')}, "
          f"H={H} I={I} E={E} k={k} (TFLOP/s count expert matmuls only)")
    head = f"{'tokens':>6}  {'impl':<40} {'fwd ms':>8} {'TFLOP/s':>8} {'fwd+bwd ms':>11} {'TFLOP/s':>8} {'vs loop':>8}"
    print(head)
    print("-" * len(head))
    for T, label, t_f, tf_f, t_fb, tf_fb, speed in rows:
        bwd = "          -        -        -" if t_fb != t_fb else f" {t_fb:11.2f} {tf_fb:8.1f} {speed:7.2f}x"
        print(f"{T:>6}  {label:<40} {t_f:8.2f} {tf_f:8.1f}{bwd}")


if __name__ == "__main__":
    import argparse
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    cpu_bench()
    if torch.cuda.is_available():
        cuda_bench()
    else:
        print("\nno CUDA device: the CUDA table (Nemotron 3 Nano shapes, bf16) is skipped")
