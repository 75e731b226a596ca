"""Data-parallel processing of a list of items under ``torchrun``: shard, write, resume, merge.

The same script runs as one process or as N under ``torchrun --nproc-per-node N`` (or
across nodes, with torchrun's usual ``--nnodes`` / ``--node-rank`` / ``--rdzv-*``
arguments). Every process:

1. reads its place from the environment torchrun sets (:func:`dist_context`) and joins a
   process group when there is more than one process (:func:`init`, gloo on CPUs, NCCL
   on GPUs);
2. reads the records already written by any earlier run (:func:`load_done`: the merged
   output file and every partial file, whatever world size wrote them), and skips those
   items;
3. takes its own contiguous share of the items (:func:`shard`) and appends one JSON line
   per finished item to its own partial file (:class:`PartialWriter`, flushed per write,
   so a crash loses at most the items not yet written);
4. after a barrier, rank 0 writes every record into the one output file in input order
   and removes the partial files (:func:`merge`).

Records are JSON objects; an item's identity is the string form of one field of its
record (``key_field``), so a rerun, with the same or another number of processes, finds
what is already done. Only the group set-up needs ``torch``; everything else is plain
Python and files, so it is also usable (and tested) without a process group.

Example::

    ctx = init(dist_context(), device="cpu")
    done = load_done(out_path, "id")
    todo = [items[i] for i in shard(len(items), ctx.rank, ctx.world_size) if str(items[i]["id"]) not in done]
    with PartialWriter(partial_path(out_path, ctx.rank)) as writer:
        for item in todo:
            writer.write({"id": item["id"], "answer": work(item)})
    barrier(ctx)
    records = merge(out_path, [str(it["id"]) for it in items], "id", ctx)   # dict on rank 0, None elsewhere
    cleanup(ctx)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Sequence

from click4caption.errors import Click4CaptionError, ConfigError

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial.jsonl"
# how long a process waits for the others at a barrier (long: a rank may still be captioning)
GROUP_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits among the ones torchrun started.

    Attributes:
        rank: global rank, ``0 <= rank < world_size``.
        world_size: number of processes (1 without torchrun).
        local_rank: rank on this node (the GPU index to use).
        backend: ``"gloo"`` / ``"nccl"`` once :func:`init` started a group, else ``None``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that merges and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group is running (more than one process)."""
        return self.backend is not None


def _env_int(env: dict[str, str], name: str, default: int) -> int:
    try:
        return int(env.get(name, default))
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {env[name]!r}") from None


def dist_context(env: dict[str, str] | None = None) -> DistContext:
    """This process's rank and world size from torchrun's ``RANK`` / ``WORLD_SIZE`` /
    ``LOCAL_RANK`` (``os.environ`` by default); rank 0 of 1 without them. Starts nothing.

    Raises:
        ConfigError: a variable is not an integer, or the rank is out of range.
    """
    env = dict(os.environ if env is None else env)
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    local = _env_int(env, "LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world}")
    return DistContext(rank=rank, world_size=world, local_rank=local)


def init(ctx: DistContext, device: Any = "cpu", init_method: str = "env://",
         timeout: timedelta = GROUP_TIMEOUT) -> DistContext:
    """Start the process group when ``ctx.world_size > 1`` (NCCL when ``device`` is a CUDA
    device, gloo otherwise; rendezvous from torchrun's ``MASTER_ADDR`` / ``MASTER_PORT``
    with ``env://``).

    Args:
        ctx: from :func:`dist_context`.
        device: this process's device (``str`` or ``torch.device``).
        init_method / timeout: of ``torch.distributed.init_process_group``.

    Returns:
        ``ctx`` with ``backend`` set (unchanged for a single process).
    """
    if ctx.world_size <= 1:
        return ctx
    import torch
    import torch.distributed as dist

    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method=init_method, world_size=ctx.world_size, rank=ctx.rank,
                                timeout=timeout, device_id=dev if dev.type == "cuda" else None)
    logger.info("rank %d of %d (backend %s)", ctx.rank, ctx.world_size, backend)
    return dataclasses.replace(ctx, backend=backend)


def barrier(ctx: DistContext) -> None:
    """Wait for every process (no-op without a group)."""
    if not ctx.distributed:
        return
    import torch.distributed as dist

    if ctx.backend == "nccl":
        dist.barrier(device_ids=[ctx.local_rank])
    else:
        dist.barrier()


def cleanup(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init` started one."""
    if not ctx.distributed:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def shard(n_items: int, rank: int, world_size: int) -> range:
    """The contiguous block of item indices that ``rank`` handles.

    Blocks differ in size by at most one, cover ``range(n_items)`` exactly once and keep
    neighbouring items together (regions of one image stay on one process).

    Returns:
        ``range(start, stop)`` of indices into the item list.
    """
    if world_size < 1 or not 0 <= rank < world_size or n_items < 0:
        raise ValueError(f"bad shard request: {n_items} items, rank {rank} of {world_size}")
    base, extra = divmod(n_items, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def partial_path(output: str | Path, rank: int) -> Path:
    """``<output>.rank<R>.partial.jsonl`` beside ``output``: this rank's append-only file."""
    output = Path(output)
    return output.with_name(f"{output.name}.rank{rank}{PARTIAL_SUFFIX}")


def partial_files(output: str | Path) -> list[Path]:
    """Every partial file of ``output``, whichever world size wrote them, sorted by rank."""
    output = Path(output)
    found = output.parent.glob(f"{output.name}.rank*{PARTIAL_SUFFIX}")

    def rank_of(p: Path) -> int:
        middle = p.name[len(output.name) + len(".rank"):-len(PARTIAL_SUFFIX)]
        return int(middle) if middle.isdigit() else 1 << 30

    return sorted(found, key=rank_of)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file. A last line cut short by a crash is ignored
    (with a warning); a bad line elsewhere is an error.

    Raises:
        Click4CaptionError: a line that is not a JSON object, before the last one.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    out: list[dict[str, Any]] = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            if n == len(lines) - 1:  # the unterminated last line: a write cut short
                logger.warning("%s: ignoring an incomplete last line (a run was interrupted)", path)
                continue
            raise Click4CaptionError(f"{path}: line {n + 1} is not a JSON object; delete the file to start over")
        out.append(record)
    return out


def load_done(output: str | Path, key_field: str) -> dict[str, dict[str, Any]]:
    """Records already written for ``output``: its merged file, then every partial file.

    Returns:
        ``{str(record[key_field]): record}``; a later file wins for a key written twice.
    """
    done: dict[str, dict[str, Any]] = {}
    for path in [Path(output), *partial_files(output)]:
        for record in read_jsonl(path):
            if key_field in record:
                done[str(record[key_field])] = record
    return done


class PartialWriter:
    """Append-only JSON-lines writer for one rank's partial file; each record is flushed
    to the operating system as it is written. A last line left incomplete by a crash is
    cut off before appending.

    Use as a context manager: ``with PartialWriter(path) as w: w.write({...})``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = None

    def __enter__(self) -> "PartialWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(self.path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self._file = open(self.path, "a", encoding="utf-8")
        return self

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a JSON object) as one line and flush it."""
        assert self._file is not None, "use PartialWriter as a context manager"
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def write_many(self, records: Iterable[dict[str, Any]]) -> None:
        """Append several records, flushed once at the end (one chunk of work)."""
        assert self._file is not None, "use PartialWriter as a context manager"
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._file.flush()

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def merge(output: str | Path, order: Sequence[str], key_field: str, ctx: DistContext,
          keep_unknown: bool = True) -> dict[str, dict[str, Any]] | None:
    """Rank 0 writes every record known for ``output`` (its previous content plus all
    partial files) into ``output`` in input order, then removes the partial files.

    Call it on every rank after the work (it starts with a barrier). Records whose key is
    not in ``order`` (from a run with other inputs or a larger ``--limit``) are kept after
    the others, in their previous order, unless ``keep_unknown`` is False. The file is
    replaced atomically.

    Args:
        output: the merged JSON-lines file.
        order: every item's key (``str``), in input order.
        key_field: the record field that holds the key.
        ctx: this process's place.

    Returns:
        On rank 0, ``{key: record}`` of every record written; ``None`` on other ranks.
    """
    barrier(ctx)
    if not ctx.is_main:
        return None
    output = Path(output)
    done = load_done(output, key_field)
    position = {key: i for i, key in enumerate(order)}
    known = sorted((k for k in done if k in position), key=position.__getitem__)
    extra = [k for k in done if k not in position] if keep_unknown else []
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for key in known + extra:
            f.write(json.dumps(done[key], ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, output)
    for path in partial_files(output):
        path.unlink()
    written = {key: done[key] for key in known + extra}
    logger.info("merged %d records into %s", len(written), output)
    return written
