"""The owner-channel reading (click4caption/shapes/owners.py): hand-computed geometry and
tallies, the reading wired to the Q-Former's real output on the shipped model, and
``shapes_curves --owners`` on a training run's checkpoints and on an exported model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from click4caption.shapes.owners import border_distance, object_corners, summarise, tally
from tests.test_shapes_eval import run_app


def test_object_corners_scale_xywh_boxes_to_model_pixels() -> None:
    # a 448 x 224 image into 224 model pixels: x halves, y stays
    got = object_corners([{"box": [100, 50, 40, 40]}, {"box": [0, 0, 448, 224]}], 448, 224, 224)
    assert got.tolist() == [[[50.0, 50.0], [70.0, 90.0]], [[0.0, 0.0], [224.0, 224.0]]]


def test_border_distance_in_cells_from_the_nearest_inner_line() -> None:
    # 4 x 4 grid over 224 px: cells of 56 px, inner lines at 56, 112, 168
    corners = torch.tensor([[[50.0, 10.0], [62.0, 22.0]],     # centre (56, 16): on the line x = 56
                            [[74.0, 74.0], [94.0, 94.0]],     # centre (84, 84): 1.5 cells, mid-cell
                            [[100.0, 150.0], [110.0, 160.0]],  # centre (105, 155): y 2.768 -> 0.232, x 1.875 -> 0.125
                            [[0.0, 0.0], [10.0, 10.0]]])       # centre (5, 5): 0.089 cells, but the image edge is no line
    got = border_distance(corners, 4, 224)
    assert got.tolist() == pytest.approx([0.0, 0.5, 0.125, 1 - 5 / 56])
    assert border_distance(corners, 1, 224).tolist() == [math.inf] * 4


def test_tally_names_each_wrong_query_by_its_object() -> None:
    # 2 x 2 grid over 224 px (cells of 112 px); objects A (centre (90, 90)) in cell 0, B (170, 170) in cell 3
    corners = torch.tensor([[[80.0, 80.0], [100.0, 100.0]], [[150.0, 150.0], [190.0, 190.0]]])
    owners = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0]])  # QxM
    cell_centres = torch.tensor([[56.0, 56.0], [168.0, 56.0], [56.0, 168.0], [168.0, 168.0]])
    border = torch.tensor([0.3, 0.7])
    probs = torch.tensor([0.9, 0.2, 0.6, 0.1])  # q2 claims without owning, q3 misses B
    got = tally(probs, owners, cell_centres, corners, border)
    assert got["count"] == 2 and got["said"] == pytest.approx(1.8)
    # q2 owns none: its cell centre (56, 168) is nearer A (34^2 + 78^2 = 7,240) than B
    # (114^2 + 2^2 = 13,000), so q2 is named by A's distance; q3 owns B
    assert got["wrong"] == pytest.approx([0.3, 0.7])
    # a shared target (ramp): 0.5 each, probabilities within 0.5 are not wrong
    shared = tally(torch.tensor([0.4, 0.6, 0.0, 0.0]), torch.tensor([[0.5], [0.5], [0.0], [0.0]]), cell_centres,
                   corners[:1], border[:1])
    assert shared["wrong"] == [] and shared["said"] == pytest.approx(1.0)


def test_summarise_rounds_the_sum_and_bins_the_wrong_queries() -> None:
    tallies = [{"count": 2, "said": 2.3, "wrong": []},
               {"count": 3, "said": 2.4, "wrong": [0.01, 0.07]},
               {"count": 1, "said": 1.6, "wrong": [0.15, 0.5, 0.049]}]
    got = summarise(tallies, num_queries=16)
    assert (got["n"], got["right"], got["under"], got["over"]) == (3, 1, 1, 1)
    assert got["value"] == pytest.approx(1 / 3)
    assert got["queries"] == 48 and got["wrong_queries"] == 5
    assert got["wrong_by_border"] == {"<0.05": 2, "<0.1": 1, "<0.2": 1, ">=0.2": 1}


def test_read_owners_reads_the_query_channel_of_the_shipped_model(tmp_path: Path) -> None:
    """Forcing every learned query's first output channel to "owns" (the Q-Former's real
    output, changed by a hook before the reading's) must give: every scene overcounted
    (scenes hold fewer than 16 objects) and, with one owner query per object, exactly
    16 - count wrong queries per scene. Reading any other row or channel fails this."""
    from click4caption.captioner import Captioner
    from click4caption.config import load_config
    from click4caption.paths import default_config_path
    from click4caption.shapes.owners import read_owners
    from click4caption.shapes.scoring import make_eval_items

    captioner = Captioner.from_config(load_config(default_config_path()))
    q = captioner.model.num_query_token

    def claim_all(_module, _args, out):
        out.last_hidden_state[:, :q, 0] = 10.0
        out.last_hidden_state[:, q:, 0] = -10.0  # the corner tokens are not queries

    items = make_eval_items(7, 3, tmp_path / "images")
    counts = [it["meta"]["count"] for it in items if it["meta"]["kind"] == "whole"]
    hook = captioner.model.qformer.register_forward_hook(claim_all)
    try:
        got = read_owners(captioner, items, grid=4)
    finally:
        hook.remove()
    assert got["n"] == 3 and got["over"] == 3 and got["right"] == 0
    assert got["wrong_queries"] == sum(q - c for c in counts)
    assert sum(got["wrong_by_border"].values()) == got["wrong_queries"]
    # and the model as trained: a count from its own channel, every item tallied once
    plain = read_owners(captioner, items, grid=4)
    assert plain["right"] + plain["under"] + plain["over"] == 3 and plain["queries"] == 3 * q


def test_learning_curves_with_owners(tmp_path: Path) -> None:
    """``shapes_curves --owners``: an owner column for a run's checkpoints (grid from the
    checkpoint's config) and for an exported model (``--grid``); without a grid a one-line
    error."""
    from tests.fixtures_train import tiny_train_config

    cfg = tiny_train_config(tmp_path, iters=3, save_every=3,
                            model={"box_attention_loss_weight": 1.0, "box_attention_grid": 2})
    proc = run_app("train.py", "--cfg-path", str(cfg), "--exp_name", "owners")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "output" / "owners"
    proc = run_app("-m", "click4caption_apps.shapes_curves", str(run), "--scenes", "2", "--seed", "3", "--owners")
    assert proc.returncode == 0, proc.stderr
    row = json.loads((run / "curves.json").read_text())["3"]
    owners = row["owners"]
    assert owners["n"] == 2 and owners["queries"] == 2 * 4
    assert owners["right"] + owners["under"] + owners["over"] == 2
    assert proc.stdout.splitlines()[0].endswith("| owner count |")
    assert proc.stdout.splitlines()[2].endswith(f"({owners['under']} under, {owners['over']} over) |")

    out = tmp_path / "shipped.json"
    proc = run_app("-m", "click4caption_apps.shapes_curves", "models/shapes/click4caption_shapes.pth",
                   "--scenes", "2", "--owners", "--grid", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    shipped = json.loads(out.read_text())["click4caption_shapes.pth"]
    assert shipped["scores"]["whole"]["n"] == 2 and shipped["owners"]["queries"] == 2 * 16

    proc = run_app("-m", "click4caption_apps.shapes_curves", "models/shapes/click4caption_shapes.pth",
                   "--scenes", "2", "--owners", "--out", str(out))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "--grid" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_owner_ramp_out_of_range_is_refused_before_any_work() -> None:
    proc = run_app("-m", "click4caption_apps.shapes_curves", "models/shapes/click4caption_shapes.pth",
                   "--owners", "--grid", "4", "--ramp", "1.5")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --ramp must be in [0, 1]")
    assert len(proc.stderr.strip().splitlines()) == 1
