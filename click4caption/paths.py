"""Where things are: the project root, the shipped model, and paths written in configs."""
from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: the shipped shapes model (built by ``make shapes-model``, never downloaded)
SHIPPED_MODEL_DIR = "models/shapes"
#: its eval config, used by the apps when no ``--cfg-path`` is given
DEFAULT_EVAL_CONFIG = "eval_configs/shapes_eval.yaml"
#: the demo's example scenes
EXAMPLES_DIR = PROJECT_ROOT / "assets" / "examples"


def resolve_path(path: str | None) -> str | None:
    """A config path as given if it exists (relative to the working directory, as
    upstream), else relative to the project root when it exists there."""
    if not path:
        return None
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return str(p)
    alt = PROJECT_ROOT / p
    return str(alt) if alt.exists() else str(p)


def default_config_path() -> str:
    """The shipped model's eval config, found from any working directory."""
    local = Path(DEFAULT_EVAL_CONFIG)
    return str(local if local.exists() else PROJECT_ROOT / DEFAULT_EVAL_CONFIG)


def missing_file_hint(path: str | Path) -> str:
    """What to do about a model file that is not there."""
    if SHIPPED_MODEL_DIR in Path(path).as_posix():
        return "the shipped shapes model is rebuilt with `make shapes-model`"
    return "download it and put it there; see cached_model/README.md"
