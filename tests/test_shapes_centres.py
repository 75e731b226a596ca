"""The object-centre reading (click4caption/shapes/centres.py): peaks counted by hand, and
the reading wired to the real image tokens of the shipped model (``ln_vision``'s output,
the CLS token dropped), and ``shapes_curves --centres``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from click4caption.shapes.centres import count_centres, summarise
from tests.test_shapes_eval import run_app


def test_count_centres_counts_peaks_above_the_threshold() -> None:
    probs = torch.zeros(4, 4)
    probs[0, 0], probs[0, 1] = 0.9, 0.7  # one object: its neighbour is no second peak
    probs[3, 3] = 0.6                    # a second
    probs[2, 0] = 0.4                    # below the threshold
    assert count_centres(probs) == 2
    assert count_centres(probs, threshold=0.3) == 3
    probs[0, 2] = 0.8  # a peak of its own: its neighbour (0, 1) is lower, (0, 0) is two patches away
    assert count_centres(probs) == 3


def test_summarise_compares_peaks_with_counts() -> None:
    got = summarise([2, 3, 5, 4], [2, 4, 4, 4])
    assert (got["n"], got["right"], got["under"], got["over"]) == (4, 2, 1, 1)
    assert got["value"] == pytest.approx(0.5)


def test_read_centres_reads_channel_zero_of_the_image_patches(tmp_path: Path) -> None:
    """Forcing ``ln_vision``'s channel 0 of the patch tokens (index 1 on: index 0 is the CLS
    token the model drops) to the true centre map must count every scene right; forcing it
    low everywhere must undercount every scene. Reading another token offset or channel
    fails the first."""
    from PIL import Image

    from click4caption.captioner import Captioner
    from click4caption.config import load_config
    from click4caption.models.object_centres import centre_targets
    from click4caption.paths import default_config_path
    from click4caption.shapes.centres import read_centres
    from click4caption.shapes.owners import object_corners
    from click4caption.shapes.scoring import make_eval_items

    captioner = Captioner.from_config(load_config(default_config_path()))
    model = captioner.model
    grid, size = model.visual_encoder.grid_size, captioner.image_size
    items = [it for it in make_eval_items(7, 4, tmp_path / "images") if it["meta"]["kind"] == "whole"]
    maps = []
    for it in items:
        with Image.open(it["image"]) as im:
            corners = object_corners(it["meta"]["objects"], im.width, im.height, size)
        targets, _ = centre_targets(corners[None], torch.tensor([len(corners)]), grid, size)
        maps.append(targets[0].flatten() * 20 - 10)
    forced = iter(maps)

    def force(_module, _args, out):
        out[:, 1:, 0] = next(forced)
        out[:, 0, 0] = 10.0  # a CLS token read as a patch would add a peak

    hook = model.ln_vision.register_forward_hook(force)
    try:
        got = read_centres(captioner, items)
    finally:
        hook.remove()
    assert got["n"] == 4 and got["right"] == 4
    def low(_module, _args, out):
        out[..., 0] = -10.0

    hook = model.ln_vision.register_forward_hook(low)
    try:
        assert read_centres(captioner, items)["under"] == 4
    finally:
        hook.remove()


def test_learning_curves_with_centres(tmp_path: Path) -> None:
    """``shapes_curves --centres`` on a run trained with the object-centre aid: a column
    and a ``centres`` entry per checkpoint."""
    from tests.fixtures_train import tiny_train_config

    cfg = tiny_train_config(tmp_path, iters=3, save_every=3, model={"object_centre_weight": 0.5})
    proc = run_app("train.py", "--cfg-path", str(cfg), "--exp_name", "centres")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "output" / "centres"
    proc = run_app("-m", "click4caption_apps.shapes_curves", str(run), "--scenes", "2", "--seed", "3", "--centres")
    assert proc.returncode == 0, proc.stderr
    centres = json.loads((run / "curves.json").read_text())["3"]["centres"]
    assert centres["n"] == 2 and centres["right"] + centres["under"] + centres["over"] == 2
    assert proc.stdout.splitlines()[0].endswith("| centre count |")
    assert proc.stdout.splitlines()[2].endswith(f"({centres['under']} under, {centres['over']} over) |")
