"""``evaluate.py vg`` / ``refcocog``: both benchmark layouts with every kind of bad input,
scores checked against pycocoevalcap called directly (never through project code), a
crash then a rerun that regenerates nothing already done, the held-out id file, one-line
errors, and (slow) the tiny model through the CLI, single-process and under a 2-process
torchrun, with identical output.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from click4caption.errors import ConfigError, InputError
from click4caption.evaluation import metrics
from click4caption.evaluation.annotations import load_benchmark
from click4caption.evaluation.benchmark import BenchmarkRun, run_benchmark
from click4caption.parallel import partial_files, read_jsonl
from tests.fixtures_benchmarks import (
    GLAMM_EXPECTED_SKIPS, GLAMM_REGIONS, GLAMM_SCORED, GRIT_EXPECTED_SKIPS, glamm_fake, grit_fake,
    write_glamm_layout, write_grit_layout, write_images,
)

REPO = Path(__file__).resolve().parents[1]
EVALUATE = REPO / "evaluate.py"
PAIRS = {"BLEU-4": "Bleu_4", "METEOR": "METEOR", "ROUGE-L": "ROUGE_L", "CIDEr": "CIDEr"}


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    write_images(tmp_path / "images")
    return {"images": tmp_path / "images", "glamm": write_glamm_layout(tmp_path / "test_caption.json"),
            "grit": write_grit_layout(tmp_path / "test.json")}


@pytest.fixture
def no_java(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scores as on a machine without Java (and no 10 s METEOR start-up)."""
    monkeypatch.setattr(metrics, "find_java", lambda: None)


def needs_java() -> None:
    if metrics.find_java() is None:
        pytest.skip("java not installed (.ci/run installs default-jre-headless)")


def run(files: dict[str, Path], layout: str, out: Path, captioner, **kw):
    return run_benchmark(BenchmarkRun("vg", files[layout], [files["images"]], out, **kw), lambda: captioner)


class StubSpice:
    """pycocoevalcap's SPICE downloads CoreNLP at run time; the checks leave it out."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self) -> str:
        return "SPICE"


# ----------------------------------------------------------------------------- reading the layouts
def test_both_layouts_become_regions_with_reasons_for_what_is_left_out(files: dict[str, Path]) -> None:
    glamm = load_benchmark(files["glamm"])
    assert glamm.layout == "region-per-image" and glamm.total == len(GLAMM_REGIONS)  # annotations in the file
    # grouped by image file (first appearance), file order within one image
    assert [r.region_id for r in glamm.regions] == [1, 2, 12, 3, 4, 11, 8, 9]
    assert glamm.skipped == {"no_box": [5], "zero_size_box": [6], "box_outside_image": [7], "no_caption": [10],
                             "image_without_annotation": [13]}
    first = glamm.regions[0]
    assert first.box == (2.0, 3.0, 22.0, 18.0) and first.captions == ("a red car parked on the street",)
    assert first.file_name == "img_a.png" and first.image_size == (64, 48)

    grit = load_benchmark(files["grit"])
    assert grit.layout == "densecap"
    assert [r.region_id for r in grit.regions] == [101, 102, 103, 104, 106]
    assert [r.image_id for r in grit.regions] == [2417, 2417, 2417, 2418, 2418]
    assert grit.skipped == GRIT_EXPECTED_SKIPS


@pytest.mark.parametrize("content", ['[{"image_id": 1, "caption": "a"}]', '{"images": []}',
                                     '{"images": [], "annotations": {}}', '{"annotations": []}'])
def test_a_wrong_layout_is_one_error_naming_the_accepted_layouts(tmp_path: Path, content: str) -> None:
    path = tmp_path / "other.json"
    path.write_text(content)
    with pytest.raises(InputError) as err:
        load_benchmark(path)
    message = str(err.value)
    assert "\n" not in message and "other.json" in message
    assert "test_caption.json" in message and "finetune_refcocog_val_captions.json" in message and "GRiT" in message


# ----------------------------------------------------------------------------- scores
def test_scores_equal_cocoevalcap_on_the_glamm_layout(files: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Our scores against GLaMM's own procedure: COCO(annotation file).loadRes(predictions), COCOEvalCap.

    The reference scores the captions the fake captioner gives, written here; it runs while
    the project scores its own predictions file (two METEOR start-ups at once)."""
    needs_java()
    from pycocoevalcap import eval as cocoevalcap
    from pycocotools.coco import COCO

    expected = tmp_path / "expected_predictions.json"
    expected.write_text(json.dumps([{"image_id": rid, "caption": GLAMM_REGIONS[rid][3]} for rid in GLAMM_SCORED]))
    coco = COCO(str(files["glamm"]))
    results = coco.loadRes(str(expected))
    monkeypatch.setattr(cocoevalcap, "Spice", StubSpice)
    reference = cocoevalcap.COCOEvalCap(coco, results)
    reference.params["image_id"] = results.getImgIds()
    with ThreadPoolExecutor(max_workers=1) as pool:
        done = pool.submit(reference.evaluate)
        out = tmp_path / "out"
        scores = run(files, "glamm", out, glamm_fake(), batch_size=2)
        done.result()

    assert sorted(json.loads((out / "predictions.json").read_text()), key=lambda p: p["image_id"]) == \
        json.loads(expected.read_text())
    assert sorted(results.getImgIds()) == GLAMM_SCORED
    for ours, theirs in PAIRS.items():
        assert scores["scores"][ours] == pytest.approx(reference.eval[theirs], rel=1e-12, abs=1e-12), ours
    # not a trivial agreement on zeros
    assert reference.eval["Bleu_4"] > 0.2 and reference.eval["METEOR"] > 0.2 and reference.eval["CIDEr"] > 1.0
    assert scores["tokenizer"] == metrics.PTB_TOKENIZER and "METEOR" not in scores["not_computed"]
    # bad input: counted and listed by reason, the rest scored
    assert scores["skipped_ids"] == GLAMM_EXPECTED_SKIPS
    assert scores["skipped"] == {reason: len(ids) for reason, ids in GLAMM_EXPECTED_SKIPS.items()}
    assert scores["regions_scored"] == len(GLAMM_SCORED) and scores["clipped_boxes"] == 1
    assert scores["layout"] == "region-per-image"
    assert json.loads((out / "scores.json").read_text()) == scores


def test_scores_without_java_equal_pycocoevalcap_on_the_grit_layout(files: dict[str, Path], tmp_path: Path,
                                                                     no_java: None) -> None:
    """GRiT's layout, one COCO image per region built here from the raw file; without Java
    METEOR is skipped with a reason and the other scores are still computed."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    out = tmp_path / "out"
    scores = run(files, "grit", out, grit_fake(), batch_size=3)
    assert scores["layout"] == "densecap" and scores["skipped_ids"] == GRIT_EXPECTED_SKIPS
    assert "java" in scores["not_computed"]["METEOR"] and "METEOR" not in scores["scores"]
    assert scores["tokenizer"] == metrics.PYTHON_TOKENIZER

    raw = json.loads(files["grit"].read_text())
    predictions = json.loads((out / "predictions.json").read_text())
    assert [p["image_id"] for p in predictions] == [101, 102, 103, 104, 106]
    # the fixture's captions are plain lower-case words: any tokenizer gives these tokens
    gts = {a["id"]: [a["caption"]] for a in raw["annotations"] if a["id"] in {p["image_id"] for p in predictions}}
    res = {p["image_id"]: [p["caption"]] for p in predictions}
    expected = {"BLEU-4": Bleu(4).compute_score(gts, res, verbose=0)[0][3], "ROUGE-L": Rouge().compute_score(gts, res)[0],
                "CIDEr": Cider().compute_score(gts, res)[0]}
    for name, value in expected.items():
        assert scores["scores"][name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
    assert expected["BLEU-4"] > 0.1 and expected["CIDEr"] > 0.5


def test_python_tokenizer_matches_ptbtokenizer_on_caption_like_text() -> None:
    needs_java()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = ["A man's red hat, don't.", "the (big) dog -- on U.S. grass...", "a t-shirt that says \"hi\"!",
                "sign: 3.5 miles; turn left?", "people's [red] {car}", "Dr. Smith at 5 p.m.", "a clock reading 10:30",
                "can't won't I'm we're they've", "two-tone 1950s car & bus", "'quoted' word", "e-mail/phone"]
    given = {i: [{"caption": c}] for i, c in enumerate(captions)}
    assert metrics.ptb_like_tokenize(given) == PTBTokenizer().tokenize(given)


# ----------------------------------------------------------------------------- resume
def test_a_crash_then_a_rerun_regenerates_nothing_already_done(files: dict[str, Path], tmp_path: Path,
                                                               no_java: None) -> None:
    reference = run(files, "glamm", tmp_path / "reference", glamm_fake(), batch_size=2)

    out = tmp_path / "out"
    crashing = glamm_fake()
    crashing.fail_on_call = 3  # chunks of 2 regions: [1, 2], [12, 3], then [4, 11] crashes
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(files, "glamm", out, crashing, batch_size=2)
    written = [r for p in partial_files(out / "regions.jsonl") for r in read_jsonl(p)]
    assert [r["id"] for r in written] == [1, 2, 12, 3]

    rerun = glamm_fake()
    scores = run(files, "glamm", out, rerun, batch_size=2)
    assert rerun.calls == 1 and rerun.captioned == [(30, 30, 40, 40)]  # only region 4 was left to generate
    assert not set(rerun.captioned) & set(crashing.captioned)
    assert (out / "predictions.json").read_text() == (tmp_path / "reference" / "predictions.json").read_text()
    assert scores["scores"] == reference["scores"] and scores["skipped_ids"] == reference["skipped_ids"]
    assert partial_files(out / "regions.jsonl") == []

    def no_model():
        raise AssertionError("a complete run must not build the model again")

    again = run_benchmark(BenchmarkRun("vg", files["glamm"], [files["images"]], out, batch_size=2), no_model)
    assert again["scores"] == reference["scores"]


def test_limit_then_full_run_and_a_changed_setting_is_refused(files: dict[str, Path], tmp_path: Path,
                                                              no_java: None) -> None:
    out = tmp_path / "out"
    signature = {"generation": {"max_new_tokens": 40}}
    first = glamm_fake()
    scores = run(files, "glamm", out, first, limit=3, signature=signature)
    assert scores["regions_selected"] == 3 and scores["limit"] == 3
    assert [p["image_id"] for p in json.loads((out / "predictions.json").read_text())] == [1, 2, 12]

    full = glamm_fake()
    scores = run(files, "glamm", out, full, signature=signature)
    assert len(first.captioned) == 3 and len(full.captioned) == 2  # regions 3 and 4; 11, 8, 9 are skipped
    assert scores["regions_scored"] == len(GLAMM_SCORED)

    with pytest.raises(ConfigError, match="generation"):
        run(files, "glamm", out, glamm_fake(), signature={"generation": {"max_new_tokens": 41}})


# ----------------------------------------------------------------------------- held-out ids, CLI errors
def test_write_held_out_ids_reads_back_through_the_vg_loader(tmp_path: Path) -> None:
    import evaluate
    from click4caption.config import DatasetConfig
    from click4caption.data.files import load_held_out_ids

    ann = tmp_path / "test_caption.json"
    images = [{"id": i, "file_name": name, "height": 10, "width": 10}
              for i, name in enumerate(["107899.jpg", "2417.jpg", "107899.jpg", "VG_100K_2/61.jpg"], start=1)]
    ann.write_text(json.dumps({"images": images, "annotations": []}))
    ids = tmp_path / "held_out.txt"
    assert evaluate.main(["vg", "--annotations", str(ann), "--write-held-out", str(ids)]) == 0
    assert [line for line in ids.read_text().splitlines() if not line.startswith("#")] == ["61", "2417", "107899"]
    assert load_held_out_ids(DatasetConfig(held_out_ids_file=str(ids)), "vg") == {"61", "2417", "107899"}

    images.append({"id": 9, "file_name": "COCO_train2014_000000000009.jpg"})
    ann.write_text(json.dumps({"images": images, "annotations": []}))
    with pytest.raises(InputError, match="not a Visual Genome name"):
        evaluate.main(["vg", "--annotations", str(ann), "--write-held-out", str(ids)])


def _cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    base = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    base.pop("PYTHONPATH", None)  # evaluate.py must find the package by itself
    return subprocess.run([sys.executable, str(EVALUATE), *args], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def test_cli_errors_are_one_line(files: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text("[]")
    cases = {
        "annotation file not found": ["vg", "--annotations", "nope.json", "--images", "images", "--out", "o"],
        "unknown layout": ["refcocog", "--annotations", "list.json", "--images", "images", "--out", "o"],
        "image folder not found": ["vg", "--annotations", "test.json", "--images", "nope", "--out", "o"],
        "--out o/p: its parent folder does not exist": ["vg", "--annotations", "test.json", "--images", "images",
                                                        "--out", "o/p"],
        "needs --images DIR and --out DIR": ["vg", "--annotations", "test.json"],
        "--batch-size": ["vg", "--annotations", "test.json", "--images", "images", "--out", "o", "--batch-size", "0"],
    }
    for expected, args in cases.items():
        proc = _cli(args, tmp_path)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, (expected, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], (expected, proc.stderr)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- the tiny model, 1 and 2 processes
def _torchrun(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    base = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EVALUATE), *args]
    return subprocess.run(cmd, cwd=cwd, env={**base, **env}, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_tiny_model_cli_single_and_two_processes_give_the_same_output(files: dict[str, Path], tmp_path: Path,
                                                                      tiny_files: dict[str, Path]) -> None:
    # no java on PATH: METEOR's 10 s start-up is left out (the scores are checked above)
    env = {"PATH": str(tmp_path / "empty-path")}
    args = ["--annotations", str(files["glamm"]), "--images", str(files["images"]), "--cfg-path",
            str(tiny_files["yaml"]), "--device", "cpu", "--batch-size", "3", "--max_new_tokens", "8"]
    single = _cli(["vg", *args, "--out", str(tmp_path / "single")], tmp_path, env, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "METEOR   not computed: java not found" in single.stdout

    two = _torchrun(["vg", *args, "--out", str(tmp_path / "two")], tmp_path, env)
    assert two.returncode == 0, (two.stdout + two.stderr)[-4000:]
    for name in ("regions.jsonl", "predictions.json"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "single" / name).read_text(), name
    one, both = (json.loads((tmp_path / d / "scores.json").read_text()) for d in ("single", "two"))
    assert both["processes"] == 2 and one["processes"] == 1
    assert both["scores"] == one["scores"] and both["skipped_ids"] == one["skipped_ids"] == GLAMM_EXPECTED_SKIPS
    predictions = json.loads((tmp_path / "single" / "predictions.json").read_text())
    assert [p["image_id"] for p in predictions] == [1, 2, 12, 3, 4]
    assert all(isinstance(p["caption"], str) for p in predictions)

    # a rerun under torchrun finds everything done: no generation, same files
    again = _torchrun(["vg", *args, "--out", str(tmp_path / "two")], tmp_path, env)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "0 to caption" in again.stderr
    assert (tmp_path / "two" / "predictions.json").read_text() == (tmp_path / "single" / "predictions.json").read_text()
