"""The unit file under a real systemd (shared/tools/systemd-box): readiness, hardening, reload, stop."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SHARED_DATA, image_bytes, make_tiny_checkpoint

BOX = ROOT.parent / "shared" / "tools" / "systemd-box"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not BOX.exists(), reason=f"{BOX} not found"),
    pytest.mark.skipif(os.geteuid() != 0, reason="systemd-box needs root"),
    pytest.mark.skipif(not shutil.which("apt-get") and not shutil.which("systemd-nspawn"), reason="no systemd-nspawn"),
]


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    out = tmp_path_factory.mktemp("box")  # /box/out inside
    first, second = make_tiny_checkpoint(out / "first.pt", seed=1), make_tiny_checkpoint(out / "second.pt", seed=2)
    face = next(iter(sorted((SHARED_DATA / "other" / "portraits").rglob("*.jpg"))), None)
    (out / "face.jpg").write_bytes(face.read_bytes() if face else image_bytes())
    script = (ROOT / "tests" / "systemd_box_script.sh").read_text()
    script = script.replace("@ROOT@", str(ROOT)).replace("@PYBASE@", sys.base_prefix)
    (out / "script.sh").write_text(script)
    (out / "script.sh").chmod(0o755)
    cmd = [str(BOX), "--bind-ro", str(ROOT), "--bind-ro", f"{ROOT}:/opt/gender-watcher", "--bind-ro", sys.base_prefix]
    proc = subprocess.run([*cmd, "--out", str(out), str(out / "script.sh")], capture_output=True, text=True, timeout=900)
    checks = dict(re.findall(r"^CHECK (\w+)=(.*)$", proc.stdout, re.M))
    journal = [json.loads(line[8:]) for line in proc.stdout.splitlines() if line.startswith("JOURNAL {")]
    return {
        "checks": checks,
        "journal": journal,
        "first": first,
        "second": second,
        "output": proc.stdout + proc.stderr,
        "real_face": face is not None,
    }


def test_starts_with_notify_readiness(box):
    assert box["checks"].get("start") == "ok", box["output"][-3000:]
    assert box["checks"]["active"] == "active"
    assert box["first"] in box["checks"]["status_text"]


def test_hardening_score(box):
    assert float(box["checks"]["security_score"]) <= 2.5


def test_classifies_under_hardening(box):
    if not box["real_face"]:
        pytest.skip(f"no face photo to drop: shared data not found at {SHARED_DATA}")
    assert box["checks"]["done"].split() == ["face.jpg"]
    assert set(json.loads(box["checks"]["results"])) == {"face.jpg"}


def test_reload_and_watchdog(box):
    assert box["checks"]["reload"] == "ok"  # systemctl reload -> SIGHUP
    assert {e["reason"] for e in box["journal"] if e["event"] == "reload_start"} == {"SIGHUP", "changed"}
    reloads = [(e["old"], e["new"]) for e in box["journal"] if e["event"] == "reload"]
    assert reloads == [(box["first"], box["first"]), (box["first"], box["second"])]
    assert int(box["checks"]["watchdog_ts"]) > 0


def test_clean_stop(box):
    assert box["checks"]["after_stop"] == "inactive result=success status=0"
    assert box["journal"][-1]["event"] == "stop"


def test_decode_processes_are_memory_limited_and_the_inbox_locked(box):
    events = {e["event"] for e in box["journal"]}
    assert "decode_memory_not_limited" not in events and "inbox_lock_not_taken" not in events
