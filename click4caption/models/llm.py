"""The language model: any local transformers causal-LM folder (Vicuna v0, LLaMA, the
shapes model's tiny LLaMA), its config, a check of its weight files, and loading."""
from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from click4caption.checkpoint import summarize_keys
from click4caption.errors import CheckpointError, ConfigError
from click4caption.paths import SHIPPED_MODEL_DIR

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
           "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

#: tensors a weight file may hold that the model does not load, with the reason
LLM_FILE_IGNORED: tuple[tuple[str, str], ...] = (
    (r"\.rotary_emb\.inv_freq$", "deterministic RoPE buffer (transformers recomputes it)"),
)
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> fp16 on CUDA, fp32 elsewhere; otherwise the named dtype."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"model.llm_dtype: unknown dtype '{name}' (use auto, fp32, fp16 or bf16)")
    return _DTYPES[name]


def read_llm_config(path: str | Path) -> PretrainedConfig:
    """The folder's ``config.json``.

    Raises:
        CheckpointError: no folder or no config.json, naming where the files go.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        hint = ("the shipped shapes model is rebuilt with `make shapes-model`" if SHIPPED_MODEL_DIR in folder.as_posix()
                else "put the Vicuna weights there, see cached_model/README.md")
        raise CheckpointError(f"LLM folder not found or incomplete: {folder} (needs config.json; {hint})")
    try:
        return AutoConfig.from_pretrained(str(folder))
    except Exception as err:
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {str(err).splitlines()[0]}") from None


def build_llm_skeleton(config: PretrainedConfig) -> PreTrainedModel:
    """The LLM on the meta device: its tensor names and shapes, no memory, no weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _weight_file_list(folder: Path) -> list[Path]:
    """The weight files of a folder: one file, or the shards its index names."""
    for name in _WEIGHT_FILES:
        index = folder / (name + ".index.json")
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"cannot read {index}: {err}") from None
            return [folder / shard for shard in sorted(set(weight_map.values()))]
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(f"LLM folder {folder} holds no weights ({' or '.join(_WEIGHT_FILES)}, or their "
                          "sharded .index.json); see cached_model/README.md")


def llm_file_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the folder's weight files, read from the
    safetensors headers or memory-mapped ``.bin`` files (no tensor data is read).

    Raises:
        CheckpointError: a weight file is missing or unreadable.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for path in _weight_file_list(Path(folder)):
        if not path.is_file():
            raise CheckpointError(f"LLM weight file missing: {path} (named by the folder's index)")
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt", device="cpu") as f:
                    shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            else:
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
                shapes.update({k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)})
        except Exception as err:
            raise CheckpointError(f"cannot read LLM weights {path}: {str(err).splitlines()[0]}") from None
    return shapes


def check_llm_weights(folder: str | Path, skeleton: PreTrainedModel) -> None:
    """Every tensor the LLM needs is in the folder's weight files with its shape, and the
    files hold nothing else, tied weights and recomputed buffers excepted (each with its
    reason). Checked from the file headers, before any weight is loaded.

    Raises:
        CheckpointError: naming the missing, unexpected or wrong-shaped tensors as the
            files spell them.
    """
    folder = Path(folder)
    found = llm_file_shapes(folder)
    needed = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    tied = {k for k in needed if _is_tied(skeleton, k)}
    missing = sorted(k for k in needed if k not in found and k not in tied)
    ignored = {k: why for k in found if k not in needed for p, why in LLM_FILE_IGNORED if re.search(p, k)}
    unexpected = sorted(k for k in found if k not in needed and k not in ignored)
    wrong = [(k, found[k], needed[k]) for k in needed if k in found and found[k] != needed[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing: {summarize_keys(missing, limit=8)}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) the model does not have: {summarize_keys(unexpected, limit=8)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) with the wrong shape: "
                        + "; ".join(f"{k} is {list(a)}, config.json needs {list(b)}" for k, a, b in wrong[:4]))
    if problems:
        raise CheckpointError(f"LLM folder {folder}: " + "; ".join(problems))
    if ignored:
        logger.info("LLM folder %s: %d tensors not loaded (%s)", folder, len(ignored), "; ".join(sorted(set(ignored.values()))))


def _is_tied(model: PreTrainedModel, key: str) -> bool:
    """True for a weight transformers ties to another (e.g. ``lm_head.weight`` when
    ``tie_word_embeddings``), which a file need not hold."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    tied: Any = getattr(model, "_tied_weights_keys", None) or {}
    return key in tied


def load_llm(path: str | Path, config: PretrainedConfig, device: torch.device, dtype: torch.dtype,
             from_scratch: bool = False, low_resource: bool = False, device_8bit: int = 0) -> PreTrainedModel:
    """Load the LLM of a folder whose weights :func:`check_llm_weights` accepted.

    Args:
        path: folder with ``config.json`` (and weights unless ``from_scratch``).
        from_scratch: build from ``config.json`` with random weights (the shapes model
            is trained from scratch; its weights then come from the Click4Caption ckpt).
        low_resource: 8-bit weights through bitsandbytes (CUDA only).
    Raises:
        CheckpointError: the weights cannot be read, or transformers reports a tensor it
            did not load (a second check after :func:`check_llm_weights`).
    """
    folder = Path(path)
    if from_scratch:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        logger.info("built LLM %s from config (random weights, %.1fM params)", folder,
                    sum(p.numel() for p in model.parameters()) / 1e6)
        return model
    kwargs: dict[str, Any] = {"dtype": dtype, "low_cpu_mem_usage": True, "output_loading_info": True}
    if low_resource:
        if device.type != "cuda":
            logger.warning("low_resource (8-bit LLM) needs a CUDA GPU; running on %s in %s instead", device, dtype)
        elif importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("low_resource: True needs bitsandbytes (pip install bitsandbytes)")
        else:
            from transformers import BitsAndBytesConfig

            kwargs.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": device_8bit})
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except OSError as err:
        raise CheckpointError(f"cannot load LLM weights from {folder}: {str(err).splitlines()[0]}") from None
    missing = [k for k in info.get("missing_keys", ()) if not _is_tied(model, k)]
    bad = list(missing) + list(info.get("mismatched_keys", ()))
    if bad:
        raise CheckpointError(f"LLM folder {folder}: transformers did not load {summarize_keys(map(str, bad), limit=8)}")
    return model
