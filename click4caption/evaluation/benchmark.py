"""One benchmark run: annotations -> captions (resumable, data-parallel) -> scores.

Files written under the output folder:

- ``run.json``: what the predictions depend on (annotation file and its SHA-256, model
  config and overrides, generation settings). A rerun into the same folder with other
  values is refused, so stale captions are never scored as new ones.
- ``regions.jsonl``: one record per region in input order (see
  :mod:`click4caption.evaluation.regions`); ``regions.jsonl.rank<R>.partial.jsonl`` while running.
- ``predictions.json``: ``[{"image_id": region_id, "caption"}]`` for ``COCO.loadRes``.
- ``scores.json``: scores, what was not computed and why, skipped regions by reason.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from click4caption.errors import Click4CaptionError, ConfigError, InputError
from click4caption.evaluation.annotations import Benchmark, load_benchmark
from click4caption.evaluation.metrics import METRICS, region_ground_truth, score_captions
from click4caption.evaluation.regions import DEFAULT_BATCH_SIZE, RegionDescriber, caption_regions
from click4caption.parallel import DistContext, barrier

logger = logging.getLogger(__name__)

# generation defaults for the benchmarks: region captions are short (greedy, one beam)
BENCHMARK_MAX_NEW_TOKENS = 40
RUN_FILE = "run.json"
RECORDS_FILE = "regions.jsonl"
PREDICTIONS_FILE = "predictions.json"
SCORES_FILE = "scores.json"
BENCHMARKS = ("vg", "refcocog")


@dataclass
class BenchmarkRun:
    """What one run evaluates and where it writes.

    Attributes:
        benchmark: ``"vg"`` or ``"refcocog"`` (a label in the reports).
        annotations: the annotation file (either layout of :mod:`~click4caption.evaluation.annotations`).
        image_roots: folders holding the images, searched in order.
        out: the output folder.
        limit: caption only the first ``limit`` valid regions (``None``: all).
        batch_size: regions per ``describe_regions`` call.
        signature: what the captions depend on besides the annotations (config, overrides,
            generation settings); checked against ``run.json`` on a rerun.
        command: the command line, recorded in ``scores.json``.
    """

    benchmark: str
    annotations: Path
    image_roots: list[Path]
    out: Path
    limit: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    signature: dict[str, Any] = field(default_factory=dict)
    command: str = ""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_run_signature(out: Path, signature: dict[str, Any], ctx: DistContext) -> None:
    """Refuse to resume into ``out`` when ``run.json`` records other inputs; rank 0 writes
    it on the first run.

    Raises:
        ConfigError: the folder holds captions made with other inputs or settings.
    """
    path = out / RUN_FILE
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise ConfigError(f"{path} is not valid JSON; delete it (and the captions beside it) to start over") from None
        differ = sorted(k for k in set(previous) | set(signature) if previous.get(k) != signature.get(k))
        if differ:
            raise ConfigError(f"{out} holds captions made with other {', '.join(differ)} (see {path}); "
                              "use another --out folder, or delete that one to start over")
        return
    if ctx.is_main:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(signature, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def run_benchmark(run: BenchmarkRun, get_captioner: Callable[[], RegionDescriber], settings: Any = None,
                  ctx: DistContext | None = None, bench: Benchmark | None = None) -> dict[str, Any] | None:
    """Caption the benchmark's regions (resuming), then score them on rank 0.

    Args:
        run: what to evaluate and where to write.
        get_captioner: builds the captioner, called only if there is captioning left to do.
        settings: ``GenerationSettings`` passed to ``describe_regions``.
        ctx: this process's place (one process when ``None``).
        bench: ``run.annotations`` already read by :func:`load_benchmark` (read here when ``None``).

    Returns:
        The content of ``scores.json`` on rank 0, ``None`` on the other ranks.
    """
    ctx = ctx or DistContext()
    bench = bench or load_benchmark(run.annotations)
    for root in run.image_roots:
        if not root.is_dir():
            raise InputError(f"image folder not found: {root}")
    if run.limit is not None and run.limit < 1:
        raise InputError(f"--limit must be >= 1, got {run.limit}")
    if ctx.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
    barrier(ctx)
    signature = {"benchmark": run.benchmark, "annotations": str(run.annotations.resolve()),
                 "annotations_sha256": file_sha256(run.annotations), **run.signature}
    check_run_signature(run.out, signature, ctx)
    regions = bench.regions[:run.limit] if run.limit is not None else bench.regions
    records = caption_regions(get_captioner, regions, run.image_roots, run.out / RECORDS_FILE, settings,
                              run.batch_size, ctx)
    if records is None:
        return None
    missing = [r.key for r in regions if r.key not in records]
    if missing:
        raise Click4CaptionError(f"{len(missing)} regions have no caption after the run (first: {missing[:5]}); rerun to "
                         "complete them")
    return score_run(run, bench, regions, records, world_size=ctx.world_size)


def score_run(run: BenchmarkRun, bench: Benchmark, regions: Sequence[Any], records: dict[str, dict[str, Any]],
              world_size: int = 1) -> dict[str, Any]:
    """Write ``predictions.json`` and ``scores.json`` for ``regions`` from their records."""
    skipped_ids: dict[str, list[Any]] = {k: list(v) for k, v in bench.skipped.items()}
    predictions, references = [], []
    clipped = 0
    for region in regions:
        record = records[region.key]
        if "skipped" in record:
            skipped_ids.setdefault(record["skipped"], []).append(region.region_id)
            continue
        clipped += bool(record.get("clipped"))
        predictions.append({"image_id": region.region_id, "caption": record["caption"]})
        references.append((region.region_id, region.captions))
    (run.out / PREDICTIONS_FILE).write_text(json.dumps(predictions, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.info("scoring %d regions", len(predictions))
    report = score_captions(region_ground_truth(references), predictions)
    scores = {
        "benchmark": run.benchmark,
        "annotations": str(run.annotations),
        "layout": bench.layout,
        "regions_in_file": bench.total,
        "regions_selected": len(regions),
        "regions_scored": report.count,
        "limit": run.limit,
        "scores": report.scores,
        "scores_x100": {k: round(100 * v, 2) for k, v in report.scores.items()},
        "not_computed": report.not_computed,
        "tokenizer": report.tokenizer,
        "skipped": dict(Counter({k: len(v) for k, v in skipped_ids.items()}).most_common()),
        "skipped_ids": skipped_ids,
        "clipped_boxes": clipped,
        "processes": world_size,
        "run": {"batch_size": run.batch_size, **run.signature},
        "command": run.command,
    }
    (run.out / SCORES_FILE).write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return scores


def format_scores(scores: dict[str, Any]) -> str:
    """A few lines for the terminal: the scores as papers print them (x100)."""
    lines = [f"{scores['benchmark']} ({scores['layout']}, {scores['regions_scored']} regions scored"
             f"{', limit ' + str(scores['limit']) if scores['limit'] else ''})"]
    for name in [*METRICS, "SPICE"]:
        if name in scores["scores_x100"]:
            lines.append(f"  {name:8s} {scores['scores_x100'][name]:.1f}")
        elif name in scores["not_computed"]:
            lines.append(f"  {name:8s} not computed: {scores['not_computed'][name]}")
    if scores["skipped"]:
        lines.append("  skipped: " + ", ".join(f"{k} {v}" for k, v in scores["skipped"].items()))
    return "\n".join(lines)
