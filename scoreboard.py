"""
The scoreboard of a pipeline run: one row per checkpoint (SFT, each RL stage, MOPD), one column per domain
(held-out greedy pass@1), read from the cascade.json that rl.py and distill.py keep, plus the curves people look
at and a check of what the paper claims at scale:

    1. after SFT every domain is between 5% and 90% (room for RL, not hopeless);
    2. each RL stage raises each of its own domains by at least 10 points (or to at least 95%);
    3. MOPD ends within 3 points of the best teacher on every domain, and so recovers any domain that a later RL
       stage had lowered (a domain's best teacher is by definition at least as good as the stage that lowered it).

    python scoreboard.py out                        # out/rl/cascade.json -> out/scoreboard.{md,json}, out/curves.png
    python scoreboard.py out/seed0 out/seed1 out/seed2 --out out/seeds   # mean and spread over runs, seeds.png

Scores are fractions in the JSON and percentages in the table. Only held-out examples are scored (rl.py and
distill.py evaluate on eval_data; data/generate.py keeps its prompts out of the training splits).
"""
import argparse
import os
import statistics

import common

SFT_RANGE = (0.05, 0.90)      # claim 1
RL_LIFT, RL_CEILING = 0.10, 0.95  # claim 2
MOPD_GAP = 0.03               # claim 3


def read_cascade(run_dir):
    path = os.path.join(run_dir, "rl", "cascade.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no cascade.json (run ./run.sh, or rl.py and distill.py, first)")
    return common.read_cascade(path)


def scoreboard(cascade):
    """The scoreboard.json shape: {"domains": [...], "rows": [{"name", "trained", "scores", ["teachers"]}]}."""
    rows = []
    for r in cascade["rows"]:
        row = {"name": r["name"], "trained": list(r.get("trained", [])), "scores": dict(r["scores"])}
        if "teachers" in r:
            row["teachers"] = dict(r["teachers"])
        rows.append(row)
    domains = sorted({dom for r in rows for dom in r["scores"]})
    return {"domains": domains, "rows": rows}


def check_claims(board):
    """[(claim, ok, detail)] for the three claims above, on one run's scoreboard."""
    rows, domains = board["rows"], board["domains"]
    out = []
    if not rows:
        return out
    sft = rows[0]
    bad = [f"{dom} {_points(sft['scores'][dom])}%" for dom in domains
           if dom in sft["scores"] and not SFT_RANGE[0] <= sft["scores"][dom] <= SFT_RANGE[1]]
    out.append(("after SFT every domain in 5-90%", not bad, ", ".join(bad) or "all in range"))
    prev = sft
    for row in rows[1:]:
        if row["name"] == "mopd":
            break
        for dom in row["trained"]:
            before, after = prev["scores"].get(dom), row["scores"].get(dom)
            if before is None or after is None:
                continue
            ok = after - before >= RL_LIFT - 1e-9 or after >= RL_CEILING
            out.append((f"{row['name']} lifts {dom} by >= 10 points (or to >= 95%)", ok,
                        f"{_points(before)}% -> {_points(after)}% ({_points(after - before, sign=True)})"))
        prev = row
    mopd = next((r for r in rows if r["name"] == "mopd"), None)
    if mopd is not None:
        teachers = [r for r in rows if r["name"] != "mopd"]
        for dom in domains:
            best = max(r["scores"].get(dom, 0.0) for r in teachers)
            got = mopd["scores"].get(dom, 0.0)
            out.append((f"mopd within 3 points of the best teacher on {dom}", got >= best - MOPD_GAP - 1e-9,
                        f"{_points(got)}% vs best {_points(best)}% ({_points(got - best, sign=True)})"))
    return out


def _points(fraction, sign=False):
    """A score (or a difference of two) in points to 0.1, as the claims are judged: 200 held-out prompts make
    half points, which a whole-point rounding of 0.42 - 0.445 (= -2.5000000000000022) would show as -3."""
    return f"{round(fraction * 100, 1):{'+' if sign else ''}.1f}".removesuffix(".0")


def _cell(values):
    """'45.5' for one run, '45 ± 3' (mean ± population std, in whole points) for several."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return _points(mean)
    return f"{mean * 100:.0f} ± {statistics.pstdev(values) * 100:.0f}"


def format_table(boards):
    """A markdown table; with several runs each cell is mean ± std over them (rows matched by name)."""
    domains = sorted({dom for b in boards for dom in b["domains"]})
    names = [r["name"] for r in boards[0]["rows"]]
    lines = ["| checkpoint | trained | " + " | ".join(domains) + " | mean |",
             "| --- | --- | " + " | ".join("---:" for _ in domains) + " | ---: |"]
    for name in names:
        rows = [next(r for r in b["rows"] if r["name"] == name) for b in boards
                if any(r["name"] == name for r in b["rows"])]
        cells = []
        for dom in domains:
            vals = [r["scores"][dom] for r in rows if dom in r["scores"]]
            cells.append(_cell(vals) if vals else "")
        means = [statistics.fmean(r["scores"].values()) for r in rows if r["scores"]]
        trained = ", ".join(rows[0]["trained"]) or ("all (distilled)" if name == "mopd" else "-")
        lines.append(f"| {name} | {trained} | " + " | ".join(cells) + f" | {_cell(means) if means else ''} |")
    teachers = next((r.get("teachers") for r in boards[0]["rows"] if r["name"] == "mopd"), None)
    if teachers:
        lines.append("")
        label = "MOPD teachers (first run): " if len(boards) > 1 else "MOPD teachers: "
        lines.append(label + ", ".join(f"{dom} <- {t}" for dom, t in sorted(teachers.items())))
    return "\n".join(lines)


def plot_curves(run_dir, board, png_path):
    """Left: training reward per step of each RL stage (one line per stage, steps laid end to end). Middle:
    held-out pass@1 per domain across the pipeline. Right: MOPD's reverse KL to the teachers per step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    offset = 0
    for row in board["rows"][1:]:
        path = os.path.join(run_dir, "rl", row["name"], "metrics.jsonl")
        if not os.path.exists(path):
            continue
        pts = [(r["step"], r["reward"]) for r in common.read_metrics(path) if r.get("reward") is not None]
        if pts:
            axes[0].plot([offset + s for s, _ in pts], [v for _, v in pts], label=row["name"])
            offset += max(s for s, _ in pts)
    axes[0].set(title="RL: mean reward per step", xlabel="step (stages end to end)")
    names = [r["name"] for r in board["rows"]]
    for dom in board["domains"]:
        axes[1].plot(range(len(names)), [r["scores"].get(dom, float("nan")) for r in board["rows"]], marker="o",
                     label=dom)
    axes[1].set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    axes[1].set(title="held-out pass@1 per domain", ylim=(0, 1))
    path = os.path.join(run_dir, "mopd", "metrics.jsonl")
    if os.path.exists(path):
        rows = common.read_metrics(path)
        for key in sorted({k for r in rows for k in r if k.startswith("reverse_kl_")}):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            axes[2].plot([s for s, _ in pts], [v for _, v in pts], label=key.removeprefix("reverse_kl_"))
    axes[2].set(title="MOPD: reverse KL to the teacher", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def plot_seeds(boards, labels, png_path):
    """One panel per domain: held-out pass@1 across the pipeline's checkpoints, one line per run, the stages
    that train the domain shaded (where a lift is claimed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = boards[0]["domains"]
    names = [r["name"] for r in boards[0]["rows"]]
    cols = min(4, len(domains))
    rows = -(-len(domains) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, dom in zip(axes.flat, domains):
        for i, row in enumerate(boards[0]["rows"]):
            if dom in row["trained"] and row["name"] != "mopd":
                ax.axvspan(i - 0.5, i + 0.5, color="tab:green", alpha=0.12)
        for board, label in zip(boards, labels):
            by_name = {r["name"]: r["scores"].get(dom, float("nan")) for r in board["rows"]}
            ax.plot(range(len(names)), [100 * by_name.get(n, float("nan")) for n in names], marker="o", label=label)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7, ha="right")
        ax.set(title=dom, ylim=(0, 100))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(domains):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    axes.flat[0].set_ylabel("held-out pass@1 (%)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="pipeline output directories (each holds rl/cascade.json)")
    ap.add_argument("--out", default="", help="where scoreboard.{md,json} (and curves.png for one run, seeds.png "
                                              "for several) go "
                                              "(default: the run directory when one run is given)")
    args = ap.parse_args(argv)
    if len(args.runs) > 1 and not args.out:
        ap.error("--out is required with several runs")
    out = args.out or args.runs[0]
    os.makedirs(out, exist_ok=True)
    boards = [scoreboard(read_cascade(r)) for r in args.runs]
    table = format_table(boards)
    claims = [check_claims(b) for b in boards]
    lines = [f"# Scoreboard ({len(boards)} run{'s' if len(boards) > 1 else ''}: {', '.join(args.runs)})", "",
             "Held-out greedy pass@1 (%)" + (", mean ± std over runs" if len(boards) > 1 else "") + ".", "",
             table, "", "## The paper's claims at tiny scale", ""]
    for i, run_claims in enumerate(zip(*claims) if len(boards) > 1 else [[c] for c in claims[0]]):
        name = run_claims[0][0]
        oks = [c[1] for c in run_claims]
        details = "; ".join(c[2] for c in run_claims)
        lines.append(f"- {'PASS' if all(oks) else 'FAIL'} ({sum(oks)}/{len(oks)} runs) {name}: {details}")
    md = "\n".join(lines) + "\n"
    common._write_atomic(os.path.join(out, "scoreboard.md"), md)
    result = boards[0] if len(boards) == 1 else {"runs": args.runs, "boards": boards}
    common.write_json_atomic(os.path.join(out, "scoreboard.json"), result)
    if len(boards) == 1:
        plot_curves(args.runs[0], boards[0], os.path.join(out, "curves.png"))
    else:
        plot_seeds(boards, [os.path.basename(os.path.normpath(r)) for r in args.runs], os.path.join(out, "seeds.png"))
    print(md)
    return boards


if __name__ == "__main__":
    main()
