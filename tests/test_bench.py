"""The benchmark runs end to end on a small folder and reports every figure (no timing asserted)."""

import json

from bench import __main__ as bench
from tests.conftest import image_bytes


def test_bench_without_the_service_reports_every_figure(tmp_path, tiny_checkpoint):
    faces = tmp_path / "faces"
    for label in ("female", "male"):
        (faces / label).mkdir(parents=True)
        for i in range(10):
            (faces / label / f"{i}.jpg").write_bytes(image_bytes(size=(60 + i, 80), colour=(20 * i, 90, 140)))
    out = tmp_path / "bench.json"
    argv = ["--data", str(faces), "--files", "20", "--checkpoint", str(tiny_checkpoint), "--no-service", "--json", str(out)]
    argv += ["--photos", "2"]
    assert bench.main(argv) == 0
    results = json.loads(out.read_text())
    assert results["files"] == 20
    keys = ("decode_ceiling", "decode_ceiling_no_detection", "forward_b1", "forward_b32", "forward_b256", "one_at_a_time")
    for key in (*keys, "once", "once_12mp_photos"):
        assert results[key] > 0, key
    assert results["once_vs_decode"] == results["once"] / results["decode_ceiling"]
