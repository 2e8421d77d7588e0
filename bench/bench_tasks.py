"""
Benchmark the verifiers on the shipped eval data (CPU; not a test).

1. Code sandbox throughput: every eval code problem's reference program (3 tests each, one confined process per
   test) graded with the worker pool at 1 worker and at one per CPU: programs graded per second and runs per second.
2. Who forks a run: the launcher process (run_program, what graders use) against forking from this process
   (sandbox._run_here: the caller forks the confined child itself), with --ballast_gb of memory resident here,
   as a trainer has: milliseconds per run, side by side, on the first 30 programs' first test.
3. Verifier time per answer: math on the fast path (plain numbers, exact Fraction compare) and through
   Math-Verify (LaTeX that needs sympy; a warm worker process), then if / mcqa / json for comparison.

    python bench/bench_tasks.py [--repeats 3] [--ballast_gb 3]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import tasks  # noqa: E402


def reference_answers(split="sft"):
    """(example without its answer, the reference answer) for every shipped SFT example without a teacher slip (a
    slip is a wrong answer on purpose, see data/generate.py), by domain."""
    pairs = {}
    for e in tasks.load_examples("tiny", split=split):
        if e.get("teacher_slip"):
            continue
        prompt_only = dict(e, messages=tasks.prompt_messages(e))
        pairs.setdefault(e["domain"], []).append((prompt_only, e["messages"][-1]["content"]))
    return pairs


def bench_sandbox(pairs, repeats):
    examples, responses = zip(*pairs)
    runs = sum(len(e["tests"]) for e in examples)
    print(f"sandbox: {len(examples)} programs, {runs} runs (layers: {tasks.sandbox._probe_features()})")
    for workers in (1, os.cpu_count() or 1):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            scores = tasks.score_responses(list(examples), list(responses), workers=workers)
            times.append(time.perf_counter() - start)
            assert scores["all"]["pass@1"] == 1.0
        t = statistics.median(times)
        print(f"  {workers} worker(s): {len(examples) / t:6.1f} programs/s, {runs / t:6.1f} runs/s "
              f"({1000 * t / runs:.0f} ms per run)")


def bench_who_forks(pairs, repeats, ballast_gb):
    import torch                                       # (numpy's large arrays get huge pages: few page tables)
    jobs = [(tasks.code.extract_code(r), e["tests"][0]["input"]) for e, r in pairs[:30]]
    ballast = torch.ones(int(ballast_gb * 2**30 / 4))                 # touched: resident, as a trainer's weights
    limits = tasks.SandboxLimits()
    ways = {"launcher": lambda: [tasks.run_program(p, i, limits) for p, i in jobs],
            "in-process": lambda: [tasks.sandbox._run_here(p, i, limits) for p, i in jobs]}
    ways["launcher"]()                                                   # start the launcher outside the timing
    ms = {name: [] for name in ways}
    for r in range(repeats):
        for name in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
            start = time.perf_counter()
            assert all(res.status == "ok" for res in ways[name]())
            ms[name].append(1000 * (time.perf_counter() - start) / len(jobs))
    a, b = statistics.median(ms["launcher"]), statistics.median(ms["in-process"])
    print(f"who forks, {ballast.nbytes / 2**30:.1f} GB of torch tensors resident here: launcher {a:.1f} ms per run, "
          f"in-process {b:.1f} ms per run: {b / a:.1f}x")


def per_answer_ms(fn, items, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(*item)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / len(items)


def bench_verifiers(pairs, repeats):
    math_plain = [(e["answer"], r) for e, r in pairs["math"]]
    latex = [("\\frac{1}{2}", "\\boxed{\\dfrac{2}{4}}"), ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}"),
             ("x^2+2x", "\\boxed{x(x+2)}"), ("\\pi/2", "\\boxed{\\frac{\\pi}{2}}"), ("(1,2)", "\\boxed{(1, 2)}"),
             ("3", "\\boxed{\\frac{9}{3}}")] * 5
    tasks.math_reward("x", "\\boxed{x}+0")  # start a worker outside the timing
    tasks.math_reward("2x", "\\boxed{x+x}")
    print("verifier time per answer:")
    print(f"  math, plain numbers (fast path):   {per_answer_ms(tasks.math_reward, math_plain, repeats):8.3f} ms")
    print(f"  math, LaTeX through Math-Verify:   {per_answer_ms(tasks.math_reward, latex, repeats):8.3f} ms")
    for domain in ("if", "mcqa", "json"):
        items = [(e, r) for e, r in pairs[domain]]
        print(f"  {domain + ':':<34} {per_answer_ms(tasks.reward, items, repeats):8.3f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ballast_gb", type=float, default=3.0, help="memory resident in the caller (section 2)")
    args = parser.parse_args()
    pairs = reference_answers()
    bench_sandbox(pairs["code"][:100], args.repeats)
    bench_who_forks(pairs["code"], args.repeats, args.ballast_gb)
    bench_verifiers(pairs, args.repeats)


if __name__ == "__main__":
    main()
