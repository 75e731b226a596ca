"""Shared plumbing for the apps (``inference.py``, ``demo.py``, ``train.py``,
``evaluate.py``): logging, device choice, one-line errors."""
from __future__ import annotations

import logging
import os
import random
import sys
from typing import TYPE_CHECKING, Callable

from click4caption.errors import Click4CaptionError

if TYPE_CHECKING:
    import torch

# torch and numpy are imported inside the functions that need them: the apps check their
# arguments (files, boxes, questions) first and report mistakes without the slow imports.



def setup_logging(verbose: bool = False) -> None:
    """Our messages at INFO (DEBUG with ``verbose``), third-party libraries at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("click4caption").setLevel(logging.DEBUG if verbose else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "transformers" not in sys.modules:
        # read by transformers / huggingface_hub when they are imported (importing them
        # here would slow down every early error message)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def pick_device(device: str | None, gpu_id: int | None = None) -> torch.device:
    """``--device`` wins; else ``cuda:<gpu-id>`` when CUDA is available; else CPU.

    Raises:
        Click4CaptionError: CUDA asked for but not available.
    """
    import torch

    if device is None:
        if torch.cuda.is_available():
            return torch.device(f"cuda:{gpu_id or 0}")
        return torch.device("cpu")
    if device == "cuda" and gpu_id is not None:
        device = f"cuda:{gpu_id}"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise Click4CaptionError(f"unknown device '{device}' (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Click4CaptionError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return dev


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_main(main: Callable[[], int | None]) -> None:
    """Run an app's ``main``: user errors become one line on stderr and exit 2."""
    try:
        code = main()
    except Click4CaptionError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
