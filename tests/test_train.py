"""The trainer: optimiser and schedule of the recipe, atomic checkpoints that resume
exactly, the app's command line, and a 2-process torchrun run over data in every real
format that is killed and resumed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from click4caption.config import from_dict, load_config
from click4caption.errors import Click4CaptionError, ConfigError
from click4caption.training import checkpointing as ckpt_io
from click4caption.training.loop import Trainer, run_training
from click4caption.training.budget import RATE_MIN_SHARE, TimeBudget, fit_total
from click4caption.training.optim import check_schedule, lr_at, param_groups
from tests.fixtures_train import tiny_train_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = REPO_ROOT / "train_configs" / "click4caption_train.yaml"


def tensors_equal(a, b) -> bool:
    """Deep equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def tensors_close(a: dict, b: dict, atol: float = 1e-5) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a)


def relative_distance(a: dict, b: dict) -> float:
    """``|a - b| / |b|`` over all tensors of two state dicts with the same keys."""
    assert a.keys() == b.keys()
    diff = sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a)
    norm = sum(float(b[k].float().pow(2).sum()) for k in a)
    return (diff / max(norm, 1e-12)) ** 0.5


# ----------------------------------------------------------------------------- schedule and optimiser
def test_lr_schedule_is_the_recipe() -> None:
    run = load_config(SHIPPED).run
    assert lr_at(0, run) == pytest.approx(1e-6)
    assert lr_at(10_000, run) == pytest.approx((1e-6 + 5e-5) / 2)
    assert lr_at(20_000, run) == pytest.approx(5e-5)
    # cosine over the remaining 30 * 10000 - 20000 steps
    assert lr_at(20_000 + 140_000, run) == pytest.approx((5e-5 + 1e-5) / 2)
    assert lr_at(300_000 - 1, run) == pytest.approx(1e-5, rel=1e-3)
    assert all(lr_at(s, run) >= lr_at(s + 1000, run) for s in range(20_000, 299_000, 7_000))


def test_param_groups_skip_frozen_and_exempt_norms_biases() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model.register_parameter("queries", torch.nn.Parameter(torch.zeros(1, 3, 4)))
    model[2].weight.requires_grad_(False)
    groups, names = param_groups(model, 0.05)
    assert names[0] == ["queries", "0.weight"]
    assert names[1] == ["0.bias", "1.weight", "1.bias", "2.bias"]
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0


# ----------------------------------------------------------------------------- checkpoint files
def test_atomic_save_never_leaves_a_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "checkpoint_last.pth"
    ckpt_io.atomic_save({"model": {"w": torch.ones(2)}}, target)

    def dying_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # as if killed while writing

    monkeypatch.setattr(ckpt_io.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt_io.atomic_save({"model": {"w": torch.zeros(2)}}, target)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pth"]  # no temporary left
    assert torch.equal(ckpt_io.load_checkpoint(target)["model"]["w"], torch.ones(2))  # old one intact


def test_rotation_keeps_the_newest(tmp_path: Path) -> None:
    for it in (10, 20, 30, 40):
        ckpt_io.write_checkpoint({"model": {}, "iteration": it}, tmp_path, it, keep_last=2,
                                 epoch_end=0 if it == 20 else None)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint_0.pth", "checkpoint_iter00000030.pth", "checkpoint_iter00000040.pth",
                     "checkpoint_last.pth"]
    assert ckpt_io.load_checkpoint(tmp_path / "checkpoint_last.pth")["iteration"] == 40
    assert ckpt_io.load_checkpoint(tmp_path / "checkpoint_0.pth")["iteration"] == 20
    with pytest.raises(Click4CaptionError, match="not found"):
        ckpt_io.load_checkpoint(tmp_path / "nope.pth")


# ----------------------------------------------------------------------------- one process, in this process
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and 2 shared cores are easily oversubscribed)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    tiny_train_config(root)  # data + tiny LLM, reused by the configs below
    return root


def test_train_save_and_resume_exactly(setup_dir: Path) -> None:
    """12 iterations with accumulation and clipping; resuming the iteration-8
    checkpoint restores step and optimizer state and ends where the full run ended, with
    the same count of skipped samples (logged every 3 iterations, saved every 4: the
    samples skipped after the last log line are in the checkpoint too)."""
    run = {"save_every_iters": 4, "keep_last_ckpts": 5, "accum_grad_iters": 2, "grad_clip": 1.0, "log_freq": 3}
    yaml_path = tiny_train_config(setup_dir, iters=6, epochs=2, run=run,
                                  model={"freeze_llm": False, "freeze_vit": False})
    cfg = load_config(yaml_path)
    full = run_training(cfg, "full")
    out = full.output_dir
    assert full.end_iteration == 12 and len(full.losses) == 12
    assert set(full.sources) == {"vg", "textocr", "laion", "region_instruct"}  # every format went through the model
    assert {"unreadable_image", "unreadable_shard"} <= set(full.skipped)  # broken samples skipped and counted
    names = sorted(p.name for p in out.iterdir() if p.suffix == ".pth")
    assert "checkpoint_0.pth" in names and "checkpoint_1.pth" in names and "checkpoint_last.pth" in names
    ckpt8 = ckpt_io.load_checkpoint(out / "checkpoint_iter00000008.pth")  # weights_only=True
    final = ckpt_io.load_checkpoint(out / "checkpoint_last.pth")
    assert ckpt8["iteration"] == 8 and ckpt8["epoch"] == 1 and final["iteration"] == 12
    assert isinstance(ckpt8["config"], dict) and ckpt8["config"]["run"]["accum_grad_iters"] == 2
    # everything is trainable here (as for the shapes model): all of it is saved
    keys = set(final["model"])
    assert any(k.startswith("visual_encoder.") for k in keys) and any(k.startswith("llama_model.") for k in keys)
    assert "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in keys  # a buffer
    # 12 iterations accumulated 2 by 2: 6 optimizer steps
    assert all(float(s["step"]) == 6 for s in final["optimizer"]["state"].values())
    assert (out / "train.log").read_text().count("iter 12/12") == 1
    assert any((out / "tensorboard").iterdir())

    cfg.run.resume_ckpt_path = str(out / "checkpoint_iter00000008.pth")
    trainer = Trainer(cfg, "resumed")
    stale = trainer.out_dir / ".checkpoint_iter00000012.pth.x1y2.tmp"  # left by a kill during a write
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half a checkpoint")
    try:
        trainer.setup()
        assert not stale.exists()
        assert trainer.start_iteration == 8
        assert tensors_equal(trainer.optimizer.state_dict(), ckpt8["optimizer"])
        state = ckpt_io.trainable_state_dict(trainer.model)
        assert tensors_equal(state, ckpt8["model"])
        resumed = trainer.train()
    finally:
        trainer.cleanup()
    assert [i for i, _ in resumed.losses] == [8, 9, 10, 11]
    assert resumed.skipped == full.skipped and sum(full.skipped.values()) > 0
    assert [l for _, l in resumed.losses] == pytest.approx([l for _, l in full.losses[8:]], abs=1e-5)
    again = ckpt_io.load_checkpoint(resumed.output_dir / "checkpoint_last.pth")
    assert relative_distance(again["model"], final["model"]) < 1e-4

    # a training checkpoint is a model.ckpt the model builder loads for inference
    from click4caption.models.builder import build_model

    model_cfg = from_dict({"model": {**final["config"]["model"], "ckpt": str(out / "checkpoint_last.pth")}}).model
    model = build_model(model_cfg, for_training=False)
    assert tensors_close(ckpt_io.trainable_state_dict(model), {k: v for k, v in final["model"].items()})


def test_frozen_parts_do_not_change_and_are_not_optimised(setup_dir: Path) -> None:
    yaml_path = tiny_train_config(setup_dir, iters=3, run={"save_every_iters": 3, "log_freq": 3},
                                  model={"box_attention_loss_weight": 1.0})
    cfg = load_config(yaml_path)
    trainer = Trainer(cfg, "frozen")
    try:
        trainer.setup()
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert not any(n.startswith(("visual_encoder.", "llama_model.")) for n in trainable)
        assert "ln_vision.weight" in trainable  # trainable with multi-block features, as upstream
        assert len(trainer.params) == len(trainable)
        trainer.train()
    finally:
        trainer.cleanup()
    after = dict(trainer.model.named_parameters())
    changed = {n for n, v in before.items() if not torch.equal(v, after[n].detach())}
    assert changed and changed <= trainable
    assert "| box_attention_loss " in (trainer.out_dir / "train.log").read_text()  # the model's other losses are logged
    saved = set(ckpt_io.load_checkpoint(trainer.out_dir / "checkpoint_last.pth")["model"])
    params = set(before)
    assert saved & params == trainable  # only trainable parameters ...
    assert "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in saved  # ... plus buffers


def test_fit_total_keeps_what_fits_and_never_goes_back() -> None:
    # 100 done, 2 it/s, 50 s left, 1 % kept in hand: int(2 * 50 * 0.99) = 99 more
    assert fit_total(100, 1000, 2.0, 50.0, safety=0.01) == 199
    assert fit_total(100, 150, 2.0, 50.0, safety=0.01) == 150  # the configured length fits
    assert fit_total(100, 1000, 2.0, -5.0) == 100  # out of time: stop where it is
    assert fit_total(100, 1000, 0.0, 50.0) == 1000  # no rate yet: nothing to fit
    run = load_config(SHIPPED, ["run.time_budget_s=0"]).run
    with pytest.raises(ConfigError, match="run.time_budget_s must be > 0"):
        check_schedule(run)


def test_time_budget_waits_for_a_steady_rate_before_it_cuts() -> None:
    """The first 22 iterations take 2 s, the rest 1 s; 900 configured in a budget of 1,100 s
    fit at the steady rate. Measured from iteration 20 to 25 (0.71 it/s) the run would be cut
    to 769; the budget waits until its rate spans RATE_MIN_SHARE of the budget (22 s, at
    iteration 40: 0.91 it/s) and keeps all 900; a machine that stays slow is still cut."""
    def clock_at(done: int, early: int) -> float:
        return 2.0 * min(done, early) + 1.0 * max(done - early, 0)

    for early, expected in ((22, [900] * 5), (1000, [900, 900, 900, 544, 544])):
        t = [0.0]
        budget = TimeBudget(1100.0, 0, 900, clock=lambda: t[0])
        totals = []
        for done in (20, 25, 30, 35, 40):
            t[0] = clock_at(done, early)
            totals.append(budget.refit(done, 900))
        assert totals == expected, early
    assert RATE_MIN_SHARE * 1100.0 == pytest.approx(22.0)
    assert fit_total(25, 900, 5 / 7, 1100.0 - 47.0) == 769  # what the 5-iteration rate would have cut to


def test_the_recipe_gives_training_what_its_budget_leaves() -> None:
    from click4caption_apps import shapes_recipe as recipe

    args = recipe.parse_args([])
    assert args.budget_min == 60 and args.eval_scenes == 200 and args.heldout_scenes == 200
    with pytest.raises(SystemExit):
        recipe.parse_args(["--average-last", "0"])
    # 3600 s - 45 s of data - (30 s + 0.4 s x 400 scenes) for export and evaluation
    assert recipe.training_budget_s(args, 45.0) == pytest.approx(3600 - 45 - 190)
    assert recipe.training_budget_s(args, 3500.0) == 60.0  # at least a minute
    report = {"iterations": 14210, "iterations_configured": 15000, "budget_min": 60.0}
    assert recipe.iterations_text(report) == "14,210 of 15,000 iterations (the 60-minute budget)"
    assert recipe.iterations_text({**report, "iterations": 15000}) == "15,000 iterations"
    cfg = load_config(REPO_ROOT / recipe.TRAIN_CONFIG, ["run.time_budget_s=100"])
    assert "run.time_budget_s" in cfg.given and cfg.run.time_budget_s == 100  # the user's own budget is kept
    assert load_config(REPO_ROOT / recipe.TRAIN_CONFIG).run.time_budget_s is None


def test_the_recipe_exports_what_it_trained(setup_dir: Path, tmp_path: Path) -> None:
    """export() writes the LLM folder and the rest, and reports the checkpoint's iterations
    (REPORT.md's "13,909 of 15,000 iterations" when a budget cut the run)."""
    from click4caption_apps import shapes_recipe as recipe

    cfg = load_config(tiny_train_config(setup_dir, iters=3, run={"save_every_iters": 3, "log_freq": 3}))
    result = run_training(cfg, "export")
    sizes = recipe.export(cfg, [result.last_checkpoint], tmp_path)
    assert sizes["iterations"] == 3 and sizes["averaged_iterations"] == [3]
    assert (tmp_path / recipe.CKPT_NAME).stat().st_size + sum(
        f.stat().st_size for f in (tmp_path / "llm").iterdir()) == sizes["bytes"]


def test_the_recipe_exports_the_mean_of_the_newest_checkpoints(setup_dir: Path, tmp_path: Path) -> None:
    """--average-last 2 of a run saved at 2, 4 and 6 iterations: the shipped weights (both
    the Q-Former side and the LLM folder) are the mean of iterations 4 and 6."""
    from safetensors.torch import load_file

    from click4caption.training.checkpointing import load_checkpoint
    from click4caption_apps import shapes_recipe as recipe

    cfg = load_config(tiny_train_config(setup_dir, iters=6, model={"freeze_llm": False},
                                        run={"save_every_iters": 2, "log_freq": 2, "keep_last_ckpts": 3}))
    result = run_training(cfg, "average")
    out_dir = result.last_checkpoint.parent
    picked = recipe.checkpoints_to_average(out_dir, result.last_checkpoint, 2)
    assert [p.name for p in picked] == ["checkpoint_iter00000004.pth", "checkpoint_iter00000006.pth"]
    sizes = recipe.export(cfg, picked, tmp_path)
    assert sizes["iterations"] == 6 and sizes["averaged_iterations"] == [4, 6]
    a, b = (load_checkpoint(p)["model"] for p in picked)
    rest = torch.load(tmp_path / recipe.CKPT_NAME, weights_only=True)["model"]
    assert not torch.equal(a["query_tokens"], b["query_tokens"])  # the two differ, so the mean is a test
    torch.testing.assert_close(rest["query_tokens"], (a["query_tokens"] + b["query_tokens"]) / 2)
    llm = load_file(tmp_path / "llm" / "model.safetensors")
    key = next(k for k in a if k.startswith("llama_model.") and k.endswith("down_proj.weight"))
    torch.testing.assert_close(llm[key.removeprefix("llama_model.")], (a[key] + b[key]) / 2)
    assert recipe.checkpoints_to_average(out_dir, result.last_checkpoint, 1) == [result.last_checkpoint]
    with_earlier = recipe.checkpoints_to_average(out_dir, picked[0], 5)  # none newer than the one named
    assert [p.name for p in with_earlier] == ["checkpoint_iter00000002.pth", "checkpoint_iter00000004.pth"]


def test_the_shipped_report_is_what_the_recipe_writes(tmp_path: Path) -> None:
    """models/shapes/REPORT.md rewritten from the shipped REPORT.json comes out unchanged
    (header, averaged iterations, tables; the runs below the marker kept), and a report of
    one checkpoint names no mean."""
    import json
    import shutil

    from click4caption_apps import shapes_recipe as recipe

    shipped = REPO_ROOT / recipe.MODEL_DIR / "REPORT.md"
    report = json.loads((shipped.parent / "REPORT.json").read_text())
    copy = tmp_path / "REPORT.md"
    shutil.copy(shipped, copy)
    recipe.write_report_md(copy, report, torch.device(report["device"]))
    assert copy.read_text() == shipped.read_text()
    assert len(report["averaged_iterations"]) > 1 and "the weights are the mean of the checkpoints" in copy.read_text()
    recipe.write_report_md(copy, {**report, "averaged_iterations": [report["iterations"]]}, torch.device("cpu"))
    assert f"{report['params']:,} parameters, {report['bytes'] / 1e6:.1f} MB.\n" in copy.read_text()
    assert "mean of the checkpoints" not in copy.read_text().split(recipe.REPORT_RUNS_MARKER)[0]


def test_averaging_checkpoints_names_what_does_not_match() -> None:
    from click4caption.errors import CheckpointError
    from click4caption.training.checkpointing import average_model_states

    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.float16), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 5.0], dtype=torch.float16), "n": torch.tensor(3)}
    mean = average_model_states([a, b], ["a", "b"])
    assert mean["w"].dtype == torch.float16 and mean["w"].tolist() == [2.0, 3.5] and mean["n"].item() == 3
    with pytest.raises(CheckpointError, match="keys differ: extra.bias"):
        average_model_states([a, {**b, "extra.bias": torch.zeros(1)}], ["a", "b"])
    with pytest.raises(CheckpointError, match="shapes differ: w"):
        average_model_states([a, {**b, "w": torch.zeros(3)}], ["a", "b"])
    with pytest.raises(CheckpointError, match="cannot average n"):
        average_model_states([a, {**b, "n": torch.tensor(4)}], ["a", "b"])


def test_time_budget_shortens_the_run_and_its_cosine(setup_dir: Path) -> None:
    """Every iteration "takes" 2 s on the trainer's clock and the budget is 60 s: the rate
    is measured from the first log line after 20 iterations (iteration 20, 40 s) to the
    next (25, 50 s): 0.5 it/s, 10 s left, int(0.5 * 10 * 0.99) = 4 more, so the run of 60
    configured iterations ends at 29, its cosine fitted to 29; resuming its iteration-25
    checkpoint keeps the fitted length and schedule."""
    run = {"time_budget_s": 60, "log_freq": 5, "save_every_iters": 5, "keep_last_ckpts": 10}
    cfg = load_config(tiny_train_config(setup_dir, iters=60, run=run))

    def budgeted(trainer: Trainer) -> list[float]:
        steps, lrs = [0], []
        forward_backward = trainer._forward_backward

        def counted(*args, **kwargs):
            steps[0] += 1
            lrs.append(trainer.optimizer.param_groups[0]["lr"])
            return forward_backward(*args, **kwargs)

        trainer._forward_backward = counted
        trainer.clock = lambda: 2.0 * steps[0]
        try:
            trainer.train()
        finally:
            trainer.cleanup()
        return lrs

    trainer = Trainer(cfg, "budget")
    lrs = budgeted(trainer)
    out = trainer.out_dir
    final = ckpt_io.load_checkpoint(out / "checkpoint_last.pth")
    assert len(lrs) == 29 and final["iteration"] == 29 and final["total_iterations"] == 29
    assert lrs[:25] == pytest.approx([lr_at(i, cfg.run) for i in range(25)])  # 60 iterations until the fit
    assert lrs[25:] == pytest.approx([lr_at(i, cfg.run, 29) for i in range(25, 29)])
    assert lrs[-1] < lr_at(28, cfg.run) and lrs[-1] == pytest.approx(1e-3, rel=0.02)  # ends near min_lr
    assert "time budget: 29 iterations fit (of 60 configured" in (out / "train.log").read_text()

    cfg.run.resume_ckpt_path = str(out / "checkpoint_iter00000025.pth")
    resumed = Trainer(cfg, "budget_resumed")
    resumed.setup()
    assert resumed.start_iteration == 25 and resumed.total == 29
    assert budgeted(resumed) == pytest.approx(lrs[25:])


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_algorithms_last_as_long_as_the_run(setup_dir: Path, deterministic: bool) -> None:
    """``run.deterministic`` turns torch's deterministic algorithms on for the training steps
    (and says so in the log) and cleanup restores the process's own setting."""
    cfg = load_config(tiny_train_config(setup_dir, iters=2, run={"deterministic": deterministic}))
    trainer = Trainer(cfg, f"deterministic_{deterministic}")
    seen = []
    forward_backward = trainer._forward_backward

    def watched(*args, **kwargs):
        seen.append((torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled()))
        return forward_backward(*args, **kwargs)

    trainer._forward_backward = watched
    assert not torch.are_deterministic_algorithms_enabled()
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    assert seen == [(deterministic, deterministic)] * 2
    assert not torch.are_deterministic_algorithms_enabled()
    logged = "deterministic algorithms on" in (trainer.out_dir / "train.log").read_text()
    assert logged == deterministic


def test_dry_run_builds_everything_and_runs_no_step(setup_dir: Path) -> None:
    sys.path.insert(0, str(REPO_ROOT))
    import train as train_app

    assert train_app.main(["--cfg-path", str(tiny_train_config(setup_dir)), "--exp_name", "dry", "--dry-run"]) == 0
    out = setup_dir / "output" / "dry"
    log = (out / "train.log").read_text()
    assert "dry run: 30 iterations" in log and "dry run: region_instruct batch" in log
    assert not list(out.glob("*.pth")) and "iter 1/" not in log


def test_shipped_config_builds_the_recipe_on_real_layouts(setup_dir: Path) -> None:
    """train_configs/click4caption_train.yaml over data in the real layouts (the model
    swapped for the tiny one at 224 px): datasets, ratios and schedule of the recipe."""
    data = setup_dir / "data"
    options = [f"datasets.vg.build_info.storage={data / 'VisualGenome'}",
               f"datasets.textocr.build_info.storage={data / 'TextOCR'}",
               f"datasets.laion.build_info.storage={data / 'LAION'}/{{00000..00001}}.tar",
               f"run.output_dir={setup_dir / 'output'}", "run.device=cpu"]
    cfg = load_config(SHIPPED, options)
    assert {k: v.sample_ratio for k, v in cfg.datasets.items()} == {"vg": 5, "textocr": 1, "laion": 3}
    assert cfg.datasets["laion"].special_batch_size == 12 and cfg.datasets["vg"].num_regions == 12
    tiny = load_config(tiny_train_config(setup_dir, model={"image_size": 224}))
    cfg.model = tiny.model
    trainer = Trainer(cfg, "shipped", dry_run=True)
    try:
        trainer.setup()
        sizes = {s.name: s.batch_size for s in trainer.sources}
        assert sizes == {"vg": 1, "textocr": 1, "laion": 12}
        assert trainer.total == 300_000
        trainer.train()
    finally:
        trainer.cleanup()


def test_cli_errors_are_one_line(setup_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sys.path.insert(0, str(REPO_ROOT))
    import train as train_app
    from click4caption_apps.cli import run_main

    # a dataset whose every image is broken, found out in a loader worker during training
    broken = tmp_path / "vg"
    (broken / "VG_100K").mkdir(parents=True)
    (broken / "VG_100K" / "1.jpg").write_bytes(b"junk")
    (broken / "image_data.json").write_text('[{"image_id": 1, "url": "http://x/VG_100K/1.jpg"}]')
    (broken / "region_descriptions.json").write_text(
        '[{"id": 1, "regions": [{"phrase": "a", "x": 0, "y": 0, "width": 5, "height": 5}]}]')
    tiny = str(tiny_train_config(setup_dir))
    only_broken = [f"datasets.vg.build_info.storage={broken}", "run.num_workers=1",
                   *(f"datasets.{d}.sample_ratio=0" for d in ("textocr", "laion", "region_instruct"))]
    for argv, expected in (
        (["--cfg-path", tiny, "--exp_name", "broken", "--options", *only_broken], "in a row were unusable"),
        (["--cfg-path", str(tmp_path / "missing.yaml"), "--exp_name", "x"], "config file not found"),
        (["--cfg-path", str(SHIPPED), "--exp_name", "x", "--options", "run.nope=1"], "nope"),
        (["--cfg-path", str(SHIPPED), "--exp_name", "x", "--options",
          f"datasets.vg.build_info.storage={tmp_path}/none", "run.device=cpu", f"run.output_dir={tmp_path}"],
         "storage not found"),
    ):
        with pytest.raises(SystemExit) as exc:
            run_main(lambda: train_app.main(argv))
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err and expected in err[-1] and "Traceback" not in "\n".join(err)


# ----------------------------------------------------------------------------- torchrun, 2 processes
def torchrun(cfg: Path, exp: str, *options: str) -> subprocess.Popen:
    """``torchrun --standalone --nproc-per-node 2 train.py ...``; output to ``<cfg dir>/<exp>.out``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "train.py", "--cfg-path", str(cfg), "--exp_name", exp]
    if options:
        cmd += ["--options", *options]
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    out = open(cfg.parent / f"{exp}.out", "a")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    proc.output_path = Path(out.name)  # type: ignore[attr-defined]
    out.close()
    return proc


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        raise
    out = proc.output_path.read_text()  # type: ignore[attr-defined]
    assert proc.returncode == 0, out[-4000:]
    return out


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants (torchrun's workers run in their own sessions)."""
    for child in children(pid):
        kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def logged_losses(log: str) -> dict[int, float]:
    import re

    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"iter (\d+)/\d+ epoch \d+ \| loss ([\d.]+)", log)}


@pytest.mark.slow
def test_torchrun_two_processes_kill_and_resume(setup_dir: Path) -> None:
    cfg = tiny_train_config(setup_dir, iters=30, run={"save_every_iters": 5, "keep_last_ckpts": 10},
                            model={"freeze_llm": False})
    out = setup_dir / "output"

    # the reference run, uninterrupted; the loss goes down
    finish(torchrun(cfg, "ddp_full"))
    losses = logged_losses((out / "ddp_full" / "train.log").read_text())
    assert sorted(losses) == [5, 10, 15, 20, 25, 30]
    assert losses[25] + losses[30] < 0.85 * (losses[5] + losses[10]), losses
    assert "backend gloo" in (out / "ddp_full" / "train.log").read_text()

    # the same run killed (SIGKILL, every process) after its first checkpoint
    proc = torchrun(cfg, "ddp_killed")
    first = out / "ddp_killed" / ckpt_io.iter_name(5)
    deadline = time.time() + 180
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    kill_tree(proc.pid)
    proc.wait(timeout=30)
    last = ckpt_io.load_checkpoint(out / "ddp_killed" / "checkpoint_last.pth")  # loadable, weights_only
    saved_at = last["iteration"]
    assert 5 <= saved_at < 30, "the run finished before it could be killed"
    reference = ckpt_io.load_checkpoint(out / "ddp_full" / ckpt_io.iter_name(saved_at))
    assert tensors_equal(last["optimizer"], reference["optimizer"])

    # resumed: continues at the saved step with that optimizer state and ends where the reference ended
    log = finish(torchrun(cfg, "ddp_killed", "run.resume_ckpt_path=auto"))
    text = (out / "ddp_killed" / "train.log").read_text()
    assert f"at iteration {saved_at}" in text, log[-3000:]
    resumed_losses = logged_losses(text.split(f"at iteration {saved_at}")[-1])
    assert min(resumed_losses) > saved_at
    # (bit-exact on one machine; BLAS may differ in the last bits across runs elsewhere)
    for it, loss in resumed_losses.items():
        assert loss == pytest.approx(losses[it], abs=2e-3)  # logged with 4 decimals
    end = ckpt_io.load_checkpoint(out / "ddp_killed" / "checkpoint_last.pth")
    ref_end = ckpt_io.load_checkpoint(out / "ddp_full" / "checkpoint_last.pth")
    assert end["iteration"] == 30
    assert relative_distance(end["model"], ref_end["model"]) < 1e-3
    moments = {f"{k}.{n}": v for k, st in end["optimizer"]["state"].items() for n, v in st.items()}
    ref_moments = {f"{k}.{n}": v for k, st in ref_end["optimizer"]["state"].items() for n, v in st.items()}
    assert relative_distance(moments, ref_moments) < 1e-2


def test_cpu_training_and_inference_flush_denormals(setup_dir: Path) -> None:
    """Trainer.setup and Captioner.from_config on the CPU turn on flush-to-zero: a denormal
    float (1.5e-39, made from its bits, so flushing cannot touch it) times 1 is then +0.0
    (it survives with the setting off)."""
    from click4caption.captioner import Captioner
    from click4caption.paths import DEFAULT_EVAL_CONFIG

    denormal = torch.tensor([1 << 20], dtype=torch.int32).view(torch.float32)

    def times_one_bits(x: torch.Tensor) -> int:
        return int((x * 1.0).view(torch.int32).item())

    try:
        for build in ("trainer", "captioner"):
            torch.set_flush_denormal(False)
            assert times_one_bits(denormal) == 1 << 20
            if build == "trainer":
                trainer = Trainer(load_config(tiny_train_config(setup_dir)), "flush", dry_run=True)
                try:
                    trainer.setup()
                finally:
                    trainer.cleanup()
            else:  # the shipped model, as the CLI and the demo build it
                Captioner.from_config(load_config(REPO_ROOT / DEFAULT_EVAL_CONFIG), device="cpu")
            assert times_one_bits(denormal) == 0, build
    finally:
        torch.set_flush_denormal(True)


@pytest.mark.parametrize("pool_first", [False, True])
def test_flush_reaches_the_threads_started_after_it(pool_first: bool) -> None:
    """Threads inherit flush-to-zero when created: flushing before torch's thread pool starts
    covers every thread; flushing after it covers only the caller, and the check says so."""
    code = ("import torch; torch.set_num_threads(2)\n"
            + ("(torch.ones(1 << 20) * 2.0).sum()\n" if pool_first else "")
            + "from click4caption.cpu import flush_denormals, flushed_in_every_thread\n"
            "assert flush_denormals('cpu')\n"
            "print(flushed_in_every_thread())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == str(not pool_first)
