"""
Can a tiny judge read the chat criteria when it rates one answer at a time? An experiment beside the pipeline's
pairwise judge (judge.py), whose per-answer calls are at chance (docs/results.md). It writes pointwise judgement
rows (one chat answer, a 0-3 rating: how many of tasks/chat.py's criteria hold), fine-tunes a checkpoint on them
with sft.py, and rates both answers of each held-out pair of data/judge.jsonl:

    python bench/bench_judge_pointwise.py --init out/sft/export --out out/judge-pointwise            # evidence
    python bench/bench_judge_pointwise.py --init out/sft/export --out out/judge-plain --thought plain

The judge's thought either states its calls at once ("plain": "Topic no, format yes, repeats no. Score 2.") or
first copies what each call compares ("evidence": the asked topic and format, the answer's topic and format, its
last sentence and whether that sentence was said before), so that each call has its inputs on the lines above it.
The report counts each call and each evidence line against the hidden criteria, and a pair as agreed when the two
ratings order its answers as the criteria do. The rows' prompts are none of data/judge.jsonl's, eval.jsonl's or
rl.jsonl's. Not part of ./run.sh.
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "data")]
import common                   # noqa: E402
import generate                 # noqa: E402  (data/generate.py: the chat domain's prompts and answers)
import judge                    # noqa: E402
import tasks                    # noqa: E402

INSTRUCTION = "Rate the answer: the asked topic, the asked format, no sentence said twice. End with [[0]] to [[3]]."
RATING = re.compile(r"\[\[\s*([0-3])\s*\]\]")
CALLS = re.compile(r"Topic (yes|no), format (yes|no), repeats (no|yes)")
EVIDENCE = re.compile(r"Asked: (.+), (\w+)\.\nAnswer: (.+), (\w+)\.\nLast: (.*)\nSaid before: (yes|no)\.")


def rating_messages(prompt_messages, answer):
    context = judge.conversation_text(prompt_messages)
    return [{"role": "user", "content": f"{INSTRUCTION}\n\n{context}\n\n[Answer]\n{answer.strip()}"}]


def topic_of(answer):
    """The topic whose phrases the answer uses ("none" when none does)."""
    low = answer.lower()
    return next((t for t, forms in generate.TOPICS.items() if any(p.lower() in low for p in forms)), "none")


def format_of(answer):
    lines = [ln.strip() for ln in answer.strip().splitlines() if ln.strip()]
    items = [ln for ln in lines if ln.startswith("- ")]
    return "list" if len(lines) >= 2 and len(items) == len(lines) else "mixed" if items else "prose"


def evidence(example, answer):
    """What each call compares: (asked topic, asked format, answer topic, answer format, last sentence, said before)."""
    said = tasks.chat.sentences(answer)
    asked = next(t for t, forms in generate.TOPICS.items() if forms == example["topic"])
    return (asked, example["format"], topic_of(answer), format_of(answer), said[-1] if said else "",
            "yes" if said and said[-1] in said[:-1] else "no")


def thought(example, answer, kind):
    met = tasks.chat.criteria(example, answer)
    asked, fmt, topic, form, last, before = evidence(example, answer)
    lines = [f"Asked: {asked}, {fmt}."]
    if kind == "evidence":
        lines += [f"Answer: {topic}, {form}.", f"Last: {last}", f"Said before: {before}."]
    lines.append(f"Topic {'yes' if met['topic'] else 'no'}, format {'yes' if met['format'] else 'no'}, "
                 f"repeats {'no' if met['no_repeat'] else 'yes'}. Score {sum(met.values())}.")
    return "\n".join(lines)


def write_rows(path, n, kind, seed):
    """n rating rows, each criterion broken with probability 0.4 (as data/generate.py's judgement pairs)."""
    taken = {r["messages"][0]["content"] for f in ("judge.jsonl", "eval.jsonl", "rl.jsonl")
             for r in map(json.loads, open(os.path.join(ROOT, "data", f))) if r.get("domain") in ("chat", "judge")}
    rng, rows = random.Random(f"{seed}:pointwise:{kind}"), []
    while len(rows) < n:
        example = generate.chat_prompt(rng)
        if example["messages"][0]["content"] in taken:
            continue
        answer = generate.chat_answer(rng, example, [f for f in tasks.chat.CRITERIA if rng.random() < 0.4])
        turn = generate.answer_turn(thought(example, answer, kind), f"[[{tasks.chat.score(example, answer)}]]")
        rows.append({"domain": "judge", "messages": rating_messages(example["messages"], answer) + [turn]})
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def report(ckpt, pairs):
    """Both answers of each held-out pair rated by the checkpoint, counted against the hidden criteria."""
    from tokenizer import load_tokenizer
    d = common.init_dist("cpu")
    rater = judge.LocalJudge(common.load_policy(ckpt, d, False, trainable=False), load_tokenizer(ckpt), 96, True, 64)
    items = [(r, a) for r in pairs for a in r["responses"]]
    outs = rater.complete([rating_messages(r["messages"], a) for r, a in items])
    wrong = dict(topic=0, format=0, no_repeat=0)
    seen = dict(asked=0, answer_topic=0, answer_format=0, last=0, said_before=0, lines=0)
    ratings, rating_errors = [], 0
    for (r, a), out in zip(items, outs):
        rating = judge.parse_verdict(out, True, RATING)
        ratings.append(None if rating is None else int(rating))
        truth, calls = tasks.chat.criteria(r, a), CALLS.search(out or "")
        rating_errors += ratings[-1] != sum(truth.values())
        said = dict(zip(wrong, (calls[1] == "yes", calls[2] == "yes", calls[3] == "no"))) if calls else {}
        for k in wrong:
            wrong[k] += said.get(k) != truth[k]
        ev = EVIDENCE.search(out or "")
        if ev:
            want = evidence(r, a)
            seen["lines"] += 1
            seen["asked"] += ev[1] == want[0] and ev[2] == want[1]
            seen["answer_topic"] += ev[3] == want[2]
            seen["answer_format"] += ev[4] == want[3]
            seen["last"] += ev[5].strip() == want[4]
            seen["said_before"] += ev[6] == want[5]
    agreed = decided = 0
    for i, r in enumerate(pairs):
        a, b = (1.5 if x is None else x for x in ratings[2 * i:2 * i + 2])   # no rating: the middle of 0-3
        if r["better"] != "C":
            decided += 1
            agreed += a > b if r["better"] == "A" else b > a
    return dict(answers=len(items), wrong_calls=wrong, rating_errors=rating_errors,
                unparsable=ratings.count(None), pair_agreement=f"{agreed}/{decided}", evidence_right=seen)


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
