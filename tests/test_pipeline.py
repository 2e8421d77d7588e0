"""
The whole pipeline through ./run.sh with a handful of steps per stage: SFT -> the tiny RL cascade -> MOPD ->
scoreboard. Checks that every artefact is produced and loadable, and that a rerun skips what is finished.
"""
import json
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SMALL = ["--sft.max_steps=3", "--sft.save_every=0",
         "--rl.max_steps=1", "--rl.eval_per_domain=2", "--rl.eval_max_new_tokens=8",
         "--mopd.steps=1", "--mopd.warmup_steps=1"]    # MOPD scores with the settings cascade.json records


def run_pipeline(out, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "run.sh"), "--out", str(out), *SMALL, *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, time.perf_counter() - t0


def test_run_sh_produces_every_artefact_and_skips_finished_stages(tmp_path):
    import torch

    from model import Model
    from tokenizer import load_tokenizer

    out = tmp_path / "out"
    proc, first = run_pipeline(out)

    # every stage's HF export loads, with its tokenizer
    cascade = json.loads((out / "rl" / "cascade.json").read_text())
    names = [r["name"] for r in cascade["rows"]]
    assert names[0] == "sft" and names[-1] == "mopd" and len(names) >= 4, names
    for row in cascade["rows"]:
        export = Path(row["checkpoint"])
        assert (export / "config.json").exists(), row
        model = Model.from_pretrained(export, dtype=torch.float32)
        assert model.config.vocab_size >= load_tokenizer(export).vocab_size

    # the scoreboard: the JSON shape, rows in pipeline order, scores as fractions
    board = json.loads((out / "scoreboard.json").read_text())
    assert [r["name"] for r in board["rows"]] == names
    assert set(board["domains"]) >= {"code", "if", "json", "math", "mcqa", "tool"}
    for row in board["rows"]:
        assert set(row) >= {"name", "trained", "scores"}
        assert all(0.0 <= v <= 1.0 for v in row["scores"].values()), row
    assert board["rows"][0]["trained"] == []
    assert set(board["rows"][-1]["teachers"]) == set(board["domains"])
    assert (out / "curves.png").stat().st_size > 0
    md = (out / "scoreboard.md").read_text()
    assert "| sft |" in md and "| mopd |" in md
    assert "run.sh: wall time" in proc.stdout

    # a rerun skips every finished stage: no stage's files change and it takes a fraction of the first run
    def stage_files():   # what the stages wrote (the scoreboard at the top of out/ is redrawn every time)
        return {p: p.stat().st_mtime_ns for p in out.rglob("*")
                if p.is_file() and p.parent != out and p.name not in ("run.json", ".lock")}

    before = stage_files()
    proc, second = run_pipeline(out)
    assert "SFT is done, skipping it" in proc.stdout
    changed = [str(p) for p, m in stage_files().items() if before.get(p) != m]
    assert not changed, changed
    assert second < first / 2, (first, second)
