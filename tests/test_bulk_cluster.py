"""Bulk mode on a Ray cluster that was already running (`--address`): a one-node cluster started
with `ray start --head` for the test, with a token of its own, and stopped after it."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, image_bytes

if importlib.util.find_spec("ray") is None:
    pytest.skip("bulk mode needs the ray extra: pip install -e '.[ray]'", allow_module_level=True)

RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster():
    """The address of a running one-node cluster, and the environment that may join it."""
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_USAGE_STATS_ENABLED="0",
    )
    port, temp = free_port(), tempfile.mkdtemp(prefix="ray", dir="/tmp")
    start = [str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2"]
    start += ["--temp-dir", temp, "--include-dashboard", "false", "--object-store-memory", str(100 << 20)]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    yield f"127.0.0.1:{port}", env
    subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.slow
def test_a_run_on_an_existing_cluster_leaves_it_running(tmp_path, tiny_checkpoint, cluster):
    address, env = cluster
    source = tmp_path / "src"
    source.mkdir()
    for i in range(20):
        (source / f"{i}.jpg").write_bytes(image_bytes((40 + i, 50)))
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"checkpoint": str(tiny_checkpoint), "faces": {"no_face": "answer"}}))
    command = [sys.executable, "-m", "watcher.bulk", str(source), str(tmp_path / "out"), "--config", str(config)]
    proc = subprocess.run([*command, "--address", address], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert (summary["files"], summary["answered"]) == (20, 20)
    status = subprocess.run([str(RAY), "status", "--address", address], env=env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr  # the cluster outlives the run
