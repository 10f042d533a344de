"""python -m train --data DIR --out FILE: train the network and write a checkpoint and its report.

DIR holds one folder per class (female/, male/). Each image is decoded once, its main face found
and aligned into a chip with the serving preprocessing, into memory; every epoch draws the cached
chips so that no source or group dominates, and augments them afresh. The epoch with the lowest
validation loss is kept, its decision threshold set on the validation split weighted as the
epochs are drawn, evaluated on the held-out test split (overall, per file-name source and group)
and on any --dev folders with the serving preprocessing, and saved atomically with a report beside it.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from model import PRECISIONS
from model import checkpoint as ckpt
from model.faces import NO_FACE, ChipSpec, DetectorSpec, FaceRules, Preprocessing
from model.inference import mirror_averaged_logits
from model.network import GenderNet
from model.pool import usable_cpus
from model.precision import autocast, uses_bfloat16
from model.preprocess import InputSpec, normalize
from model.progress import Progress
from train import DefaultsHelp
from train.augment import augment
from train.data import (
    SOURCE_EXPONENT,
    TRAINING_RULES,
    Dataset,
    TrainingError,
    find_labeled_images,
    groups_of,
    load_dataset,
    sampling_weights,
    source_of,
    split,
    summarize_file_groups,
)
from train.metrics import equal_recall_threshold, format_summary, summarize, summarize_groups
from train.report import write_report

CLASS_NAMES = ["female", "male"]


@dataclass
class DevSet:
    """A --dev folder with its faces cut once with the serving preprocessing; a picture without a
    face is an answer missed, and counts as wrong. A file that cannot be read is left out."""

    name: str
    label_of: dict[Path, int]
    faces: Dataset
    no_face: list[Path]  # the pictures in which no face was found
    unreadable: list[str]

    @classmethod
    def load(cls, folder: Path, serving: Preprocessing) -> DevSet:
        labeled = find_labeled_images(folder, CLASS_NAMES)
        faces, skipped = load_dataset(labeled, serving)
        no_face = [p for p, r in skipped if r == NO_FACE]
        return cls(folder.name, dict(labeled), faces, no_face, [f"{p}: {r}" for p, r in skipped if r != NO_FACE])

    def score(self, model: torch.nn.Module, spec: InputSpec, precision: str) -> tuple[dict, dict]:
        """Accuracy overall and per class, and by group where the file names tell one."""
        predicted = evaluate(model, self.faces, spec, precision)[1]
        unanswered = [self.label_of[p] for p in self.no_face]
        summary = summarize(self.faces.labels.tolist(), predicted, CLASS_NAMES, unanswered)
        answers = dict(zip(self.faces.paths, predicted, strict=True)) | dict.fromkeys(self.no_face)
        groups = summarize_file_groups(answers, self.label_of, CLASS_NAMES)
        return summary | {"unreadable": self.unreadable}, groups


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description=__doc__.splitlines()[0],
        formatter_class=DefaultsHelp,
        epilog="example (the shipped checkpoint's command is in model/gender-watcher-report/summary.md):\n"
        "  python -m train --data ../shared/data/faces --out model/gender-watcher.pt --dev ../shared/data/other/lfw\n"
        "exit status: 0 written; 1 data that cannot be trained on (said in one line); 2 usage error",
    )
    p.add_argument("--data", required=True, type=Path, help="folder with female/ and male/")
    p.add_argument("--out", required=True, type=Path, help="checkpoint file to write")
    p.add_argument(
        "--dev", type=Path, action="append", default=[], help="labeled folder to evaluate on after training (repeatable)"
    )
    p.add_argument("--epochs", type=int, default=30, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=128, help="images per optimizer step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--size", type=int, nargs=2, default=(64, 64), metavar=("H", "W"), help="model input size")
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256], help="channels of each network stage")
    p.add_argument("--stem-width", type=int, default=32, help="channels of the first convolution")
    p.add_argument("--augment", type=float, default=1.0, help="augmentation strength: 0 only mirror flips, 1 default")
    p.add_argument(
        "--init",
        type=Path,
        metavar="CHECKPOINT",
        help="start from this checkpoint's weights (same architecture) instead of random ones: a shorter run then suffices",
    )
    p.add_argument(
        "--source-exponent",
        type=float,
        default=SOURCE_EXPONENT,
        help="each source's share of an epoch goes with its size to this power (0: equal shares, 1: as in the data)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the sampling and the augmentation")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share held out to choose the epoch and threshold")
    p.add_argument("--test-fraction", type=float, default=0.10, help="share held out for the test figures")
    p.add_argument("--limit", type=int, default=0, help="use at most this many images per class (0: all); for smoke runs")
    p.add_argument("--threads", type=int, default=usable_cpus(), help="torch threads")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="forward-pass precision (auto: bfloat16 where fast)")
    p.add_argument("--device", default="cpu", help="torch device for training, e.g. cuda (the checkpoint is saved for the CPU)")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.limit < 0:
        p.error("--limit must be 0 (all images) or more")
    if args.threads > 1024:
        p.error("--threads must be at most 1024")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a number above 0, not {args.lr}")
    for name, least in (("weight_decay", 0.0), ("augment", 0.0), ("source_exponent", -math.inf)):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= least):
            at_least = " of 0 or more" if least == 0 else ""
            p.error(f"--{name.replace('_', '-')} must be a finite number{at_least}, not {value}")
    if min(args.stem_width, *args.widths) < 1:
        p.error("--stem-width and --widths must each be at least 1")
    # The stem halves the input and each stage after the first halves it again.
    smallest = 2 ** len(args.widths)
    if not all(max(smallest, ckpt.MIN_SIDE) <= side <= ckpt.MAX_SIDE for side in args.size):
        p.error(f"--size: each side must be from {max(smallest, ckpt.MIN_SIDE)} to {ckpt.MAX_SIDE} for {len(args.widths)} stages")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        p.error(f"--device {args.device}: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here")
    if not (args.val_fraction > 0 and args.test_fraction > 0 and args.val_fraction + args.test_fraction < 1):
        p.error("--val-fraction and --test-fraction must each be above 0, and together below 1")
    names = [folder.name for folder in args.dev]
    if len(set(names)) != len(names):
        p.error(f"--dev folders are reported by name, and these repeat one: {', '.join(map(str, args.dev))}")
    # Checked now, not after half an hour of training: the folders to evaluate, and where to write.
    for folder in args.dev:
        try:
            find_labeled_images(folder, CLASS_NAMES)
        except TrainingError as exc:
            p.error(f"--dev {folder}: {exc}")
    if args.out.is_dir():
        p.error(f"--out {args.out} is a folder; give the checkpoint's file name")
    report = report_folder(args.out)
    if report.exists() and not report.is_dir():
        p.error(f"--out {args.out}: its report folder {report} is a file")
    if args.init is not None:
        try:
            args.init_payload = initial_weights(args.init, {"stem_width": args.stem_width, "widths": list(args.widths)})
        except ckpt.CheckpointError as exc:
            p.error(f"--init: {exc}")
    out_folder = next((f for f in args.out.absolute().parents if f.exists()), None)
    if out_folder is None or not out_folder.is_dir() or not os.access(out_folder, os.W_OK | os.X_OK):
        p.error(f"--out {args.out}: cannot create it ({out_folder} is not a writable folder)")
    return args


def report_folder(out: Path) -> Path:
    """Where the report of the checkpoint `out` goes: beside it, named after it."""
    return out.with_name(out.stem + "-report")


INIT_KEYS = ("version", "arch", "arch_args", "class_names", "state_dict")


def initial_weights(path: Path, arch_args: dict) -> dict:
    """The version and weights of a checkpoint to start from, of any format version (only its
    weights are used, not its preprocessing): read as safely as model.checkpoint.load reads one,
    for CLASS_NAMES in that order, and fitting GenderNet with `arch_args`. Raise CheckpointError
    naming the file and what is wrong."""
    payload = ckpt.read_payload(path)
    try:
        if not isinstance(payload, dict):
            raise ckpt.CheckpointError(f"expected a dict, found {type(payload).__name__}")
        missing = [k for k in INIT_KEYS if k not in payload]
        if missing:
            raise ckpt.CheckpointError(f"missing keys {missing}")
        if payload["class_names"] != CLASS_NAMES:
            raise ckpt.CheckpointError(f"its classes are {payload['class_names']!r}, not {CLASS_NAMES}")
        if payload["arch"] != GenderNet.__name__ or payload["arch_args"] != arch_args:
            raise ckpt.CheckpointError(f"it is {payload['arch']} {payload['arch_args']}, not GenderNet {arch_args}")
        with torch.device("meta"):  # only the sizes, to compare
            expected = GenderNet(**arch_args, num_classes=len(CLASS_NAMES)).state_dict()
        ckpt.check_weights(payload["state_dict"], expected, GenderNet.__name__)
        broken = [k for k, v in payload["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if broken:
            raise ckpt.CheckpointError(f"weights that are not finite numbers: {', '.join(broken)}")
    except ckpt.CheckpointError as exc:
        raise ckpt.CheckpointError(f"checkpoint {path}: cannot start from it: {exc}") from None
    return {"version": str(payload["version"]), "state_dict": payload["state_dict"]}


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def logits_of(model: torch.nn.Module, data: Dataset, spec: InputSpec, precision: str, batch_size: int = 512) -> torch.Tensor:
    """The model's logits for every image, with the serving preprocessing and mirror averaging."""
    model.eval()
    chunks = [torch.empty(0, len(CLASS_NAMES))]
    for start in range(0, len(data.labels), batch_size):
        x = normalize(data.images[start : start + batch_size], spec).to(_device(model))
        with autocast(precision, _device(model).type):
            chunks.append(mirror_averaged_logits(model, x).cpu())
    return torch.cat(chunks)


def evaluate(model: torch.nn.Module, data: Dataset, spec: InputSpec, precision: str) -> tuple[float, list[int]]:
    """Mean cross-entropy and predicted classes."""
    logits = logits_of(model, data, spec, precision)
    return float(F.cross_entropy(logits, data.labels)) if len(logits) else 0.0, logits.argmax(1).tolist()


def balance_recall(model: GenderNet, logits: torch.Tensor, data: Dataset, source_exponent: float) -> float:
    """Move the decision threshold to where both classes have the same recall on these (validation)
    examples, each weighted as the training epochs draw them (every source and group represented,
    see train.data.sampling_weights), by shifting the last layer's bias, so the checkpoint carries
    it and neither class is favoured. Returns the shift, in logit(male) - logit(female)."""
    weights = sampling_weights(data.paths, data.labels.tolist(), source_exponent).tolist()
    shift = equal_recall_threshold((logits[:, 1] - logits[:, 0]).tolist(), data.labels.tolist(), weights)
    with torch.no_grad():
        model.head[-1].bias[1] -= shift
    return shift


def train_epoch(
    model: GenderNet,
    data: Dataset,
    weights: torch.Tensor,
    spec: InputSpec,
    chip: ChipSpec,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch_size: int,
    gen: torch.Generator,
    strength: float,
    precision: str,
    label: str,
) -> tuple[float, float]:
    model.train()
    order = torch.multinomial(weights, len(data.labels), replacement=True, generator=gen)
    progress = Progress(len(order) // batch_size * batch_size, label, min_total=1)
    loss_sum, correct, seen = 0.0, 0, 0
    for start in range(0, len(order) - batch_size + 1, batch_size):  # drop the ragged last batch (BatchNorm)
        idx = order[start : start + batch_size]
        x = normalize(augment(data.images[idx], gen, chip, strength), spec).to(_device(model))
        y = data.labels[idx].to(_device(model))
        with autocast(precision, x.device.type):
            logits = model(x).float()
        loss = F.cross_entropy(logits, y, label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        progress.advance(len(y), f"loss {loss_sum / seen:.4f}")
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return train(args, sys.argv[1:] if argv is None else argv)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def train(args: argparse.Namespace, argv: list[str]) -> int:
    started = time.monotonic()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    height, width = args.size
    spec = InputSpec(height, width, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    chip, detector = ChipSpec(height, width), DetectorSpec()

    items = find_labeled_images(args.data, CLASS_NAMES)
    if args.limit:
        items = [it for c in range(len(CLASS_NAMES)) for it in [i for i in items if i[1] == c][: args.limit]]
    data, skipped = load_dataset(items, Preprocessing(chip, detector, TRAINING_RULES))
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    for label, name in enumerate(CLASS_NAMES):
        if not (data.labels == label).any():
            raise TrainingError(f"no readable images of class {name} in {args.data / name} ({len(skipped)} files skipped)")
    found = {how: data.hows.count(how) for how in sorted(set(data.hows))}
    print(
        f"decoded {len(data.labels)} images ({', '.join(f'{n} {how}' for how, n in found.items())}), "
        f"skipped {len(skipped)} unreadable, in {time.monotonic() - started:.0f}s"
    )
    train_set, val_set, test_set = split(data, args.seed, args.val_fraction, args.test_fraction)
    print(
        f"split (seed {args.seed}): train {len(train_set.labels)}, validation {len(val_set.labels)}, test {len(test_set.labels)}"
    )
    if len(train_set.labels) < args.batch_size or not len(val_set.labels) or not len(test_set.labels):
        raise TrainingError(
            f"too few images to train: {len(data.labels)} give a training split of {len(train_set.labels)}, "
            f"smaller than one batch ({args.batch_size}), or an empty validation or test split"
        )

    # Cut once, before training: every epoch's curve shows them, and the end scores them.
    dev_sets = [DevSet.load(folder, Preprocessing(chip, detector, FaceRules())) for folder in args.dev]

    arch_args = {"stem_width": args.stem_width, "widths": list(args.widths)}
    model = GenderNet(**arch_args, num_classes=len(CLASS_NAMES))
    if args.init is not None:
        model.load_state_dict(args.init_payload["state_dict"])
    model = model.to(args.device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * (len(train_set.labels) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(args.seed)
    weights = sampling_weights(train_set.paths, train_set.labels.tolist(), args.source_exponent)

    history, best = [], None
    for epoch in range(1, args.epochs + 1):
        train_loss, train_acc = train_epoch(
            model,
            train_set,
            weights,
            spec,
            chip,
            optimizer,
            scheduler,
            args.batch_size,
            gen,
            args.augment,
            args.precision,
            f"epoch {epoch}/{args.epochs}",
        )
        val_loss, val_pred = evaluate(model, val_set, spec, args.precision)
        val_acc = summarize(val_set.labels.tolist(), val_pred, CLASS_NAMES)["accuracy"]
        dev_acc = {d.name: d.score(model, spec, args.precision)[0]["accuracy"] for d in dev_sets}
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "dev_acc": dev_acc,
            }
        )
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            raise TrainingError(
                f"training diverged in epoch {epoch} (train loss {train_loss}, validation loss {val_loss}); "
                f"{args.out} was not written. A lower --lr may help."
            )
        if best is None or val_loss < best[1]:
            best = (epoch, val_loss, copy.deepcopy(model.state_dict()))
        print(
            f"epoch {epoch}: train loss {train_loss:.4f} acc {train_acc:.2%} | "
            f"val loss {val_loss:.4f} acc {val_acc:.2%} | "
            + "".join(f"dev {name} {acc:.2%} | " for name, acc in dev_acc.items() if acc is not None)
            + f"{time.monotonic() - started:.0f}s",
            flush=True,
        )

    model.load_state_dict(best[2])
    shift = balance_recall(model, logits_of(model, val_set, spec, args.precision), val_set, args.source_exponent)
    print(f"decision threshold moved by {shift:+.3f} (logit male - female) for equal recall on the weighted validation split")
    test_loss, test_pred = evaluate(model, test_set, spec, args.precision)
    truth = test_set.labels.tolist()
    test = {"loss": test_loss, "all": summarize(truth, test_pred, CLASS_NAMES)}
    for source in sorted({source_of(p) for p in test_set.paths}):
        keep = [i for i, p in enumerate(test_set.paths) if source_of(p) == source]
        test[source] = summarize([truth[i] for i in keep], [test_pred[i] for i in keep], CLASS_NAMES)
    test_groups = summarize_groups(truth, test_pred, [groups_of(p) for p in test_set.paths], CLASS_NAMES)
    print(format_summary("test split", test["all"], CLASS_NAMES))
    dev, dev_groups = {}, {}
    for dev_set in dev_sets:
        dev[dev_set.name], dev_groups[dev_set.name] = dev_set.score(model, spec, args.precision)
        print(format_summary(f"dev {dev_set.name}", dev[dev_set.name], CLASS_NAMES))
        for line in dev_set.unreadable:
            print(f"  unreadable: {line}")

    summary = {
        "command": "python -m train " + shlex.join(argv),
        "data": str(args.data),
        "seed": args.seed,
        "init": args.init_payload["version"] if args.init is not None else None,
        "sizes": {"train": len(train_set.labels), "val": len(val_set.labels), "test": len(test_set.labels)},
        "faces": found,
        "skipped": [f"{p}: {r}" for p, r in skipped],
        "epochs": args.epochs,
        "best_epoch": best[0],
        "threads": args.threads,
        "precision": "bfloat16" if uses_bfloat16(args.precision, _device(model).type) else "float32",
        "wall_seconds": round(time.monotonic() - started, 1),
        "val_loss": best[1],
        "decision_shift": shift,
        "test": test,
        "test_groups": test_groups,
        "dev": dev,
        "dev_groups": dev_groups,
        "history": history,
    }
    kept = (
        "command",
        "data",
        "seed",
        "init",
        "sizes",
        "epochs",
        "best_epoch",
        "wall_seconds",
        "val_loss",
        "decision_shift",
        "precision",
    )
    meta = {k: summary[k] for k in kept}
    meta["test_accuracy"] = {k: v["accuracy"] for k, v in test.items() if isinstance(v, dict)}
    meta["dev_accuracy"] = {k: v["accuracy"] for k, v in dev.items()}
    summary["version"] = ckpt.save(args.out, model, arch_args, spec, CLASS_NAMES, meta, chip, detector)
    report = report_folder(args.out)
    write_report(report, summary, history, CLASS_NAMES)
    print(f"wrote {args.out} (version {summary['version']}) and {report}/ in {summary['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
