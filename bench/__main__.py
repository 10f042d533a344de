"""python -m bench: how fast each stage is, on a folder of real faces.

Reports, in one run on this machine:
  1. decode ceilings on all cores (one process per core), no model: read + decode + face
     detection and alignment, and the same without detection (decode + resize to the chip)
  2. model throughput on real faces at batch sizes 1, 32 and 256 (as served: mirror images too
     where the answer is close)
  3. one image at a time, no batching (open, resize, one forward pass per file)
  4. --once end to end (files on disk to results file written), and its ratios to 1 and 3; --once
     on generated 12-megapixel JPEG photos with one face each
  5. the service: arrival-to-durable latency p50/p99 at a steady rate, and the highest rate it
     sustains without a growing backlog; the latency of the first file after idling
  6. the idle service: resident memory and CPU use, once its decode processes have stopped, and
     its memory before that
  7. with --bulk (the ray extra): python -m watcher.bulk on the same files with 1 and 2 workers:
     images/s after start-up and its ratio to --once, start-up time, and peak resident memory of
     the whole process tree (Ray's own processes included, the object store capped)
Prints a table and writes JSON (--json) so runs can be compared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import suppress
from pathlib import Path

import torch
from PIL import Image

import model
from bench.harness import ROOT, ServiceProcess, child_pids, cpu_ticks, decode_worker_pids, descendant_pids
from model import checkpoint as ckpt
from model.decode import ImageError, decode_faces, decode_picture, read_image_bytes
from model.faces import FaceRules, Preprocessing
from model.inference import mirror_averaged_logits, model_input
from model.pool import DecodePool, usable_cpus
from model.preprocess import to_batch
from train.photos import compose
from watcher import config as configuration
from watcher import log
from watcher.once import candidate_files, classify_folder

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "faces"


def sample_files(folder: Path, count: int) -> list[Path]:
    """Every n-th image of folder (or of its class sub-folders), `count` in all."""
    files = sorted(
        p for sub in [folder, *sorted(d for d in folder.iterdir() if d.is_dir())] for p in candidate_files(sub) if p.is_file()
    )
    step = max(1, len(files) // count)
    return files[::step][:count]


def _decode_chunk(args: tuple[list[str], Preprocessing, bool]) -> int:
    paths, prep, detect = args
    for path in paths:
        data = read_image_bytes(path)
        if detect:
            with suppress(ImageError):  # no face found: the work was done all the same
                decode_faces(data, prep)
        else:
            pixels, _ = decode_picture(data, max(prep.chip.height, prep.chip.width))
            Image.fromarray(pixels).resize((prep.chip.width, prep.chip.height), Image.Resampling.BILINEAR)
    return len(paths)


def decode_ceiling(files: list[Path], prep: Preprocessing, workers: int, detect: bool = True) -> float:
    chunks = [([str(p) for p in files[i::workers]], prep, detect) for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        pool.submit(int).result()  # start the workers before the clock
        start = time.perf_counter()
        done = sum(pool.map(_decode_chunk, chunks))
    return done / (time.perf_counter() - start)


@torch.inference_mode()
def forward_throughput(checkpoint: ckpt.Checkpoint, faces: torch.Tensor, batch_size: int, seconds: float = 2.0) -> float:
    """Images/s through the model as served, over batches of real faces (uint8 NCHW): how many go
    through a second time as mirror images depends on the faces."""
    batches = [model_input(checkpoint, faces[i : i + batch_size]) for i in range(0, len(faces) - batch_size + 1, batch_size)]
    mirror_averaged_logits(checkpoint.model, batches[0])
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x = batches[(count // batch_size) % len(batches)]
        mirror_averaged_logits(checkpoint.model, x)
        count += batch_size
    return count / (time.perf_counter() - start)


@torch.inference_mode()
def one_at_a_time(files: list[Path], checkpoint: ckpt.Checkpoint) -> float:
    """One image at a time, no batching: open, resize, one forward pass per file (the same model, precision
    and mirror averaging as served), with torch on all cores as a plain script runs it."""
    spec, threads = checkpoint.spec, torch.get_num_threads()
    torch.set_num_threads(usable_cpus())
    start = time.perf_counter()
    for path in files:
        img = Image.open(path).convert("RGB").resize((spec.width, spec.height))
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(spec.height, spec.width, 3).permute(2, 0, 1)
        mirror_averaged_logits(checkpoint.model, model_input(checkpoint, x.unsqueeze(0)))
    rate = len(files) / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    return rate


def once_end_to_end(files: list[Path], config: configuration.Config, workdir: Path) -> float:
    """Checkpoint load to results written, with the decode workers already started."""
    folder = workdir / "once"
    folder.mkdir()
    for path in files:
        shutil.copy(path, folder / path.name)
    with DecodePool(config.batch.decode_processes) as pool:
        start = time.perf_counter()
        classify_folder(folder, workdir / "once.json", config, pool)
        return len(files) / (time.perf_counter() - start)


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, summed (shared pages counted in each)."""
    total = 0
    for current in [pid, *descendant_pids(pid)]:
        with suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{current}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total / 2**20


def bulk_run(folder: Path, checkpoint: Path, workdir: Path, workers: int) -> dict:
    """python -m watcher.bulk over `folder`: its _SUCCESS figures and the peak memory of its process tree."""
    out = workdir / f"bulk-{workers}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_TMPDIR=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    command = [
        sys.executable,
        "-m",
        "watcher.bulk",
        str(folder),
        str(out),
        "--checkpoint",
        str(checkpoint),
        "--workers",
        str(workers),
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_rss_mb(proc.pid))
        time.sleep(0.25)
    stderr = proc.stderr.read() if proc.stderr else ""
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"python -m watcher.bulk exited with {proc.returncode}: {stderr[-2000:]}")
    run = json.loads((out / "_SUCCESS").read_text())["runs"][0]
    return {
        "workers": workers,
        "files_per_second": run["files_per_second"],
        "startup_seconds": run["startup_seconds"],
        "command_seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(peak),
    }


def make_photos(folder: Path, faces: list[Path], count: int, size: tuple[int, int] = (4000, 3000)) -> list[Path]:
    """`count` JPEG photos of `size` (12 megapixels by default), each with one face (train.photos.compose)."""
    rng = random.Random(0)
    folder.mkdir()
    paths = []
    for i in range(count):
        photo, _ = compose([Image.open(faces[i % len(faces)])], rng, size)
        paths.append(folder / f"photo{i:03d}.jpg")
        photo.save(paths[-1], quality=90)
    return paths


def once_on_photos(files: list[Path], config: configuration.Config, workdir: Path, count: int = 60) -> float:
    """--once images/s over generated 12-megapixel photos with one face each."""
    photos = make_photos(workdir / "photos", files, count)
    with DecodePool(config.batch.decode_processes) as pool:
        start = time.perf_counter()
        classify_folder(photos[0].parent, workdir / "photos.json", config, pool)
        return len(photos) / (time.perf_counter() - start)


# The service under test stops its decode processes after this many idle seconds (the default
# is 60), so that the idle memory is measured without them in seconds, not minutes.
DECODE_IDLE_SECONDS = 3.0


class _ServiceRun:
    """The real service (bench.harness.ServiceProcess) on temporary folders. Arrival: a rename
    into the inbox. Durable: the file's line in the journal (written and fsynced before the file
    moves), read by a thread that polls the journal every 2 ms: far less CPU, taken from the
    service under test, than watching done/."""

    def __init__(self, workdir: Path, checkpoint_path: Path) -> None:
        root = workdir / "service"
        root.mkdir()
        self.service = ServiceProcess(
            root,
            checkpoint_path,
            logging={"format": "json", "level": "warning"},
            faces={},  # as configured by default: pictures without a face fail
            batch={"decode_idle_seconds": DECODE_IDLE_SECONDS},
        ).start()
        self.proc = self.service.proc
        self.staging = workdir / "staging"
        self.staging.mkdir()
        self._seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._tail = threading.Thread(target=self._read_journal, args=(self.service.journal,), daemon=True)
        self._tail.start()

    def _read_journal(self, journal: Path) -> None:
        """Stamp each new journal line's key; follow the journal across rotations (renamed aside,
        so the open file holds the rest of the old one)."""
        handle, pending = open(journal, "rb"), b""  # noqa: SIM115 (followed across rotations)
        while not self._stop.wait(0.002):
            data = handle.read()
            try:
                rotated = os.stat(journal).st_ino != os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:  # renamed aside, the new one not yet created
                rotated = False
            if rotated:
                data += handle.read()
                handle.close()
                handle = open(journal, "rb")  # noqa: SIM115
            now = time.perf_counter()
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                if line.strip():
                    self._seen.setdefault(json.loads(line)["key"], now)
        handle.close()

    def feed(self, files: list[Path], rate: float, prefix: str) -> dict[str, float]:
        """Rename copies of files into the inbox at `rate` per second; return name -> arrival time."""
        arrivals = {}
        for i, path in enumerate(files):
            name = f"{prefix}{i:06d}.jpg"
            shutil.copy(path, self.staging / name)
        start = time.perf_counter()
        for i in range(len(files)):
            name = f"{prefix}{i:06d}.jpg"
            target = start + i / rate
            while (now := time.perf_counter()) < target:
                time.sleep(min(target - now, 0.002))
            os.rename(self.staging / name, self.service.inbox / name)
            arrivals[name] = time.perf_counter()
        return arrivals

    def wait(self, names, timeout: float) -> bool:
        deadline, missing = time.perf_counter() + timeout, list(names)
        while time.perf_counter() < deadline:
            missing = [n for n in missing if n not in self._seen]
            if not missing:
                return True
            time.sleep(0.01)
        return False

    def latencies(self, arrivals: dict[str, float]) -> list[float]:
        return sorted(self._seen[n] - t for n, t in arrivals.items() if n in self._seen)

    def idle_usage(self, seconds: float) -> tuple[float, float, float]:
        """(resident MB of the service and its helper processes, of the service alone, CPU % of one
        core for all of them) over `seconds` of idling."""
        pids = [self.proc.pid, *child_pids(self.proc.pid)]

        def ticks_now() -> dict[int, int]:  # utime + stime of each process still there
            ticks = {}
            for pid in pids:
                with suppress(OSError):
                    ticks[pid] = cpu_ticks(pid)
            return ticks

        before, start = ticks_now(), time.perf_counter()
        time.sleep(seconds)
        after = ticks_now()
        used = sum(after[pid] - before[pid] for pid in after.keys() & before.keys()) / os.sysconf("SC_CLK_TCK")
        rss = {}
        for pid in pids:
            with suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text().splitlines()
                rss[pid] = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        return sum(rss.values()) / 1024, rss[self.proc.pid] / 1024, 100 * used / (time.perf_counter() - start)

    def close(self) -> None:
        with suppress(subprocess.TimeoutExpired):  # then killed
            self.service.stop()
        self.service.close()
        self._stop.set()
        self._tail.join()


def cycle(files: list[Path], count: int) -> list[Path]:
    """`count` files, going round `files` again where it has fewer (each arrives under its own name)."""
    return [files[i % len(files)] for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def bench_service(files: list[Path], checkpoint_path: Path, workdir: Path, steady_rate: float, once_rate: float) -> dict:
    run = _ServiceRun(workdir, checkpoint_path)
    try:
        out = {"idle_rss_workers_up_mb": round(run.idle_usage(1.0)[0], 1)}
        deadline = time.monotonic() + DECODE_IDLE_SECONDS + 10
        while decode_worker_pids(run.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        rss, main_rss, cpu = run.idle_usage(10.0)
        out["idle_rss_mb"], out["idle_rss_main_mb"], out["idle_cpu_percent"] = round(rss, 1), round(main_rss, 1), round(cpu, 2)
        arrivals = run.feed(files[:1], 1.0, "wake")  # the first file after idling starts the decode processes
        run.wait(arrivals, 30)
        out["wake_latency_ms"] = round(1000 * percentile(run.latencies(arrivals), 0.5), 1)
        steady = cycle(files, int(steady_rate * 10))  # 10 s at the steady rate
        arrivals = run.feed(steady, steady_rate, "steady")
        run.wait(arrivals, 30)
        lat = run.latencies(arrivals)
        out["steady_rate"] = steady_rate
        out["latency_p50_ms"] = round(1000 * percentile(lat, 0.5), 1)
        out["latency_p99_ms"] = round(1000 * percentile(lat, 0.99), 1)
        out["steady_completed"] = f"{len(lat)}/{len(arrivals)}"
        sustained = 0.0
        for fraction in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2):
            rate = round(once_rate * fraction)
            burst = cycle(files, int(rate * 5))  # 5 s at this rate
            arrivals = run.feed(burst, rate, f"r{rate}_")
            # no growing backlog: everything done within 1 s of the last arrival
            if not run.wait(arrivals, 1.0 + len(burst) / rate - (time.perf_counter() - min(arrivals.values()))):
                run.wait(arrivals, 60)
                break
            sustained = rate
        out["sustained_rate"] = sustained
        return out
    finally:
        run.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of face images (default: %(default)s)")
    p.add_argument("--files", type=int, default=4000, help="how many images to use")
    p.add_argument("--checkpoint", type=Path, default=model.DEFAULT_CHECKPOINT)
    p.add_argument("--steady-rate", type=float, default=100.0, help="arrival rate for the latency measurement, per second")
    p.add_argument("--photos", type=int, default=60, help="generated 12-megapixel photos for the --once photo rate")
    p.add_argument("--no-service", action="store_true", help="skip the service measurements")
    p.add_argument("--bulk", action="store_true", help="also measure python -m watcher.bulk (needs the ray extra)")
    p.add_argument("--json", type=Path, default=Path("bench.json"))
    args = p.parse_args(argv)
    log.setup("warning", "json")
    if not args.data.is_dir():
        print(f"error: {args.data} is not a folder", file=sys.stderr)
        return 2
    files = sample_files(args.data, args.files)
    for path in files:
        path.read_bytes()  # into the page cache, so every measurement reads from memory alike
    config = configuration.load(None)
    config = dataclasses.replace(config, checkpoint=args.checkpoint.resolve())
    checkpoint = ckpt.load(args.checkpoint, config.batch.precision)
    torch.set_num_threads(config.batch.torch_threads)
    cores = usable_cpus()
    results: dict = {"files": len(files), "data": str(args.data), "cores": cores, "checkpoint": checkpoint.version}
    results["bfloat16"] = checkpoint.dtype == torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        prep = checkpoint.preprocessing(config.faces)
        results["decode_ceiling"] = decode_ceiling(files, prep, cores)
        results["decode_ceiling_no_detection"] = decode_ceiling(files, prep, cores, detect=False)
        spread = cycle(files[:: max(1, len(files) // 256)], 256)  # from every folder of the sample
        every_picture = Preprocessing(prep.chip, prep.detector, FaceRules(no_face="answer"))
        faces = to_batch([decode_faces(read_image_bytes(p), every_picture)[0].chip for p in spread])
        for bs in (1, 32, 256):
            results[f"forward_b{bs}"] = forward_throughput(checkpoint, faces, bs)
        results["one_at_a_time"] = one_at_a_time(files[:500], checkpoint)
        results["once"] = once_end_to_end(files, config, workdir)
        results["once_vs_decode"] = results["once"] / results["decode_ceiling"]
        results["once_vs_one_at_a_time"] = results["once"] / results["one_at_a_time"]
        results["once_vs_no_detection_ceiling"] = results["once"] / results["decode_ceiling_no_detection"]
        results["once_12mp_photos"] = once_on_photos(files, config, workdir, args.photos)
        if args.bulk:
            results["bulk"] = [bulk_run(workdir / "once", args.checkpoint.resolve(), workdir, w) for w in (1, 2)]
        if not args.no_service:
            results["service"] = bench_service(files, args.checkpoint.resolve(), workdir, args.steady_rate, results["once"])
    rows = [
        ("decode + detection ceiling (all cores, no model)", f"{results['decode_ceiling']:.0f} img/s"),
        ("decode ceiling without detection", f"{results['decode_ceiling_no_detection']:.0f} img/s"),
        *[(f"model as served, batch {bs}", f"{results[f'forward_b{bs}']:.0f} img/s") for bs in (1, 32, 256)],
        ("one image at a time (no batching)", f"{results['one_at_a_time']:.0f} img/s"),
        ("--once end to end", f"{results['once']:.0f} img/s"),
        ("--once / decode ceiling", f"{results['once_vs_decode']:.0%}"),
        ("--once / one at a time", f"{results['once_vs_one_at_a_time']:.2f}x"),
        ("--once / decode ceiling without detection", f"{results['once_vs_no_detection_ceiling']:.0%}"),
        ("--once on 12-megapixel photos, one face each", f"{results['once_12mp_photos']:.1f} img/s"),
    ]
    if "service" in results:
        s = results["service"]
        rows += [
            (f"service latency at {s['steady_rate']:.0f}/s, p50 / p99", f"{s['latency_p50_ms']} / {s['latency_p99_ms']} ms"),
            ("service latency of the first file after idling", f"{s['wake_latency_ms']} ms"),
            ("service sustained rate (no growing backlog)", f"{s['sustained_rate']:.0f} img/s"),
            ("idle service resident memory, all / main process", f"{s['idle_rss_mb']:.0f} / {s['idle_rss_main_mb']:.0f} MB"),
            ("  the same before its decode processes stop, all", f"{s['idle_rss_workers_up_mb']:.0f} MB"),
            ("idle service CPU", f"{s['idle_cpu_percent']:.2f}% of a core"),
        ]
    for run in results.get("bulk", []):
        rows += [
            (f"bulk, {run['workers']} worker(s), after start-up", f"{run['files_per_second']:.0f} img/s"),
            ("  / --once", f"{run['files_per_second'] / results['once']:.0%}"),
            ("  start-up (Ray, actors, model) / whole command", f"{run['startup_seconds']:.1f} / {run['command_seconds']:.1f} s"),
            ("  peak resident memory, whole process tree", f"{run['peak_rss_mb']} MB"),
        ]
    if len(results.get("bulk", [])) == 2:
        one, two = results["bulk"]
        rows.append(("bulk, 2 workers / 1 worker", f"{two['files_per_second'] / one['files_per_second']:.2f}x"))
    width = max(len(r[0]) for r in rows)
    print(f"gender-watcher bench: {len(files)} files from {args.data}, {cores} cores, checkpoint {checkpoint.version}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so the service under test is stopped and the temp files removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    sys.exit(main())
