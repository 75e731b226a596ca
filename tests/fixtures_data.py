"""Small datasets in the real formats, with broken samples mixed in, written by tests.

Good samples come from the shapes world (so a model can learn them); each writer then
adds the kinds of damage real data has. ``BROKEN`` lists what was added, so tests can
check that each is skipped and counted.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from click4caption.shapes.writers import write_visual_genome

# ids of the broken things each writer adds
VG_BROKEN_IMAGE_IDS = {"corrupt": "9001", "missing": "9002", "all_regions_bad": "9003"}
TEXTOCR_FEW_WORDS_ID = "img_few"
LAION_BROKEN_KEYS = {"bad_jpg": "bad00001", "empty_caption": "bad00002", "no_json": "bad00003"}


def _jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def write_vg(root: Path, n_images: int = 6, seed: int = 0) -> Path:
    """Visual Genome v1.2 layout; adds a corrupt image, a missing image, an image whose
    regions are all invalid, and invalid regions (empty phrase, box outside, zero size)
    on good images; one good image lives in ``VG_100K_2``."""
    write_visual_genome(root, n_images, seed)
    image_data = json.loads((root / "image_data.json").read_text())
    regions = json.loads((root / "region_descriptions.json").read_text())
    # move image 1 to VG_100K_2 (path comes from the URL)
    (root / "VG_100K_2").mkdir(exist_ok=True)
    (root / "VG_100K" / "1.jpg").rename(root / "VG_100K_2" / "1.jpg")
    image_data[0]["url"] = image_data[0]["url"].replace("VG_100K/", "VG_100K_2/")
    # invalid regions next to valid ones
    regions[0]["regions"] += [
        {"region_id": 8001, "image_id": 1, "phrase": "   ", "x": 1, "y": 1, "width": 10, "height": 10},
        {"region_id": 8002, "image_id": 1, "phrase": "outside", "x": 5, "y": 5, "width": 5000, "height": 10},
        {"region_id": 8003, "image_id": 1, "phrase": "flat", "x": 5, "y": 5, "width": 0, "height": 10},
    ]
    bad = VG_BROKEN_IMAGE_IDS
    (root / "VG_100K" / f"{bad['corrupt']}.jpg").write_bytes(b"this is not a jpeg")
    Image.new("RGB", (64, 48), (9, 9, 9)).save(root / "VG_100K" / f"{bad['all_regions_bad']}.jpg")
    for iid in bad.values():
        image_data.append({"image_id": int(iid), "url": f"https://x/VG_100K/{iid}.jpg", "width": 64, "height": 48})
    good_region = {"phrase": "a thing", "x": 2, "y": 2, "width": 20, "height": 20}
    regions.append({"id": int(bad["corrupt"]), "regions": [dict(good_region, region_id=8101)]})
    regions.append({"id": int(bad["missing"]), "regions": [dict(good_region, region_id=8102)]})
    regions.append({"id": int(bad["all_regions_bad"]),
                    "regions": [dict(good_region, region_id=8103, phrase=""),
                                dict(good_region, region_id=8104, x=60)]})
    _dump(root / "image_data.json", image_data)
    _dump(root / "region_descriptions.json", regions)
    return root


def write_textocr(root: Path, n_images: int = 4, words_per_image: int = 8, seed: int = 0) -> Path:
    """TextOCR 0.1 layout (``file_name`` with a ``train/`` prefix as in the release);
    adds illegible ``.`` words, tiny words, a word with a bad box, an image with too
    few valid words and one corrupt image."""
    rng = np.random.default_rng(seed)
    (root / "train_images").mkdir(parents=True, exist_ok=True)
    imgs: dict[str, Any] = {}
    anns: dict[str, Any] = {}
    img_to_anns: dict[str, list[str]] = {}
    vocab = ["STOP", "EXIT", "open", "cafe", "42", "Main", "st", "sale"]

    def add_image(iid: str, w: int, h: int, data: bytes, words: list[tuple[str, list[float]]]) -> None:
        (root / "train_images" / f"{iid}.jpg").write_bytes(data)
        imgs[iid] = {"id": iid, "width": w, "height": h, "set": "train", "file_name": f"train/{iid}.jpg"}
        img_to_anns[iid] = []
        for k, (word, bbox) in enumerate(words):
            aid = f"{iid}_{k}"
            anns[aid] = {"id": aid, "image_id": iid, "bbox": bbox, "utf8_string": word, "points": [], "area": 0}
            img_to_anns[iid].append(aid)

    for i in range(n_images):
        w, h = int(rng.integers(120, 200)), int(rng.integers(100, 160))
        words = []
        for _ in range(words_per_image):
            bw, bh = float(rng.integers(40, 80)), float(rng.integers(30, 50))
            words.append((str(rng.choice(vocab)), [float(rng.integers(0, w - 10)), float(rng.integers(0, h - 10)), bw, bh]))
        words += [(".", [1, 1, 30, 20]), ("tiny", [1, 1, 2, 2]), ("badbox", [1, 1, -3, 4])]
        add_image(f"img{i:03d}", w, h, _jpeg(w, h, seed + i), words)
    add_image(TEXTOCR_FEW_WORDS_ID, 100, 100, _jpeg(100, 100, 99), [("one", [5, 5, 40, 20])])
    add_image("img_corrupt", 100, 100, b"\x00\x01garbage", [(v, [5, 5, 40, 20]) for v in vocab])
    _dump(root / "TextOCR_0.1_train.json", {"imgs": imgs, "anns": anns, "imgToAnns": img_to_anns})
    return root


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_laion(root: Path, n_images: int = 12, shard_size: int = 6, seed: int = 0) -> Path:
    """LAION webdataset shards (shapes world captions), plus ``99998.tar`` holding a
    corrupt jpg, an empty caption and a sample without json next to good samples,
    and ``99999.tar`` that is not a tar at all."""
    from click4caption.shapes import writers

    writers.write_laion(root, n_images, seed, shard_size=shard_size)
    with tarfile.open(root / "99998.tar", "w") as tar:
        keys = LAION_BROKEN_KEYS
        _add(tar, f"{keys['bad_jpg']}.jpg", b"garbage")
        _add(tar, f"{keys['bad_jpg']}.json", json.dumps({"caption": "two shapes"}).encode())
        _add(tar, f"{keys['empty_caption']}.jpg", _jpeg(40, 30, 1))
        _add(tar, f"{keys['empty_caption']}.json", json.dumps({"caption": " ... "}).encode())
        _add(tar, f"{keys['no_json']}.jpg", _jpeg(40, 30, 2))
        _add(tar, "good0001.jpg", _jpeg(40, 30, 3))
        _add(tar, "good0001.json", json.dumps({"caption": "Two shapes: a RED circle!"}).encode())
    (root / "99999.tar").write_bytes(b"definitely not a tar archive" * 30)
    return root


def write_laion_bad_objects(path: Path, good: int = 2) -> Path:
    """One shard: ``good`` samples whose json lists valid object boxes, one whose
    ``objects`` hold an inverted box (``bad00004``)."""
    with tarfile.open(path, "w") as tar:
        for k in range(good):
            _add(tar, f"obj{k:05d}.jpg", _jpeg(40, 30, 10 + k))
            _add(tar, f"obj{k:05d}.json",
                 json.dumps({"caption": "two shapes", "objects": [[2, 3, 12, 13], [20, 5, 38, 25]]}).encode())
        _add(tar, "bad00004.jpg", _jpeg(40, 30, 4))
        _add(tar, "bad00004.json", json.dumps({"caption": "two shapes", "objects": [[10, 10, 5, 20]]}).encode())
    return path


def write_region_instruct(root: Path, n_images: int = 4, seed: int = 0) -> Path:
    """Region-instruction JSON (shapes world) plus broken records: box count mismatch,
    inverted box, missing image, unknown role, empty reply, a box outside the image and
    malformed object boxes; and a good record that lists no objects."""
    from click4caption.shapes import writers

    writers.write_region_instruct(root, n_images, seed)
    path = root / "instruct.json"
    records = json.loads(path.read_text())
    conv = [{"from": "human", "value": "image[IMG] What color is it?"}, {"from": "gpt", "value": "Red."}]
    records += [
        {"id": "bad_count", "image": "images/1.jpg", "boxes": [], "conversations": conv},
        {"id": "bad_box", "image": "images/1.jpg", "boxes": [[30, 30, 10, 40]], "conversations": conv},
        {"id": "missing_image", "image": "images/nope.jpg", "boxes": [[1, 1, 20, 20]], "conversations": conv},
        {"id": "bad_role", "image": "images/1.jpg", "boxes": [[1, 1, 20, 20]],
         "conversations": [{"from": "robot", "value": "image[IMG] hi"}, {"from": "gpt", "value": "Hi."}]},
        {"id": "empty_reply", "image": "images/1.jpg", "boxes": [[1, 1, 20, 20]],
         "conversations": [conv[0], {"from": "gpt", "value": "  "}]},
        {"id": "outside", "image": "images/1.jpg", "boxes": [[5000, 5000, 6000, 6000]], "conversations": conv},
        {"id": "bad_objects", "image": "images/1.jpg", "boxes": [[1, 1, 20, 20]], "conversations": conv,
         "objects": [[1, 1, 20]]},
        {"id": "no_objects", "image": "images/1.jpg", "boxes": [[1, 1, 20, 20]], "conversations": conv},
    ]
    _dump(path, records)
    return path


def write_all(root: Path, seed: int = 0) -> dict[str, Path]:
    """Every format under ``root``; returns each dataset's ``build_info.storage``."""
    root.mkdir(parents=True, exist_ok=True)
    return {
        "vg": write_vg(root / "VisualGenome", seed=seed),
        "textocr": write_textocr(root / "TextOCR", seed=seed),
        "laion": write_laion(root / "LAION", seed=seed),
        "region_instruct": write_region_instruct(root / "region_instruct", seed=seed),
    }


__all__ = ["write_all", "write_laion", "write_region_instruct", "write_textocr", "write_vg",
           "write_visual_genome"]
