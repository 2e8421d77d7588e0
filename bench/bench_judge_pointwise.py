"""
What the rating judge gets right, call by call. The RLHF stage's tiny judge (judge.py's "rating" format) is the
SFT model fine-tuned on data/generate.py's rating rows (./run.sh, step 2); this script makes such a judge with
rows of its own and reports more than `judge.py --judge` does: each of its three calls and each evidence line
against the hidden criteria, and the pairs of data/judge.jsonl its two ratings order as the criteria do.

    python bench/bench_judge_pointwise.py --init out/sft/export --out out/judge-bench --epochs 3        # run.sh's
    python bench/bench_judge_pointwise.py --init out/sft/export --out out/judge-plain --thought plain

The judge's thought either first copies what each call compares ("evidence", data/judge_sft.jsonl's: the asked
topic and format, the answer's topic and format, its last sentence and whether that sentence was said before), so
that each call has its inputs on the lines above it, or states its calls at once ("plain": "Topic no, format
yes, repeats no. Score 2."). The rows' prompts are none of data/judge.jsonl's, eval.jsonl's or rl.jsonl's.
"""
import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "data")]
import common                   # noqa: E402
import generate                 # noqa: E402  (data/generate.py: the chat domain's prompts and answers)
import judge                    # noqa: E402
import tasks                    # noqa: E402

CALLS = re.compile(r"Topic (yes|no), format (yes|no), repeats (no|yes)")
EVIDENCE = re.compile(r"Asked: (.+), (\w+)\.\nAnswer: (.+), (\w+)\.\nLast: (.*)\nSaid before: (yes|no)\.")


def write_rows(path, n, kind, seed):
    """n rating rows as data/generate.py writes data/judge_sft.jsonl, with the plain or the evidence thought."""
    taken = {r["messages"][0]["content"] for f in ("judge.jsonl", "eval.jsonl", "rl.jsonl")
             for r in map(json.loads, open(os.path.join(ROOT, "data", f))) if r.get("domain") in ("chat", "judge")}
    rows, _ = generate.make_judgements(seed, taken, ratings=n, evidence=kind == "evidence")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


class Recorded:
    """A judge that keeps what it wrote, so that the calls and evidence lines can be counted after
    judge.agreement has rated the pairs."""

    def __init__(self, judge_):
        self.judge, self.thinking, self.outs = judge_, judge_.thinking, []

    def complete(self, conversations):
        self.outs = self.judge.complete(conversations)
        return self.outs


def report(ckpt, pairs):
    """Both answers of each held-out pair rated by the checkpoint (judge.agreement), and each call and evidence
    line of its thoughts counted against the hidden criteria."""
    from tokenizer import load_tokenizer
    d = common.init_dist("cpu")
    rater = Recorded(judge.LocalJudge(common.load_policy(ckpt, d, False, trainable=False), load_tokenizer(ckpt),
                                      96, True, 64))
    agreed = judge.agreement(rater, pairs, "rating")
    items = [(r, a) for r in pairs for a in r["responses"]]             # in judge.agreement's order
    wrong = dict(topic=0, format=0, no_repeat=0)
    seen = dict(asked=0, answer_topic=0, answer_format=0, last=0, said_before=0, lines=0)
    for (r, a), out in zip(items, rater.outs):
        truth, calls = tasks.chat.criteria(r, a), CALLS.search(out or "")
        said = dict(zip(wrong, (calls[1] == "yes", calls[2] == "yes", calls[3] == "no"))) if calls else {}
        for k in wrong:
            wrong[k] += said.get(k) != truth[k]
        ev = EVIDENCE.search(out or "")
        if ev:
            want = generate.rating_evidence(r, a)
            seen["lines"] += 1
            seen["asked"] += ev[1] == want[0] and ev[2] == want[1]
            seen["answer_topic"] += ev[3] == want[2]
            seen["answer_format"] += ev[4] == want[3]
            seen["last"] += ev[5].strip() == want[4]
            seen["said_before"] += ev[6] == want[5]
    return dict(agreed, answers=len(items), wrong_calls=wrong, evidence_right=seen)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", default="out/sft/export", help="checkpoint to fine-tune (default: %(default)s)")
    ap.add_argument("--out", default="out/judge-pointwise", help="output directory (default: %(default)s)")
    ap.add_argument("--thought", default="evidence", choices=("evidence", "plain"),
                    help="the thought: the compared words copied first, or the calls at once (default: %(default)s)")
    ap.add_argument("--rows", type=int, default=8000, help="rating rows to train on (default: %(default)s)")
    ap.add_argument("--epochs", type=float, default=1, help="epochs of the fine-tune (default: %(default)s)")
    ap.add_argument("--pairs", type=int, default=200, help="held-out pairs to rate (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the rows and the fine-tune (default: %(default)s)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows_path, sft_dir = os.path.join(args.out, "rows.jsonl"), os.path.join(args.out, "sft")
    if not os.path.exists(os.path.join(sft_dir, "export", "config.json")):
        write_rows(rows_path, args.rows, args.thought, args.seed)
        cmd = [sys.executable, "sft.py", "--model", args.init, "--train_data", rows_path, "--epochs", str(args.epochs),
               "--lr", "1e-3", "--warmup_steps", "10", "--eval_data=", "--out_dir", sft_dir, "--seed", str(args.seed)]
        if subprocess.run(cmd, cwd=ROOT).returncode:
            sys.exit(f"bench: {' '.join(cmd)} failed")
    pairs = [json.loads(line) for line in open(os.path.join(ROOT, "data", "judge.jsonl"))][:args.pairs]
    result = dict(report(os.path.join(sft_dir, "export"), pairs), init=args.init, thought=args.thought, rows=args.rows,
                  epochs=args.epochs)
    print(json.dumps(result, indent=2))
    common.write_json_atomic(os.path.join(args.out, "report.json"), result)


if __name__ == "__main__":
    main()
