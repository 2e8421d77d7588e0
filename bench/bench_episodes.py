"""
Benchmark multi-turn rollouts: generate_episodes (the caches carried across turns: a turn prefills only the
environment's reply) against re-prefilling the whole history every turn (one generate call per turn on prompt +
everything so far, the way a stateless engine serves an agent loop).

Both play the same greedy episodes on the same random model: every turn ends at a stop token or after
--turn-tokens tokens, the environment answers each finished turn with --reply-tokens tokens, and an episode has
--turns turns. Both produce the same tokens (checked: the share of episodes whose tokens agree exactly is
printed; random weights have near-ties, so a few may part late). Runs are interleaved (ours, baseline, baseline,
ours, ...) so load drift hits both alike; the ratio is the median of per-round ratios (> 1: carried caches are
faster), in wall time and in process CPU time.

The model is the tiny default's (configs/tiny_model.json), random; prompts of --prompt-tokens tokens.

    python bench/bench_episodes.py [--episodes 32] [--turns 4] [--repeats 3] [--threads 1]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from model import Model, ModelConfig  # noqa: E402
from sample import generate, generate_episodes  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def reply_of(turn_tokens, length):
    """The environment's reply to a turn: `length` ids that depend on what was sampled."""
    return [(turn_tokens[0] + 7 * k) % 1000 + 20 for k in range(length)]


def ours(model, prompts, args, stop):
    def respond(episodes, turns):
        return [reply_of(t, args.reply_tokens) for t in turns]
    out = generate_episodes(model, prompts, args.turn_tokens, respond, max_turns=args.turns, max_tokens=10 ** 6,
                            temperature=0, stop_token_ids=stop)
    return [c.tokens for c in out], sum(sum(c.mask) for c in out)


def reprefill(model, prompts, args, stop):
    """The baseline: every turn, one generate call over each live episode's whole history."""
    history = [list(p) for p in prompts]
    tokens = [[] for _ in prompts]
    live = list(range(len(prompts)))
    policy = 0
    for turn in range(args.turns):
        outs = generate(model, [history[e] for e in live], args.turn_tokens, temperature=0, stop_token_ids=stop)
        going = []
        for e, c in zip(live, outs):
            tokens[e] += c.tokens
            history[e] += c.tokens
            policy += len(c.tokens)
            if c.finish_reason == "stop" and turn + 1 < args.turns:
                reply = reply_of(c.tokens, args.reply_tokens)
                tokens[e] += reply
                history[e] += reply
                going.append(e)
        live = going
        if not live:
            break
    return tokens, policy


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--episodes", type=int, default=32, help="episodes played at once")
    p.add_argument("--turns", type=int, default=4, help="assistant turns per episode")
    p.add_argument("--prompt-tokens", type=int, default=200, help="prompt length (about the tiny agent prompts)")
    p.add_argument("--turn-tokens", type=int, default=48, help="a turn's token budget")
    p.add_argument("--reply-tokens", type=int, default=40, help="tokens of each environment reply")
    p.add_argument("--stop-every", type=int, default=40, help="every this many ids of the vocabulary is a stop id "
                   "(turns of different lengths, as a trained policy's)")
    p.add_argument("--repeats", type=int, default=3, help="rounds (each runs both twice, interleaved)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig.from_json(os.path.join(ROOT, "configs", "tiny_model.json"))
    model = Model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, cfg.vocab_size, (args.prompt_tokens - (i % 7) * 5,), generator=g).tolist()
               for i in range(args.episodes)]
    stop = list(range(3, cfg.vocab_size, args.stop_every))

    a, policy = ours(model, prompts, args, stop)                         # warm-up, and the agreement check
    b, policy_b = reprefill(model, prompts, args, stop)
    agree = sum(x == y for x, y in zip(a, b)) / len(a)
    print(f"{args.episodes} episodes x {args.turns} turns (prompt {args.prompt_tokens}, turn <= {args.turn_tokens}, "
          f"reply {args.reply_tokens} tokens), {args.threads} thread(s); {policy} policy tokens, "
          f"episodes agreeing exactly: {agree:.0%}")
    wall, cpu = {"ours": [], "base": []}, {"ours": [], "base": []}
    for r in range(args.repeats):
        for name in (["ours", "base", "base", "ours"] if r % 2 == 0 else ["base", "ours", "ours", "base"]):
            fn = ours if name == "ours" else reprefill
            w0, c0 = time.perf_counter(), time.process_time()
            fn(model, prompts, args, stop)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    pairs = lambda d: [(d["base"][i] / d["ours"][i]) for i in range(len(d["ours"]))]
    for clock, d in (("wall", wall), ("cpu", cpu)):
        o, b_ = statistics.median(d["ours"]), statistics.median(d["base"])
        print(f"{clock:>4}: carried caches {o:6.2f} s ({args.episodes / o:6.2f} episodes/s, {policy / o:7.0f} policy "
              f"tokens/s) | re-prefill {b_:6.2f} s ({args.episodes / b_:6.2f} episodes/s, {policy_b / b_:7.0f} "
              f"tokens/s) | ratio {statistics.median(pairs(d)):.2f}x")


if __name__ == "__main__":
    main()
