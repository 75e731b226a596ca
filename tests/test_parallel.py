"""click4caption.parallel without a process group: torchrun's environment, sharding,
partial files cut short by a crash, resume and the in-order merge."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from click4caption.errors import Click4CaptionError, ConfigError
from click4caption.parallel import (
    DistContext, PartialWriter, dist_context, load_done, merge, partial_files, partial_path, read_jsonl, shard,
)


def test_context_from_torchrun_environment() -> None:
    assert dist_context({}) == DistContext(rank=0, world_size=1, local_rank=0)
    ctx = dist_context({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main, ctx.distributed) == (3, 4, 1, False, False)
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        dist_context({"WORLD_SIZE": "two"})
    with pytest.raises(ConfigError, match="RANK=2 WORLD_SIZE=2"):
        dist_context({"RANK": "2", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("n", [0, 1, 5, 7, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_cover_every_item_once_in_contiguous_blocks(n: int, world: int) -> None:
    blocks = [shard(n, r, world) for r in range(world)]
    assert [i for b in blocks for i in b] == list(range(n))
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_partial_writer_cuts_a_line_left_incomplete_by_a_crash(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    part = partial_path(out, 1)
    assert part.name == "results.jsonl.rank1.partial.jsonl"
    part.write_text('{"id": 1, "x": "a"}\n{"id": 2, "x": "b"}\n{"id": 3, "x"')  # killed mid-write
    assert [r["id"] for r in read_jsonl(part)] == [1, 2]
    with PartialWriter(part) as w:
        w.write({"id": 3, "x": "c"})
        w.write_many([{"id": 4, "x": "d"}])
    assert [json.loads(line)["id"] for line in part.read_text().splitlines()] == [1, 2, 3, 4]


def test_a_corrupt_line_before_the_last_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    with pytest.raises(Click4CaptionError, match="line 2"):
        read_jsonl(path)


def test_resume_reads_final_and_all_partials_then_merge_orders_by_input(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    out.write_text('{"id": "b", "v": 1}\n{"id": "z", "v": 0}\n')  # an earlier run, with an item no longer asked
    for rank, records in ((0, [{"id": "d", "v": 3}]), (1, [{"id": "a", "v": 0}]), (3, [{"id": "c", "v": 2}])):
        with PartialWriter(partial_path(out, rank)) as w:  # written by a 4-process run
            w.write_many(records)
    assert [p.name.split(".")[2] for p in partial_files(out)] == ["rank0", "rank1", "rank3"]
    done = load_done(out, "id")
    assert sorted(done) == ["a", "b", "c", "d", "z"]

    assert merge(out, ["a", "b", "c", "d"], "id", DistContext(rank=1, world_size=1)) is None  # not rank 0: no write
    assert partial_files(out)
    merged = merge(out, ["a", "b", "c", "d"], "id", DistContext())
    assert merged is not None and sorted(merged) == ["a", "b", "c", "d", "z"]
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b", "c", "d", "z"]
    assert partial_files(out) == []
    assert load_done(out, "id") == merged
