"""The training datasets read the real formats as the recipe says, skip and count
broken samples, hold out ids, and mix into a step-indexed, reproducible stream."""
from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from click4caption.config import DatasetConfig, from_dict
from click4caption.data import MixedBatches, build_sources, make_loader, split_meta
from click4caption.data.sources import BatchPosition, MapSource, SkipSample
from click4caption.errors import DataError
from click4caption.data.laion import build_laion, expand_shards, index_shard
from click4caption.data.region_instruct import build_region_instruct
from click4caption.data.textocr import build_textocr
from click4caption.data.vg import build_visual_genome, normalise_phrase
from click4caption.errors import ConfigError
from tests import fixtures_data as fx

S = 32  # model input side used by the tests


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return fx.write_all(tmp_path_factory.mktemp("data"))


def dcfg(storage: Path | str, _laion: bool = False, **kw) -> DatasetConfig:
    raw = {"build_info": {"storage": str(storage)}, **kw}
    proc = "blip2_image_train" if _laion else "blip2_image_eval"
    raw.setdefault("vis_processor", {"train": {"name": proc, "image_size": S}})
    return from_dict({"datasets": {"d": raw}}).datasets["d"]


def draw(source, n: int, seed: int = 0, rank: int = 0, world: int = 1):
    """n batches of one source, as the mixer would draw them."""
    out, skipped = [], Counter()
    for k in range(n):
        rng = np.random.default_rng([seed, rank, k])
        batch, sk = source.draw_batch(rng, BatchPosition(k, k, rank, world, seed))
        out.append(batch)
        skipped.update(sk)
    return out, skipped


# ----------------------------------------------------------------------------- Visual Genome
def test_vg_phrase_normalisation() -> None:
    assert normalise_phrase(" a red car ") == "A red car."
    assert normalise_phrase("Sky is blue.") == "Sky is blue."
    assert normalise_phrase("2 dogs") == "2 dogs."


def test_vg_regions_boxes_and_filters(data: dict[str, Path]) -> None:
    ds = build_visual_genome(dcfg(data["vg"], num_regions=5), "vg", batch_size=2, image_size=S)
    raw = json.loads((data["vg"] / "region_descriptions.json").read_text())
    meta = {str(e["image_id"]): e for e in json.loads((data["vg"] / "image_data.json").read_text())}
    # the broken images: corrupt and missing stay in the index (found out at load time),
    # the one without a valid region is left out at once
    assert fx.VG_BROKEN_IMAGE_IDS["all_regions_bad"] not in ds.image_ids
    assert "1" in ds.image_ids  # lives in VG_100K_2
    batches, skipped = draw(ds, 30)
    assert skipped["unreadable_image"] > 0
    good = {}
    for entry in raw:
        for r in entry["regions"]:
            good[(str(entry["id"]), normalise_phrase(r["phrase"]))] = r
    valid_captions = {cap for (_, cap) in good if cap != "." and cap.strip(".").strip()}
    for batch in batches:
        assert batch["image"].shape == (2, 3, S, S)
        assert batch["bbox"].shape == (2, 5, 2, 2)
        assert len(batch["text_input"]) == 10
        for cap in batch["text_input"]:
            assert cap in valid_captions and cap[0].isupper() and cap.endswith(".")
            assert cap not in ("Outside.", "Flat.")
        b = batch["bbox"]
        assert torch.all(b >= 0) and torch.all(b <= S) and torch.all(b[:, :, 1] > b[:, :, 0])
    # exact scaling of one region: image 1 has a single kind of phrase per object
    img1 = next(e for e in raw if e["id"] == 1)
    w, h = meta["1"]["width"], meta["1"]["height"]
    ds1 = build_visual_genome(dcfg(data["vg"], num_regions=1, held_out_ids=[i for i in ds.image_ids if i != "1"]),
                              "vg", batch_size=1, image_size=S)
    (batch,), _ = draw(ds1, 1)
    region = next(r for r in img1["regions"] if normalise_phrase(r["phrase"]) == batch["text_input"][0])
    expected = torch.tensor([[region["x"] * S / w, region["y"] * S / h],
                             [(region["x"] + region["width"]) * S / w, (region["y"] + region["height"]) * S / h]])
    assert torch.allclose(batch["bbox"][0, 0], expected, atol=1e-4)


def test_vg_held_out_ids_and_file(data: dict[str, Path], tmp_path: Path) -> None:
    ids_file = tmp_path / "held.txt"
    ids_file.write_text("# test split\n2\n3  # trailing comment\n")
    ds = build_visual_genome(dcfg(data["vg"], held_out_ids=["4"], held_out_ids_file=str(ids_file)), "vg", 1, S)
    assert not {"2", "3", "4"} & set(ds.image_ids)
    json_file = tmp_path / "held.json"
    json_file.write_text(json.dumps([5, "6"]))
    ds = build_visual_genome(dcfg(data["vg"], held_out_ids_file=str(json_file)), "vg", 1, S)
    assert not {"5", "6"} & set(ds.image_ids)
    with pytest.raises(ConfigError, match="held_out_ids_file not found"):
        build_visual_genome(dcfg(data["vg"], held_out_ids_file=str(tmp_path / "nope.txt")), "vg", 1, S)


def test_region_data_refuses_cropping_transform(data: dict[str, Path]) -> None:
    cfg = dcfg(data["vg"], vis_processor={"train": {"name": "blip2_image_train", "image_size": S}})
    with pytest.raises(ConfigError, match="resize-only"):
        build_visual_genome(cfg, "vg", 1, S)


def test_missing_storage_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="storage not found"):
        build_visual_genome(dcfg(tmp_path / "nowhere"), "vg", 1, S)
    with pytest.raises(DataError, match="annotation file not found"):
        build_visual_genome(dcfg(tmp_path), "vg", 1, S)


# ----------------------------------------------------------------------------- TextOCR
def test_textocr_words_filters_and_clipping(data: dict[str, Path]) -> None:
    ds = build_textocr(dcfg(data["textocr"], num_regions=4), "textocr", batch_size=1, image_size=S)
    assert fx.TEXTOCR_FEW_WORDS_ID not in ds.image_ids
    assert ds.min_valid == 2
    batches, skipped = draw(ds, 25)
    assert skipped["unreadable_image"] > 0  # img_corrupt
    for batch in batches:
        assert batch["bbox"].shape == (1, 4, 2, 2)
        assert torch.all(batch["bbox"] >= 0) and torch.all(batch["bbox"] <= S)
        for word in batch["text_input"]:
            assert word not in (".", "tiny", "badbox", "")
        # words kept at 32 px are at least 5 px wide and high
        b = batch["bbox"][0]
        assert torch.all(b[:, 1] - b[:, 0] >= 5 - 1e-4) or torch.any(b == S)  # clipped at the border


def test_textocr_held_out(data: dict[str, Path]) -> None:
    ds = build_textocr(dcfg(data["textocr"], num_regions=4, held_out_ids=["img000"]), "textocr", 1, S)
    assert "img000" not in ds.image_ids and ds.image_ids


# ----------------------------------------------------------------------------- LAION
def test_laion_shards_captions_and_broken_samples(data: dict[str, Path]) -> None:
    ds = build_laion(dcfg(data["laion"], _laion=True, shuffle_buffer=4), "laion", batch_size=3, image_size=S)
    assert len(ds.shards) == 4  # 2 good, 1 with broken samples, 1 not a tar
    batches, skipped = draw(ds, 40)
    for batch in batches:
        assert set(batch) == {"image", "text_input"}  # no bbox: the model adds near-full boxes
        assert batch["image"].shape == (3, 3, S, S)
        for cap in batch["text_input"]:
            assert cap == cap.lower() and cap.strip() and not set('.!"()*#:;~') & set(cap)
            assert len(cap.split()) <= 50
    assert {"unreadable_shard", "unreadable_image", "empty_caption"} <= set(skipped)
    captions = {c for b in batches for c in b["text_input"]}
    assert "two shapes a red circle" in captions  # from 'Two shapes: a RED circle!'
    # a sample without its json is left out of the shard's index (reported there), never drawn
    index, left_out = index_shard(str(data["laion"] / "99998.tar"))
    assert left_out == {"incomplete_sample": 1} and fx.LAION_BROKEN_KEYS["no_json"] not in index.keys
    # what a batch skips is a function of its step alone: a fresh process (a resumed run, with
    # no shard indexed yet) counts the same as the process that drew every earlier batch
    fresh = build_laion(dcfg(data["laion"], _laion=True, shuffle_buffer=4), "laion", batch_size=3, image_size=S)
    for k in (5, 17, 33):
        rng = np.random.default_rng([0, 0, k])
        _, again = fresh.draw_batch(rng, BatchPosition(k, k, 0, 1, 0))
        _, first = ds.draw_batch(np.random.default_rng([0, 0, k]), BatchPosition(k, k, 0, 1, 0))
        assert again == first


def test_laion_held_out_and_patterns(data: dict[str, Path]) -> None:
    good_keys = [f"{i:09d}" for i in range(12)]
    ds = build_laion(dcfg(str(data["laion"] / "{00000..00001}.tar"), _laion=True,
                          held_out_ids=good_keys[:11]), "laion", batch_size=2, image_size=S)
    assert len(ds.shards) == 2
    batches, _ = draw(ds, 5)
    # only one sample is left: the batch repeats it
    assert len({c for b in batches for c in b["text_input"]}) == 1
    assert expand_shards(f"{data['laion']}/0000*.tar::{data['laion']}/99998.tar")[-1].endswith("99998.tar")
    with pytest.raises(DataError, match="no shard found"):
        build_laion(dcfg(str(data["laion"] / "{50000..50002}.tar"), _laion=True), "laion", 1, S)


# ----------------------------------------------------------------------------- region instructions
def test_region_instruct_records(data: dict[str, Path]) -> None:
    ds = build_region_instruct(dcfg(data["region_instruct"]), "region_instruct", batch_size=4, image_size=S)
    ids = {ds.ids[i] for i in range(len(ds))}
    assert not {"bad_count", "bad_box", "bad_role", "empty_reply", "bad_objects"} & ids
    assert {"missing_image", "outside"} <= ids  # found out at load time
    batches, skipped = draw(ds, 40)
    assert skipped["unreadable_image"] + skipped["bad_box"] > 0
    shared = 0
    for batch in batches:
        u = batch["image"].shape[0]
        assert batch["image"].shape == (u, 3, S, S) and sorted(set(batch["image_index"])) == list(range(u))
        shared += u < 4
        k = max(batch["num_boxes"])
        assert batch["bbox"].shape == (4, k, 2, 2)
        for b, turns in enumerate(batch["conversations"]):
            n_img = sum(t["value"].count("[IMG]") for t in turns if t["from"] == "human")
            assert n_img == batch["num_boxes"][b]
            assert torch.all(batch["bbox"][b, n_img:] == 0)  # padding
    assert shared  # records of one image in one batch share its ViT pass
    # boxes are scaled from original pixels to the model input
    records = json.loads(Path(data["region_instruct"]).read_text())
    rec = records[0]
    from PIL import Image

    w, h = Image.open(Path(data["region_instruct"]).parent / rec["image"]).size
    item = ds.load_item(0, np.random.default_rng(0))
    x1, y1, x2, y2 = rec["boxes"][0]
    assert torch.allclose(item["bbox"][0], torch.tensor([[x1 * S / w, y1 * S / h], [x2 * S / w, y2 * S / h]]), atol=1e-4)


def test_object_boxes_reach_the_batch(data: dict[str, Path], tmp_path: Path) -> None:
    """Instruction records and LAION jsons list every object's box: batches
    carry them scaled to the model input and zero-padded (``objects``, ``num_objects``);
    records without the key get none, malformed lists are left out, and LAION passes them
    on only with a transform that does not crop."""
    records = json.loads(Path(data["region_instruct"]).read_text())
    ds = build_region_instruct(dcfg(data["region_instruct"]), "region_instruct", batch_size=4, image_size=S)
    with_objects = [i for i in range(len(ds)) if ds.ids[i] in {r["id"] for r in records if "objects" in r}]
    without = [i for i in range(len(ds)) if i not in with_objects and ds.ids[i] not in ("missing_image", "outside")]
    assert with_objects and without
    rec = next(r for r in records if r["id"] == ds.ids[with_objects[0]])
    from PIL import Image

    w, h = Image.open(Path(data["region_instruct"]).parent / rec["image"]).size
    item = ds.load_item(with_objects[0], np.random.default_rng(0))
    expect = torch.tensor([[[x1 * S / w, y1 * S / h], [x2 * S / w, y2 * S / h]] for x1, y1, x2, y2 in rec["objects"]])
    assert torch.allclose(item["objects"], expect, atol=1e-4)
    other = ds.load_item(without[0], np.random.default_rng(0))
    assert "objects" not in other
    batch = ds.collate([other, item])
    m = len(rec["objects"])
    assert batch["num_objects"] == [0, m] and batch["objects"].shape == (2, m, 2, 2)
    assert torch.all(batch["objects"][0] == 0) and torch.equal(batch["objects"][1], item["objects"])
    assert "objects" not in ds.collate([other, other])

    eval_laion = build_laion(dcfg(data["laion"], shuffle_buffer=4), "laion", batch_size=3, image_size=S)
    batches, _ = draw(eval_laion, 30)
    seen = 0
    for batch in batches:
        assert len(batch["num_objects"]) == 3 and batch["objects"].shape[0] == 3
        for b, n in enumerate(batch["num_objects"]):
            boxes = batch["objects"][b, :n]
            seen += n
            assert torch.all(boxes[:, 1] > boxes[:, 0]) and torch.all(boxes >= 0) and torch.all(boxes <= S)
    assert seen
    crop_laion = build_laion(dcfg(data["laion"], _laion=True, shuffle_buffer=4), "laion", batch_size=3, image_size=S)
    assert all("objects" not in b for b in draw(crop_laion, 10)[0])
    shard = fx.write_laion_bad_objects(tmp_path / "objects.tar")
    small = build_laion(dcfg(shard, shuffle_buffer=3), "laion", batch_size=2, image_size=S)
    batches, skipped = draw(small, 6)
    assert skipped["bad_objects"] > 0  # an inverted box: the sample is left out
    first = batches[0]["objects"][0]
    assert torch.allclose(first, torch.tensor([[[2 * S / 40, 3 * S / 30], [12 * S / 40, 13 * S / 30]],
                                               [[20 * S / 40, 5 * S / 30], [38 * S / 40, 25 * S / 30]]]))


def test_region_instruct_held_out_by_id_or_image(data: dict[str, Path]) -> None:
    ds = build_region_instruct(dcfg(data["region_instruct"], held_out_ids=["1", "2_0"]), "ri", 1, S)
    kept = [(ds.ids[i], ds.images[i]) for i in range(len(ds))]
    assert all(img != "images/1.jpg" and rid != "2_0" for rid, img in kept)


def _records(images_and_counts: list[tuple[str, int]]) -> list[dict]:
    turns = [{"from": "human", "value": "image[IMG] What color is it?"}, {"from": "gpt", "value": "Red."}]
    return [{"id": f"{img}_{j}", "image": img, "boxes": [[0, 0, 5, 5]], "conversations": turns}
            for img, n in images_and_counts for j in range(n)]


@pytest.mark.parametrize("k", [2, 3, 4])
def test_records_per_image_groups_an_images_records_in_runs(k: int) -> None:
    """Each epoch still visits every record once; an image's records come in runs of up
    to k (as many full runs as its record count allows), the runs in random order."""
    from click4caption.data.region_instruct import RegionInstructDataset

    counts = [(f"images/{i}.jpg", n) for i, n in enumerate([1, 2, 3, 4, 5, 6, 7, 9, 2, 5] * 3)]
    records = _records(counts)
    ds = RegionInstructDataset("ri", Path("."), records, None, S, 8, 1.0, records_per_image=k)
    plain = RegionInstructDataset("ri", Path("."), records, None, S, 8, 1.0)
    for epoch in (0, 1):
        order = ds.epoch_order(np.random.default_rng([5, epoch]))
        assert sorted(order.tolist()) == list(range(len(records)))
        images = [records[i]["image"] for i in order]
        runs = [len(list(g)) for _, g in itertools.groupby(images)]
        per_image = Counter(images)
        run_count = Counter(img for img, _ in itertools.groupby(images))
        wanted = {img: -(-n // k) for img, n in per_image.items()}  # ceil(n / k) runs of <= k
        # two runs of one image may land next to each other by chance, never more runs
        assert all(run_count[img] <= wanted[img] for img in per_image)
        assert sum(run_count.values()) >= 0.85 * sum(wanted.values())
        assert max(runs) >= k and sum(r <= k for r in runs) >= 0.85 * len(runs)
    a, b = (ds.epoch_order(np.random.default_rng([5, e])) for e in (0, 1))
    assert a.tolist() != b.tolist()  # reshuffled per epoch
    # records_per_image 1 is the plain permutation of before (same streams as earlier runs)
    rng_order = np.random.default_rng([5, 0]).permutation(len(records))
    assert plain.epoch_order(np.random.default_rng([5, 0])).tolist() == rng_order.tolist()
    # a plain order keeps far fewer records of one image together
    plain_runs = [len(list(g)) for _, g in itertools.groupby(
        records[i]["image"] for i in plain.epoch_order(np.random.default_rng([5, 0])))]
    assert len(plain_runs) > len(runs)


def test_records_per_image_fewer_distinct_images_per_batch(tmp_path: Path) -> None:
    """Grouped records share one image (and one ViT pass) per batch; the image read once
    for a run gives the same pixels and boxes as reading it anew."""
    root = fx.write_region_instruct(tmp_path / "ri", n_images=12, seed=3)
    grouped = build_region_instruct(dcfg(root, records_per_image=4), "ri", batch_size=8, image_size=S)
    plain = build_region_instruct(dcfg(root), "ri", batch_size=8, image_size=S)
    g_batches, _ = draw(grouped, 10)
    p_batches, _ = draw(plain, 10)
    g_images = sum(b["image"].shape[0] for b in g_batches)
    p_images = sum(b["image"].shape[0] for b in p_batches)
    assert g_images < 0.6 * p_images, (g_images, p_images)
    hits = 0
    for i in range(1, len(grouped)):
        if grouped.images[i] != grouped.images[i - 1]:
            continue
        try:
            before = grouped.load_item(i - 1, np.random.default_rng(0))
            cached = grouped.load_item(i, np.random.default_rng(0))  # the same image: not read again
            fresh = plain.load_item(i, np.random.default_rng(0))
        except SkipSample:  # the fixture's broken records
            continue
        hits += cached["image"] is before["image"]
        assert torch.equal(cached["image"], fresh["image"]) and torch.equal(cached["bbox"], fresh["bbox"])
    assert hits >= 5
    with pytest.raises(ConfigError, match="records_per_image must be >= 1"):
        build_region_instruct(dcfg(root, records_per_image=0), "ri", batch_size=8, image_size=S)


# ----------------------------------------------------------------------------- mixing
def mixed_config(data: dict[str, Path], **run) -> object:
    eval_proc = {"train": {"name": "blip2_image_eval", "image_size": S}}
    return from_dict({
        "datasets": {
            "vg": {"build_info": {"storage": str(data["vg"])}, "vis_processor": eval_proc, "num_regions": 3,
                   "sample_ratio": 5},
            "textocr": {"build_info": {"storage": str(data["textocr"])}, "vis_processor": eval_proc,
                        "num_regions": 4, "sample_ratio": 1},
            "laion": {"build_info": {"storage": str(data["laion"])}, "special_batch_size": 3, "sample_ratio": 3,
                      "vis_processor": {"train": {"name": "blip2_image_train", "image_size": S}}},
        },
        "run": {"batch_size_train": 1, **run},
    })


def test_mixing_ratios_and_batch_sizes(data: dict[str, Path]) -> None:
    sources = build_sources(mixed_config(data), S)
    mixed = MixedBatches(sources, seed=42, rank=0, world_size=1, total_steps=9000)
    counts = Counter(mixed.source_at(t).name for t in range(9000))
    assert abs(counts["vg"] / 9000 - 5 / 9) < 0.03
    assert abs(counts["textocr"] / 9000 - 1 / 9) < 0.03
    assert abs(counts["laion"] / 9000 - 3 / 9) < 0.03
    by_name = {s.name: s for s in sources}
    assert by_name["vg"].batch_size == 1 and by_name["laion"].batch_size == 3
    # ranks draw different dataset sequences (seeded per rank, as upstream)
    other = MixedBatches(sources, seed=42, rank=1, world_size=2, total_steps=9000)
    assert not np.array_equal(mixed.choice, other.choice)


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_batches_are_a_function_of_the_step(data: dict[str, Path]) -> None:
    sources = build_sources(mixed_config(data), S)
    one = MixedBatches(sources, seed=7, rank=0, world_size=1, total_steps=12)
    direct = [one[t] for t in range(12)]
    again = MixedBatches(build_sources(mixed_config(data), S), seed=7, rank=0, world_size=1, total_steps=12)
    assert all(_same(again[t], direct[t]) for t in (11, 3, 0))
    # a loader started at step 5 with worker processes yields steps 5.. in order, identical
    resumed = list(make_loader(one, start_step=5, num_workers=2))
    assert [b["_step"] for b in resumed] == list(range(5, 12))
    assert all(_same(b, direct[b["_step"]]) for b in resumed)
    samples, meta = split_meta(direct[0])
    assert not any(k.startswith("_") for k in samples) and meta["_step"] == 0
    # another seed gives other batches
    other = MixedBatches(sources, seed=8, rank=0, world_size=1, total_steps=12)
    assert not all(_same(other[t], direct[t]) for t in range(12))


def test_epochs_visit_every_item_once_and_ranks_are_disjoint() -> None:
    class Items(MapSource):
        def __len__(self) -> int:
            return 10

        def load_item(self, index, rng):
            return {"i": index}

        def collate(self, items):
            return {"i": [it["i"] for it in items]}

    src = Items("items", batch_size=1, sample_ratio=1.0)
    r0 = [src.index_at(p, 0, 2, seed=1) for p in range(10)]
    r1 = [src.index_at(p, 1, 2, seed=1) for p in range(10)]
    assert sorted(r0[:5] + r1[:5]) == list(range(10))  # epoch 0 split between the ranks
    assert sorted(r0[5:] + r1[5:]) == list(range(10))  # and epoch 1 again
    assert r0[:5] != r0[5:]  # reshuffled per epoch


def test_all_broken_dataset_fails_with_a_clear_message(tmp_path: Path) -> None:
    root = tmp_path / "vg"
    (root / "VG_100K").mkdir(parents=True)
    (root / "VG_100K" / "1.jpg").write_bytes(b"junk")
    (root / "image_data.json").write_text(json.dumps([{"image_id": 1, "url": "http://x/VG_100K/1.jpg"}]))
    (root / "region_descriptions.json").write_text(json.dumps(
        [{"id": 1, "regions": [{"phrase": "a", "x": 0, "y": 0, "width": 5, "height": 5}]}]))
    ds = build_visual_genome(dcfg(root), "vg", 1, S)
    with pytest.raises(DataError, match="in a row were unusable"):
        draw(ds, 1)
