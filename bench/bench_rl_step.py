"""
One GRPO training step (forward + backward of the rollouts' log-probs) on a batch of the tiny default, three
layouts side by side in the same run.

    shared   what rl.py and distill.py do (rl.train_step): the rollouts of a prompt run it once, then continue
             from its cache (common.shared_prompt_logprobs), micro-batches of at most --budget padded tokens
    packed   every rollout a document of a packed row (its prompt and completion; common.packed_logprobs), rows
             of at most --budget tokens, first-fit by decreasing length: the prompt runs once per rollout
    padded   micro-batches of --micro_batch rollouts, each right-padded to its longest row

The model is configs/tiny_model.json (random weights, fixed seed); the prompts are the first --prompts of each
domain set in data/rl.jsonl, x --rollouts completions sampled from that model. A random model's tokens are near
uniform, so --stop_tokens token ids are made stop tokens: completions end after about vocab / stop_tokens tokens
(capped at --new_tokens), varied as a trained model's are. Prompt lengths vary too (tool prompts carry schemas).
Runs are interleaved (the order rotates each round); the ratios are medians of per-round ratios against shared.
The gradients of the layouts are compared (the same up to float rounding).

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
    ap.add_argument("--budget", type=int, default=4096, help="shared and packed: tokens per forward "
                    "(default: %(default)s)")
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
    print(f"{'domains':>16} {'mean len':>8} {'shared':>8} {'packed':>8} {'shared s':>9} {'packed s':>9} "
          f"{'padded s':>9} {'packed/sh':>8} {'padded/sh':>8} {'grad diff':>10}")
    print(f"{'':>16} {'(compl.)':>8} {'tokens':>8} {'tokens':>8}")
    for domains in (["if"], ["mcqa", "tool", "json"], ["code"], ["longctx"], ["chat"]):
        _, ids = sample.prompt_pools(examples, domains, tokenizer, True, args.new_tokens,
                                         model.config.max_position_embeddings, "data/rl.jsonl")
        prompt_ids = [p.tolist() for k in range(len(domains)) for p in ids[k][:args.prompts // len(domains) + 1]]
        prompt_ids = prompt_ids[:args.prompts]
        outs = sample.generate(model, prompt_ids, args.new_tokens, n=args.rollouts, seed=0,
                               stop_token_ids=list(range(100, 100 + args.stop_tokens)))
        prompts = [p for p in prompt_ids for _ in range(args.rollouts)]
        adv = torch.randn(len(outs), generator=torch.Generator().manual_seed(0))
        lengths = [len(p) + len(c.tokens) - 1 for p, c in zip(prompts, outs)]
        shared_tokens = sum(len(p) - 1 for p in prompt_ids) + sum(len(c.tokens) for c in outs)

        def grads_of(step):
            def run():
                model.zero_grad(set_to_none=True)
                step()
                return [p.grad.clone() for p in model.parameters() if p.grad is not None]
            return run

        steps = {"shared": grads_of(lambda: rl.train_step(model, prompts, outs, adv, args.budget, 0.0, common.Dist())),
                 "packed": grads_of(lambda: packed_step(model, prompts, outs, adv, args.budget)),
                 "padded": grads_of(lambda: padded_step(model, prompts, outs, adv, args.micro_batch))}
        times, grads = {name: [] for name in steps}, {}
        for f in steps.values():                                             # warm-up
            f()
        names = list(steps)
        for r in range(args.repeats):
            for name in names[r % 3:] + names[:r % 3]:
                t0 = time.perf_counter()
                grads[name] = steps[name]()
                times[name].append(time.perf_counter() - t0)
        ratio = {k: statistics.median(b / a for a, b in zip(times["shared"], times[k])) for k in ("packed", "padded")}
        diff = max((a - b).abs().max().item() for k in ("packed", "padded") for a, b in zip(grads["shared"], grads[k]))
        mean_len = sum(len(c.tokens) for c in outs) / len(outs)
        print(f"{'+'.join(domains):>16} {mean_len:>8.1f} {shared_tokens:>8,} {sum(lengths):>8,} "
              f"{statistics.median(times['shared']):>9.2f} {statistics.median(times['packed']):>9.2f} "
              f"{statistics.median(times['padded']):>9.2f} {ratio['packed']:>7.2f}x {ratio['padded']:>7.2f}x "
              f"{diff:>10.1e}", flush=True)


def packed_step(model, prompts, completions, advantages, budget):
    """Every rollout a document of a packed row of at most `budget` tokens (first-fit by decreasing length)."""
    n_tokens = sum(len(c.tokens) for c in completions)
    lengths = [len(p) + len(c.tokens) - 1 for p, c in zip(prompts, completions)]
    rows, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = next((k for k, r in enumerate(room) if lengths[i] <= r), None)
        if k is None:
            rows.append([]), room.append(budget)
            k = len(rows) - 1
        rows[k].append(i)
        room[k] -= lengths[i]
    for row in rows:
        lp, mask = common.packed_logprobs(model, [prompts[i] for i in row], [completions[i] for i in row], "cpu")
        rl.grpo_loss(lp, advantages[row], mask, n_tokens).backward()


if __name__ == "__main__":
    main()
