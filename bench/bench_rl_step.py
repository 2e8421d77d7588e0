"""
One GRPO training step (rl.train_step: forward + backward of the rollouts' log-probs) on a batch of the tiny
default, packed vs right-padded, side by side in the same run.

    packed   what rl.py and distill.py do: rollouts packed into rows of at most --budget tokens (first-fit by
             decreasing length, doc_ids keep the rollouts apart), one row per forward/backward
    padded   the baseline: micro-batches of --micro_batch rollouts, each right-padded to its longest row

The model is configs/tiny_model.json (random weights, fixed seed); the prompts are the first --prompts of each
domain set in data/rl.jsonl, x --rollouts completions sampled from that model. A random model's tokens are near
uniform, so --stop_tokens token ids are made stop tokens: completions end after about vocab / stop_tokens tokens
(capped at --new_tokens), varied as a trained model's are. Prompt lengths vary too (tool prompts carry schemas).
Runs are interleaved (packed, padded, padded, packed, ...); the ratio is the median of per-round ratios. The
gradients of both layouts are compared (the same up to float rounding).

    python bench/bench_rl_step.py [--repeats 5] [--budget 4096] [--threads 1]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import common  # noqa: E402
import rl  # noqa: E402
import sample  # noqa: E402
import tasks  # noqa: E402
from model import Model, ModelConfig  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def padded_step(model, prompts, completions, advantages, micro_batch):
    """The right-padded baseline: micro-batches of micro_batch rollouts, each padded to its longest row."""
    n_tokens = sum(len(c.tokens) for c in completions)
    for m in range(0, len(completions), micro_batch):
        p_rows, c_rows = prompts[m:m + micro_batch], completions[m:m + micro_batch]
        rows = [list(p) + list(c.tokens) for p, c in zip(p_rows, c_rows)]
        T = max(map(len, rows)) - 1
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        targets = torch.full((len(rows), T), -100, dtype=torch.long)
        for b, (p, c) in enumerate(zip(p_rows, c_rows)):
            ids[b, :len(rows[b]) - 1] = torch.tensor(rows[b][:-1])
            targets[b, len(p) - 1:len(rows[b]) - 1] = torch.tensor(c.tokens)
        lp = model(ids, targets=targets)
        rl.grpo_loss(lp, advantages[m:m + micro_batch], targets >= 0, n_tokens).backward()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default: %(default)s)")
    ap.add_argument("--budget", type=int, default=4096, help="packed: tokens per row (default: %(default)s)")
    ap.add_argument("--micro_batch", type=int, default=32,
                    help="padded: rollouts per forward (default: %(default)s)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per domain set (default: %(default)s)")
    ap.add_argument("--rollouts", type=int, default=8, help="completions per prompt (default: %(default)s)")
    ap.add_argument("--new_tokens", type=int, default=80, help="completion budget (default: %(default)s)")
    ap.add_argument("--stop_tokens", type=int, default=60,
                    help="token ids that end a completion (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Model(ModelConfig.from_json(os.path.join(ROOT, "configs", "tiny_model.json")))
    tokenizer = load_tokenizer()
    examples = tasks.load_examples(os.path.join(ROOT, "data", "rl.jsonl"))
    print(f"tiny model, {args.prompts} prompts x {args.rollouts} rollouts x <= {args.new_tokens} tokens, "
          f"{torch.get_num_threads()} thread(s), {args.repeats} interleaved rounds")
    print(f"{'domains':>16} {'mean len':>8} {'tokens':>7} {'padded':>7} {'packed rows':>12} {'padded s':>9} "
          f"{'packed s':>9} {'ratio':>6} {'grad max diff':>14}")
    for domains in (["if"], ["mcqa", "tool", "json"], ["code"]):
        _, ids = sample.prompt_pools(examples, domains, tokenizer, True, args.new_tokens,
                                         model.config.max_position_embeddings, "data/rl.jsonl")
        prompt_ids = [p.tolist() for k in range(len(domains)) for p in ids[k][:args.prompts // len(domains) + 1]]
        prompt_ids = prompt_ids[:args.prompts]
        outs = sample.generate(model, prompt_ids, args.new_tokens, n=args.rollouts, seed=0,
                               stop_token_ids=list(range(100, 100 + args.stop_tokens)))
        prompts = [p for p in prompt_ids for _ in range(args.rollouts)]
        adv = torch.randn(len(outs), generator=torch.Generator().manual_seed(0))
        lengths = common.rollout_lengths(prompts, outs)
        n_padded = sum(max(lengths[m:m + args.micro_batch]) * len(lengths[m:m + args.micro_batch])
                       for m in range(0, len(lengths), args.micro_batch))
        n_rows = len(common.token_micro_batches(lengths, args.budget, common.Dist()))

        def packed():
            model.zero_grad(set_to_none=True)
            rl.train_step(model, prompts, outs, adv, args.budget, 0.0, common.Dist())
            return [p.grad.clone() for p in model.parameters() if p.grad is not None]

        def padded():
            model.zero_grad(set_to_none=True)
            padded_step(model, prompts, outs, adv, args.micro_batch)
            return [p.grad.clone() for p in model.parameters() if p.grad is not None]

        times, grads = {"packed": [], "padded": []}, {}
        packed(), padded()                                                   # warm-up
        for r in range(args.repeats):
            pair = [("packed", packed), ("padded", padded)]
            for name, f in pair if r % 2 == 0 else pair[::-1]:
                t0 = time.perf_counter()
                grads[name] = f()
                times[name].append(time.perf_counter() - t0)
        ratio = statistics.median(b / a for a, b in zip(times["packed"], times["padded"]))
        diff = max((a - b).abs().max().item() for a, b in zip(grads["packed"], grads["padded"]))
        mean_len = sum(len(c.tokens) for c in outs) / len(outs)
        print(f"{'+'.join(domains):>16} {mean_len:>8.1f} {sum(lengths):>7,} {n_padded:>7,} {n_rows:>12} "
              f"{statistics.median(times['padded']):>9.2f} {statistics.median(times['packed']):>9.2f} "
              f"{ratio:>5.2f}x {diff:>14.1e}", flush=True)


if __name__ == "__main__":
    main()
