"""The shapes evaluation as a user runs it: ``evaluate.py shapes`` on the shipped model
(both generators, the follow-up row) answers exactly what ``inference.py --batch_file``
answers on the same items, and the learning-curve app scores a training run's checkpoints."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from click4caption.paths import PROJECT_ROOT

ROOT = PROJECT_ROOT


def run_app(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("generator", ["shapes", "heldout"])
def test_evaluate_shapes_matches_the_cli(tmp_path: Path, generator: str) -> None:
    out = tmp_path / "eval"
    proc = run_app("evaluate.py", "shapes", "--scenes", "3", "--seed", "5", "--generator", generator,
                   "--out", str(out))
    assert proc.returncode in (0, 1), proc.stderr  # 1: a bar missed, still a full table
    scores = json.loads((out / "scores.json").read_text())
    items = read_jsonl(out / "items.jsonl")
    results = read_jsonl(out / "results.jsonl")
    followups = read_jsonl(out / "followups.jsonl")
    assert len(items) == 3 * 7  # per scene: describe, colour, shape, size, whole image, two pair kinds
    single = [r for r in results if "turns" not in r]
    assert [r["question"] for r in single] == [it["question"] for it in items]
    for kind in ("describe", "color", "shape", "size", "same_color", "same_shape", "whole"):
        assert scores[kind]["n"] == 3, kind
    if generator == "shapes":
        assert len(followups) == 2 * 3 and scores["followup"]["n"] == 2 * 3
        assert all(len(r["replies"]) == len(r["turns"]) for r in results if "turns" in r)
    else:
        assert followups == [] and "followup" not in scores
    # the same items through the CLI's batch mode give the same answers
    cli_out = tmp_path / "cli.jsonl"
    proc = run_app("inference.py", "--batch_file", str(out / "items.jsonl"), "--output_file", str(cli_out))
    assert proc.returncode == 0, proc.stderr
    assert [r["answer"] for r in read_jsonl(cli_out)] == [r["answer"] for r in single]


def test_learning_curves_of_a_run(tmp_path: Path) -> None:
    """``python -m click4caption_apps.shapes_curves RUN`` scores each checkpoint of a run
    (here a tiny training run) and keys the rows by the checkpoint's iteration."""
    from tests.fixtures_train import tiny_train_config

    cfg = tiny_train_config(tmp_path, iters=6, save_every=3)
    proc = run_app("train.py", "--cfg-path", str(cfg), "--exp_name", "curves")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "output" / "curves"
    proc = run_app("-m", "click4caption_apps.shapes_curves", str(run), "--scenes", "2", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((run / "curves.json").read_text())
    assert sorted(rows, key=int) == ["3", "6"]
    for row in rows.values():
        assert row["scenes"] == 2 and row["generator"] == "shapes"
        assert {k: v["n"] for k, v in row["scores"].items()} == {
            "describe": 2, "color": 2, "shape": 2, "size": 2, "same_color": 2, "same_shape": 2, "whole": 2,
            "followup": 4}
    table = proc.stdout.splitlines()
    assert table[0].startswith("| iterations |") and [line.split("|")[1].strip() for line in table[2:]] == ["3", "6"]


@pytest.mark.parametrize("args", [["--scenes", "0"], ["--scenes", "-3"], ["--max_new_tokens", "0"],
                                  ["--generator", "other"]])
def test_evaluate_shapes_bad_arguments(args: list[str]) -> None:
    proc = run_app("evaluate.py", "shapes", *args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
