"""Loading the language model (any local transformers causal-LM folder) and its tokenizer."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from click4caption.errors import CheckpointError, ConfigError
from click4caption.tokenizer import TextTokenizer, load_tokenizer

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
           "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> fp16 on CUDA, fp32 elsewhere; otherwise the named dtype."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"model.llm_dtype: unknown dtype '{name}' (use auto, fp32, fp16 or bf16)")
    return _DTYPES[name]


def load_llm(
    path: str,
    device: torch.device,
    dtype: torch.dtype,
    from_scratch: bool = False,
    low_resource: bool = False,
    device_8bit: int = 0,
) -> tuple[PreTrainedModel, TextTokenizer]:
    """Load ``(model, tokenizer)`` from a local folder.

    Args:
        path: folder with ``config.json`` and tokenizer files (and weights unless
            ``from_scratch``).
        from_scratch: build from ``config.json`` with random weights (the shapes model
            is trained from scratch; its weights then come from the Click4Caption ckpt).
        low_resource: 8-bit weights through bitsandbytes (CUDA only).
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        from click4caption.checkpoint import SHIPPED_MODEL_DIR

        hint = ("the shipped shapes model is rebuilt with `make shapes-model`"
                if SHIPPED_MODEL_DIR in folder.as_posix()
                else "put the Vicuna weights there, see cached_model/README.md")
        raise CheckpointError(f"LLM folder not found or incomplete: {folder} (needs config.json; {hint})")
    tokenizer = load_tokenizer(folder)
    if from_scratch:
        config = AutoConfig.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        logger.info("built LLM %s from config (random weights, %.1fM params)", folder,
                    sum(p.numel() for p in model.parameters()) / 1e6)
        return model, tokenizer
    kwargs: dict = {"dtype": dtype, "low_cpu_mem_usage": True}
    if low_resource:
        if device.type != "cuda":
            logger.warning("low_resource (8-bit LLM) needs a CUDA GPU; running on %s in %s instead",
                           device, dtype)
        elif importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("low_resource: True needs bitsandbytes (pip install bitsandbytes)")
        else:
            from transformers import BitsAndBytesConfig

            kwargs.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                          device_map={"": device_8bit})
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except OSError as err:
        raise CheckpointError(f"cannot load LLM weights from {folder}: {str(err).splitlines()[0]}") from None
    return model, tokenizer
