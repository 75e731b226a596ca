"""Reading dataset files: storage checks, JSON, held-out ids, compact string tables,
and the log line of what an index left out."""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from click4caption.config import DatasetConfig
from click4caption.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


class StringTable:
    """Many strings stored as one UTF-8 buffer plus offsets: compact, fast to pickle
    to loader workers, and shared copy-on-write after ``fork``."""

    def __init__(self, strings: Iterable[str]) -> None:
        encoded = [s.encode("utf-8") for s in strings]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        if encoded:
            np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self._blob[self._offsets[i]:self._offsets[i + 1]].tobytes().decode("utf-8")


def load_held_out_ids(cfg: DatasetConfig, name: str) -> frozenset[str]:
    """``held_out_ids`` plus the ids in ``held_out_ids_file`` (a JSON list, or one id
    per line with ``#`` comments), all as strings.

    Raises:
        ConfigError: the file is missing or unreadable.
    """
    ids = {str(i).strip() for i in cfg.held_out_ids}
    if cfg.held_out_ids_file:
        path = Path(cfg.held_out_ids_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"datasets.{name}.held_out_ids_file not found: {path}")
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            try:
                ids |= {str(i).strip() for i in json.loads(text)}
            except json.JSONDecodeError as err:
                raise ConfigError(f"datasets.{name}.held_out_ids_file {path}: bad JSON ({err})") from None
        else:
            for line in text.splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    ids.add(line)
    ids.discard("")
    return frozenset(ids)


def check_storage(path: str | None, name: str, what: str) -> Path:
    """``build_info.storage`` as an existing path.

    Raises:
        ConfigError: unset; DataError: missing.
    """
    if not path:
        raise ConfigError(f"datasets.{name}.build_info.storage is not set ({what})")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"datasets.{name}: storage not found: {p} ({what})")
    return p


def read_json(path: Path, name: str) -> Any:
    """Parse a JSON annotation file.

    Raises:
        DataError: missing or not JSON.
    """
    if not path.is_file():
        raise DataError(f"datasets.{name}: annotation file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"datasets.{name}: cannot read {path}: {str(err).splitlines()[0]}") from None


def parse_xywh(raw: Any) -> tuple[float, float, float, float] | None:
    """``[x, y, w, h]`` of finite numbers with positive size, else None."""
    try:
        x, y, w, h = (float(v) for v in raw)
    except (TypeError, ValueError):
        return None
    if not all(np.isfinite((x, y, w, h))) or w <= 0 or h <= 0:
        return None
    return x, y, w, h


def log_filtered(name: str, kept: int, total: int, what: str, reasons: Counter) -> None:
    """One log line about what an index build left out."""
    if reasons:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
        logger.info("%s: kept %d of %d %s (left out: %s)", name, kept, total, what, detail)
    else:
        logger.info("%s: kept all %d %s", name, total, what)
