"""Where a training step of the shipped shapes recipe spends its time.

``python benchmarks/shapes_step_profile.py [--steps 300] [--work DIR] [--options KEY=VALUE ...]`` draws the recipe's
training data (or reuses it under ``--work``), builds the trainer on
``train_configs/shapes_train.yaml`` and runs real steps from the recipe's data stream,
timing per source: building the batch, forward, backward and the optimizer step; then,
for region-instruction steps, the forward by part (ViT, Q-Former, conversation rows, LLM
calls). Batches are built in this process here (the trainer builds them in a worker,
in parallel with the model), so the iterations/s printed leave that out.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("shapes_step_profile")


def prepare(work: Path) -> list[str]:
    """The recipe's data and LLM folder under ``work`` (drawn once); returns the config overrides."""
    from click4caption_apps import shapes_recipe as recipe
    from click4caption.shapes.writers import write_shapes_dataset

    data, llm = work / "data", work / "llm"
    if not (data / "region_instruct" / "instruct.json").exists():
        write_shapes_dataset(data, recipe.NUM_IMAGES, seed=recipe.DATA_SEED, mix=recipe.INSTRUCT_MIX,
                             variety=recipe.VARIETY)
    if not (llm / "config.json").exists():
        recipe.write_llm_folder(llm)
    return [f"model.llama_model={llm}", f"datasets.vg.build_info.storage={data / 'VisualGenome'}",
            f"datasets.laion.build_info.storage={data / 'LAION'}/{{00000..00001}}.tar",
            f"datasets.region_instruct.build_info.storage={data / 'region_instruct' / 'instruct.json'}",
            "run.device=cpu", f"run.output_dir={work / 'runs'}"]


def timed(times: dict[str, list[float]], key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[key].append(time.perf_counter() - start)
    return call


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="training steps to time (after 300 warm-up-free steps)")
    p.add_argument("--work", default="/tmp/shapes_step_profile", help="folder for the data and LLM config")
    p.add_argument("--options", nargs="+", default=[], help="config overrides, key=value (e.g. model.num_query_token=32)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from click4caption.config import load_config
    from click4caption.data.mixing import split_meta
    from click4caption.paths import PROJECT_ROOT
    from click4caption.training.loop import Trainer

    cfg = load_config(PROJECT_ROOT / "train_configs" / "shapes_train.yaml", prepare(Path(args.work)) + args.options)
    trainer = Trainer(cfg, "profile")
    trainer.setup()
    model = trainer.model
    parts: dict[str, list[float]] = defaultdict(list)
    model.encode_image = timed(parts, "ViT", model.encode_image)
    model.encode_regions = timed(parts, "Q-Former", model.encode_regions)
    model.conversation_training_row = timed(parts, "conversation rows", model.conversation_training_row)
    model.llama_model.forward = timed(parts, "LLM", model.llama_model.forward)
    phases: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    instruct_parts: dict[str, float] = defaultdict(float)
    instruct_steps = 0
    first = 300
    for it in range(first, first + args.steps):
        t0 = time.perf_counter()
        samples, meta = split_meta(trainer.batches[it])
        for v in parts.values():
            v.clear()
        t1 = time.perf_counter()
        out = model(samples)
        t2 = time.perf_counter()
        out["loss"].backward()
        t3 = time.perf_counter()
        trainer._optimizer_step()
        t4 = time.perf_counter()
        source = meta["_source"]
        for name, value in (("batch", t1 - t0), ("forward", t2 - t1), ("backward", t3 - t2), ("optimizer", t4 - t3)):
            phases[source][name].append(value)
        if source == "region_instruct":
            instruct_steps += 1
            for name, values in parts.items():
                instruct_parts[name] += sum(values)
    model_time = 0.0
    print(f"{args.steps} steps of train_configs/shapes_train.yaml (median ms per step):")
    for source, times in phases.items():
        model_time += sum(sum(times[k]) for k in ("forward", "backward", "optimizer"))
        print(f"  {source:16s} {len(times['batch']):4d} steps  " + "  ".join(
            f"{name} {1000 * statistics.median(v):6.1f}" for name, v in times.items()))
    print(f"  model steps alone: {args.steps / model_time:.2f} it/s")
    if instruct_steps:
        print("  region_instruct forward by part (mean ms per step): " + ", ".join(
            f"{name} {1000 * total / instruct_steps:.1f}" for name, total in instruct_parts.items()))
    trainer.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
