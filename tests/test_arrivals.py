"""Partial and odd arrivals through the running service."""

import hashlib
import io
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from bench.harness import ServiceProcess, drop
from tests.conftest import image_bytes


@pytest.fixture
def service(tmp_path, tiny_checkpoint):
    svc = ServiceProcess(tmp_path, tiny_checkpoint, intake={"settle_seconds": 0.5})
    yield svc
    svc.close()


def sources(svc):
    return sorted(r["source"].rsplit("/", 1)[1] for r in svc.journal_records())


def test_cp_of_a_large_file_and_renames_from_outside(service, tmp_path):
    service.start()
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 255, (2500, 2500, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, "JPEG", quality=95)
    large = tmp_path / "large.jpg"
    large.write_bytes(buf.getvalue())
    assert large.stat().st_size > 4_000_000
    subprocess.run(["cp", str(large), str(service.inbox / "copied.jpg")], check=True)
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(image_bytes())
    os.rename(outside, service.inbox / "renamed-in.jpg")
    (service.inbox / "upload.part").write_bytes(image_bytes())
    os.rename(service.inbox / "upload.part", service.inbox / "upload.jpg")
    service.wait_handled(3)
    records = {r["source"].rsplit("/", 1)[1]: r for r in service.journal_records()}
    assert all(r["status"] == "done" for r in records.values())
    assert records["copied.jpg"]["sha256"] == hashlib.sha256(large.read_bytes()).hexdigest()
    assert service.stop() == 0


def test_burst_of_5000(service):
    service.start()
    names = [f"b{i:05d}.jpg" for i in range(5000)]
    data = image_bytes()
    for name in names:
        (service.inbox / name).write_bytes(data)
    service.wait_handled(len(names), timeout=300)
    assert service.stop() == 0
    assert sources(service) == names and sorted(os.listdir(service.done)) == names


def test_lost_events_are_recovered_by_the_rescan(tmp_path, tiny_checkpoint):
    svc = ServiceProcess(tmp_path, tiny_checkpoint, intake={"watch": False, "rescan_seconds": 0.5, "settle_seconds": 0.3})
    try:
        svc.start()
        names = [drop(svc.inbox, f"quiet{i}.jpg", image_bytes()).name for i in range(20)]
        svc.wait_handled(20, timeout=30)
        assert sources(svc) == sorted(names)
        assert svc.stop() == 0
    finally:
        svc.close()
