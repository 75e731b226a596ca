"""Shared fixtures: tiny random models written in the upstream checkpoint formats.

Everything runs on the CPU, offline, at tiny sizes (image 32, patch 8, a 2-layer LLaMA).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# offline and quiet, for this process and the apps the tests start
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


#: key name -> shape of every upstream checkpoint, regenerated from the original code (see the README there)
MANIFESTS_DIR = REPO_ROOT / "tests" / "checkpoint_manifests"


@pytest.fixture(scope="session")
def manifests_dir() -> Path:
    """The folder of the upstream checkpoint manifests (key name -> shape JSON files)."""
    assert MANIFESTS_DIR.is_dir(), f"{MANIFESTS_DIR} is part of the repository"
    return MANIFESTS_DIR


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random model saved as upstream saves it: ``eva_vit.pth`` (plain ViT state
    dict), ``click4caption.pth`` (``{'model': ...}`` in upstream names), an LLM folder
    (``llm``) and an eval YAML in the upstream layout (``yaml``)."""
    from tests.tiny import tiny_eval_yaml, write_upstream_checkpoints

    root = tmp_path_factory.mktemp("tiny_upstream")
    paths = write_upstream_checkpoints(root)
    paths["yaml"] = tiny_eval_yaml(root, paths)
    return paths


@pytest.fixture(scope="session")
def tiny_model(tiny_files: dict[str, Path]):
    """The tiny model built from ``tiny_files`` through the config and loaders, in eval
    mode. Shared: tests must not change its weights."""
    from click4caption.config import load_config
    from click4caption.models.builder import build_model

    model = build_model(load_config(tiny_files["yaml"]).model, device="cpu")
    model.eval()
    return model
