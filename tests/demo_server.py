"""``demo.py`` running in a subprocess, for the tests that talk to it over HTTP (the
browser tests and the API tests): one server per test session, whichever module asks.

Model: ``C4C_DEMO_CFG`` (an eval YAML) or, unset, the shipped shapes model
(``default_config_path()``). ``C4C_DEMO_CFG=tiny``, or an unset variable while the shipped
model is not there, runs a tiny random-weight model: every check runs, except those
about what the answers say, which need the trained shapes model.

Import the fixtures into a test module: ``from tests.demo_server import demo_cfg, server``.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from click4caption.paths import default_config_path

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120


@pytest.fixture(scope="session")
def demo_cfg(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bool]:
    """``(config path, is the shipped model)``."""
    shipped = Path(default_config_path()).resolve()
    env = os.environ.get("C4C_DEMO_CFG", "").strip()
    if env and env != "tiny":
        if not Path(env).is_file():
            pytest.fail(f"C4C_DEMO_CFG={env}: no such file")
        return env, Path(env).resolve() == shipped
    if not env and shipped.is_file():
        return str(shipped), True
    from tests.tiny import tiny_eval_yaml, write_upstream_checkpoints

    root = tmp_path_factory.mktemp("demo_tiny")
    return str(tiny_eval_yaml(root, write_upstream_checkpoints(root))), False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(demo_cfg: tuple[str, bool], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``demo.py --server_port <free port>`` running; yields its URL. Its log must hold
    no traceback when it stops: errors reach users and clients as one line."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("demo_server") / "demo.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "demo.py"), "--cfg-path", demo_cfg[0],
                                 "--server_port", str(port)], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"demo.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"demo.py did not answer within {START_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log_text = log_path.read_text()
    assert "Traceback" not in log_text, log_text[-3000:]
