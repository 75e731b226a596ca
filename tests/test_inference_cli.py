"""``inference.py`` as a user runs it (a subprocess), on the tiny model written in the
upstream formats: bad inputs give one ``error:`` line and a non-zero exit, odd but valid
inputs work, and the batch / JSON / visualisation / seed options do what they say.

The runs are independent, so they are started together (a few at a time) once per module.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
INFERENCE = REPO / "inference.py"
pytestmark = pytest.mark.slow

W, H = 64, 48  # the test image size


@dataclass
class Run:
    args: list[str]
    cwd: Path
    returncode: int = -1
    stdout: str = ""
    stderr: str = ""

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def make_inputs(d: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    p = {name: d / name for name in ("img.png", "rgba.png", "gray.png", "gray16.png", "huge.png", "notes.txt",
                                     "cut.png", "too_large.png")}
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(p["img.png"])
    rgba = rng.integers(0, 255, (H, W, 4), dtype=np.uint8)
    rgba[..., 3] = 128
    Image.fromarray(rgba).save(p["rgba.png"])  # RGBA, half transparent
    Image.fromarray(rng.integers(0, 255, (H, W), dtype=np.uint8)).save(p["gray.png"])  # L
    Image.fromarray(rng.integers(0, 65535, (H, W), dtype=np.uint16)).save(p["gray16.png"])  # 16-bit grayscale
    huge = Image.new("L", (12000, 9000), 90)  # 108 Mpx: over Pillow's default bomb limit, under ours
    ImageDraw.Draw(huge).rectangle([1000, 1000, 6000, 5000], fill=200)
    huge.save(p["huge.png"], compress_level=1)
    p["notes.txt"].write_text("these are notes, not an image\n")
    data = p["img.png"].read_bytes()
    p["cut.png"].write_bytes(data[: len(data) // 3])
    from tests.test_model_parts import png_header_only

    png_header_only(p["too_large.png"], 20000, 20000)  # 400 Mpx, refused before decoding
    return p


def run_all(runs: dict[str, Run]) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # inference.py must find the package by itself

    def one(run: Run) -> None:
        proc = subprocess.run([sys.executable, str(INFERENCE), *run.args], cwd=run.cwd, env=env, capture_output=True,
                              text=True, timeout=300)
        run.returncode, run.stdout, run.stderr = proc.returncode, proc.stdout, proc.stderr

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        list(pool.map(one, runs.values()))


ERRORS: dict[str, tuple[list[str], list[str]]] = {
    # name: (arguments after the config, strings the error line must contain)
    "missing_image": (["--image_path", "{d}/nope.png"], ["image not found", "nope.png"]),
    "corrupt_image": (["--image_path", "{d}/cut.png"], ["cannot read image", "cut.png"]),
    "not_an_image": (["--image_path", "{d}/notes.txt"], ["not an image", "notes.txt"]),
    "too_large_image": (["--image_path", "{d}/too_large.png"], ["too large", "20000x20000"]),
    "empty_box": (["--image_path", "{d}/img.png", "--tl_x", "10", "--tl_y", "5", "--br_x", "10", "--br_y", "30"],
                  ["empty box"]),
    "box_outside_image": (["--image_path", "{d}/img.png", "--tl_x", "100", "--tl_y", "60", "--br_x", "200",
                           "--br_y", "90"], ["empty box", "64x48"]),
    "img_count": (["--image_path", "{d}/img.png", "--input_text", "image 1[IMG] image 2[IMG] Compare them."],
                  ["2 [IMG]", "1 box"]),
    "no_img_placeholder": (["--image_path", "{d}/img.png", "--input_text", "What is it?"], ["0 [IMG]"]),
    "empty_question": (["--image_path", "{d}/img.png", "--input_text", "   "], ["question is empty"]),
    "unknown_config_key": (["--image_path", "{d}/img.png", "--options", "model.max_txt_lenn=3"],
                           ["model.max_txt_lenn"]),
    "wrong_config_type": (["--image_path", "{d}/img.png", "--options", "model.freeze_vit=perhaps"],
                          ["model.freeze_vit"]),
    "missing_checkpoint": (["--image_path", "{d}/img.png", "--options",
                            "model.ckpt={d}/cached_model/click4caption_13b.pth"],
                           ["Click4Caption checkpoint (model.ckpt) not found", "{d}/cached_model/click4caption_13b.pth",
                            "cached_model/README.md"]),
    "missing_vit": (["--image_path", "{d}/img.png", "--options", "model.vit_ckpt={d}/cached_model/eva_vit_g.pth"],
                    ["ViT checkpoint (model.vit_ckpt) not found", "{d}/cached_model/eva_vit_g.pth",
                     "cached_model/README.md"]),
    "missing_llm": (["--image_path", "{d}/img.png", "--options", "model.llama_model={d}/cached_model/vicuna-13b-v0"],
                    ["LLM folder", "{d}/cached_model/vicuna-13b-v0", "cached_model/README.md"]),
    "bad_number": (["--image_path", "{d}/img.png", "--tl_x", "left"], ["--tl_x", "left"]),
    "missing_batch_file": (["--batch_file", "{d}/nope.jsonl", "--output_file", "{d}/out.jsonl"],
                           ["batch file not found"]),
    "output_folder_missing": (["--batch_file", "{d}/batch.jsonl", "--output_file", "{d}/no/such/out.jsonl"],
                              ["--output_file", "folder does not exist"]),
    "save_vis_folder_missing": (["--image_path", "{d}/img.png", "--save_vis", "{d}/no/such/vis.png"],
                                ["--save_vis", "folder does not exist"]),
}

GOOD: dict[str, list[str]] = {
    # corners given bottom-right first, reaching outside an RGBA image; JSON on stdout; the box drawn
    "describe_json": ["--image_path", "{d}/rgba.png", "--tl_x", "70", "--tl_y", "40", "--br_x", "-10", "--br_y", "3",
                      "--json", "--save_vis", "{d}/vis.png", "--max_new_tokens", "6"],
    # the first batch line again, in its own process: greedy decoding repeats
    "greedy": ["--image_path", "{d}/img.png", "--tl_x", "5", "--tl_y", "5", "--br_x", "40", "--br_y", "30",
               "--input_text", "image[IMG] What is it?", "--max_new_tokens", "5"],
    # sampling repeats with the same --seed and changes with another
    "seed5": ["--image_path", "{d}/img.png", "--do_sample", "--seed", "5", "--max_new_tokens", "8"],
    "seed6": ["--image_path", "{d}/img.png", "--do_sample", "--seed", "6", "--max_new_tokens", "8"],
}


def batch_lines(d: Path) -> list[str]:
    q = "image[IMG] What is it?"
    items = [
        {"image": f"{d}/img.png", "boxes": [[5, 5, 40, 30]], "question": q, "id": "a"},
        {"image": f"{d}/gray.png", "boxes": [[0, 0, 20, 20], [10, 10, 60, 40]]},
        {"image": f"{d}/gray16.png", "boxes": [[-1, -1, -1, -1]]},
        {"image": f"{d}/rgba.png", "boxes": [[60, 40, 2, 2]]},
        {"image": f"{d}/nope.png", "boxes": [[0, 0, 5, 5]]},
        "{this line is not json",
        {"image": f"{d}/img.png", "boxes": []},
        {"image": f"{d}/img.png", "boxes": [[0, 0, 5, 5]], "question": "image 1[IMG] image 2[IMG] Compare."},
        {"image": f"{d}/huge.png", "boxes": [[1000, 1000, 6000, 5000]]},
        {"image": f"{d}/img.png", "boxes": [[5, 5, 40, 30]], "question": q, "id": "a again"},
        {"image": f"{d}/img.png", "boxes": [[5, 5, 40, 30], [-1, -1, -1, -1]],
         "question": "image 1[IMG] image 2[IMG] Write a story that combines image 1 and image 2."},
    ]
    return [x if isinstance(x, str) else json.dumps(x) for x in items]


@pytest.fixture(scope="module")
def cli(tiny_files, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    d = tmp_path_factory.mktemp("cli_inputs")
    make_inputs(d)
    cfg = ["--cfg-path", str(tiny_files["yaml"]), "--device", "cpu"]
    runs: dict[str, Run] = {}
    for name, (args, _) in ERRORS.items():
        runs[name] = Run(cfg + [a.format(d=d) for a in args], tmp_path_factory.mktemp(name))
    for name, args in GOOD.items():
        runs[name] = Run(cfg + [a.format(d=d) for a in args], tmp_path_factory.mktemp(name))
    (d / "batch.jsonl").write_text("\n".join(batch_lines(d)) + "\n\n")
    runs["batch"] = Run(cfg + ["--batch_file", str(d / "batch.jsonl"), "--output_file", "out.jsonl",
                               "--max_new_tokens", "5"], tmp_path_factory.mktemp("batch"))
    runs["missing_config"] = Run(["--cfg-path", str(d / "nope.yaml"), "--image_path", str(d / "img.png")],
                                 tmp_path_factory.mktemp("missing_config"))
    run_all(runs)
    runs["_dir"] = d  # type: ignore[assignment]
    return runs


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.mark.parametrize("name", [*ERRORS, "missing_config"])
def test_bad_input_is_one_error_line(cli: dict[str, Run], name: str) -> None:
    run, d = cli[name], cli["_dir"]
    assert run.returncode != 0, run.stdout
    assert "Traceback" not in run.stderr
    assert len(run.stderr_lines) == 1, run.stderr
    line = run.stderr_lines[0]
    assert line.startswith("error: ")
    needles = ERRORS[name][1] if name in ERRORS else ["config file not found", "nope.yaml"]
    for needle in needles:
        assert needle.format(d=d) in line, line
    assert run.stdout == ""
    assert files_in(run.cwd) == set()  # nothing written


def test_describe_with_json_and_save_vis(cli: dict[str, Run]) -> None:
    run, d = cli["describe_json"], cli["_dir"]
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert not any(line.startswith("error") for line in run.stderr_lines)
    out = json.loads(run.stdout)
    assert out["image"] == f"{d}/rgba.png"
    assert out["box"] == [0, 3, 64, 40]  # corners put in order, then clipped to the 64x48 image
    assert out["question"] == "image[IMG] Tell me what it is and write a description for it."
    assert isinstance(out["answer"], str) and "###" not in out["answer"]
    assert len(out["warnings"]) == 2
    assert "top-left" in out["warnings"][0] and "clipped to (0, 3, 64, 40)" in out["warnings"][1]
    logged = [line for line in run.stderr_lines if line.startswith("WARNING")]
    assert len(logged) == 2 and "top-left" in logged[0] and "clipped" in logged[1]
    vis = Image.open(d / "vis.png").convert("RGB")
    assert vis.size == (W, H)
    assert vis.getpixel((0, 20)) == (255, 0, 0) and vis.getpixel((30, 3)) == (255, 0, 0)  # left and top edges
    assert vis.getpixel((30, 20)) != (255, 0, 0)  # inside is the image
    # nothing is written anywhere else: not in the working directory, not next to inference.py
    assert files_in(run.cwd) == set()
    assert not (REPO / "img_with_bbox.jpg").exists()


def test_greedy_answers_repeat(cli: dict[str, Run]) -> None:
    run, batch = cli["greedy"], cli["batch"]
    assert run.returncode == 0, run.stderr
    assert [line for line in run.stderr_lines if not line.startswith("INFO")] == []  # nothing to warn about
    first = json.loads((batch.cwd / "out.jsonl").read_text().splitlines()[0])
    assert run.stdout == first["answer"] + "\n"  # the same question in another process: the same answer


def test_seed_makes_sampling_repeatable(cli: dict[str, Run], capsys) -> None:
    a, c = cli["seed5"], cli["seed6"]
    assert a.returncode == c.returncode == 0, a.stderr + c.stderr
    assert a.stdout != c.stdout  # another seed samples another answer
    # the same seed again (in this process, to save a start-up): the same answer
    spec = importlib.util.spec_from_file_location("inference_app", INFERENCE)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    capsys.readouterr()
    assert app.main(a.args) == 0
    assert capsys.readouterr().out == a.stdout


def test_batch_mode(cli: dict[str, Run]) -> None:
    run, d = cli["batch"], cli["_dir"]
    # the odd images really are what they claim to be
    modes = {name: Image.open(d / name).mode for name in ("rgba.png", "gray.png", "gray16.png")}
    assert modes["rgba.png"] == "RGBA" and modes["gray.png"] == "L" and modes["gray16.png"].startswith("I")
    assert run.returncode == 1, run.stderr  # some lines failed
    assert "Traceback" not in run.stderr
    assert files_in(run.cwd) == {"out.jsonl"}
    lines = (run.cwd / "out.jsonl").read_text().splitlines()
    inputs = batch_lines(d)
    assert len(lines) == len(inputs)  # blank input lines are skipped
    out = [json.loads(line) for line in lines]
    for i, (src, res) in enumerate(zip(inputs, out)):
        if src.startswith("{this"):
            assert res["input"] == src and "not valid JSON" in res["error"] and res["line"] == i + 1
            continue
        item = json.loads(src)
        assert {k: res[k] for k in item} == item, "each output line is its input plus results, in order"
    good = {0: "answer", 1: "captions", 2: "captions", 3: "captions", 8: "captions", 9: "answer", 10: "answer"}
    for i, field in good.items():
        assert "error" not in out[i], out[i]
        assert isinstance(out[i][field], (str, list))
    assert len(out[1]["captions"]) == 2 and len(out[2]["captions"]) == 1
    assert all(isinstance(c, str) for c in out[1]["captions"])
    assert "top-left" in out[3]["warnings"][0]
    assert "image not found" in out[4]["error"]
    assert "non-empty list" in out[6]["error"]
    assert "[IMG]" in out[7]["error"]
    assert out[0]["answer"] == out[9]["answer"]  # greedy: the same question gets the same answer
    errors = [line for line in run.stderr_lines if "line " in line and line.startswith("WARNING")]
    assert len(errors) == 4  # one warning per failed line, then the rest still ran


def _inference(args: list[str], cwd: Path, nproc: int = 1) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), str(INFERENCE), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_batch_file_under_torchrun_equals_one_process_and_a_rerun_resumes(cli: dict[str, Run], tiny_files,
                                                                         tmp_path: Path) -> None:
    """Two processes (gloo) each answer their share of the lines; rank 0 merges them in input
    order into the one-process output. A rerun after a crash answers only the lines not yet
    written. ``--batch_size 1`` makes every answer independent of which lines share a batch
    (the tiny random model's tokens are nearly tied, so float noise of other batch shapes
    could flip one), so the outputs must be byte-identical."""
    d = cli["_dir"]
    args = ["--cfg-path", str(tiny_files["yaml"]), "--device", "cpu", "--batch_file", str(d / "batch.jsonl"),
            "--output_file", "out.jsonl", "--max_new_tokens", "5", "--batch_size", "1"]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = _inference(args, tmp_path / "one")
    two = _inference(args, tmp_path / "two", nproc=2)
    assert one.returncode == two.returncode == 1, two.stderr[-3000:]  # the bad lines, as in one process
    reference = (tmp_path / "one" / "out.jsonl").read_text()
    assert (tmp_path / "two" / "out.jsonl").read_text() == reference
    assert files_in(tmp_path / "two") == {"out.jsonl"}  # the per-rank partial files are merged away
    # the batched default gives the same lines and fields (its answers may differ in near ties)
    batched = [json.loads(line) for line in (cli["batch"].cwd / "out.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in batched] == [sorted(json.loads(line)) for line in reference.splitlines()]

    # a crash after 6 lines (the 7th cut short), then a rerun: lines already written are kept
    lines = reference.splitlines(keepends=True)
    first = json.loads(lines[0])
    kept = json.dumps({**first, "answer": "KEPT"}) + "\n"  # proves line 1 is not generated again
    (tmp_path / "two" / "out.jsonl").write_text(kept + "".join(lines[1:6]) + lines[6][:20])
    again = _inference(args, tmp_path / "two", nproc=2)
    assert "already answered" in again.stderr and again.returncode == 1, again.stderr[-3000:]
    out = (tmp_path / "two" / "out.jsonl").read_text()
    assert out == kept + "".join(lines[1:])
    # a line whose input changed is answered again, not taken from the old output
    changed = batch_lines(d)
    changed[1] = json.dumps({"image": f"{d}/gray.png", "boxes": [[0, 0, 30, 30]]})
    (tmp_path / "changed.jsonl").write_text("\n".join(changed) + "\n")
    third = _inference([*args[:5], str(tmp_path / "changed.jsonl"), *args[6:]], tmp_path / "two")
    assert "10 of 11 lines already answered" in third.stderr, third.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "two" / "out.jsonl").read_text().splitlines()]
    assert len(records) == 11 and records[0]["answer"] == "KEPT"
    assert records[1]["boxes"] == [[0, 0, 30, 30]] and len(records[1]["captions"]) == 1
