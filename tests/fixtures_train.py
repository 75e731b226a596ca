"""A tiny training setup written by tests: fixture data in every real format, a tiny
random model and a training YAML over them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.fixtures_data import write_all
from tests.tiny import tiny_model_section, write_tiny_llm

IMAGE_SIZE = 32  # tiny model input side


def tiny_train_config(tmp_path: Path, *, iters: int = 30, epochs: int = 1, save_every: int = 10,
                      run: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
                      datasets: dict[str, Any] | None = None) -> Path:
    """Write data, a tiny LLM and ``train.yaml`` under ``tmp_path``; return the YAML path.

    The learning rate is high so that a few dozen steps visibly lower the loss.
    """
    storage = write_all(tmp_path / "data") if not (tmp_path / "data").exists() else {
        "vg": tmp_path / "data" / "VisualGenome", "textocr": tmp_path / "data" / "TextOCR",
        "laion": tmp_path / "data" / "LAION", "region_instruct": tmp_path / "data" / "region_instruct" / "instruct.json"}
    llm = tmp_path / "llm"
    if not (llm / "config.json").exists():
        write_tiny_llm(llm)
    eval_proc = {"train": {"name": "blip2_image_eval", "image_size": IMAGE_SIZE}}
    doc: dict[str, Any] = {
        "model": tiny_model_section(llm, **(model or {})),
        "datasets": {
            "vg": {"build_info": {"storage": str(storage["vg"])}, "vis_processor": eval_proc,
                   "num_regions": 3, "sample_ratio": 2},
            "textocr": {"build_info": {"storage": str(storage["textocr"])}, "vis_processor": eval_proc,
                        "num_regions": 4, "sample_ratio": 1},
            "laion": {"build_info": {"storage": str(storage["laion"])},
                      "vis_processor": {"train": {"name": "blip2_image_train", "image_size": IMAGE_SIZE}},
                      "text_processor": {"train": {"name": "blip_caption"}},
                      "special_batch_size": 3, "shuffle_buffer": 4, "sample_ratio": 1},
            "region_instruct": {"build_info": {"storage": str(storage["region_instruct"])}, "vis_processor": eval_proc,
                                "special_batch_size": 2, "sample_ratio": 1},
        },
        "run": {
            "task": "image_text_pretrain", "init_lr": 3e-3, "min_lr": 1e-3, "warmup_lr": 1e-4, "warmup_steps": 3,
            "max_epoch": epochs, "iters_per_epoch": iters, "batch_size_train": 1, "num_workers": 0,
            "amp": True, "seed": 42, "output_dir": str(tmp_path / "output"), "save_every_iters": save_every,
            "keep_last_ckpts": 2, "log_freq": 5, "device": "cpu",
        },
    }
    for name, extra in (datasets or {}).items():
        doc["datasets"].setdefault(name, {}).update(extra)
    doc["run"].update(run or {})
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path
