"""python -m train.evaluate DIR [DIR ...] [--checkpoint FILE] [--report DIR]: accuracy of a checkpoint on labeled folders.

Each DIR holds female/ and male/. Files go through exactly the serving path (model.inference:
face detection, alignment, the main face's answer), so the numbers are what the service would
answer; a picture in which no face is found counts as wrong. Accuracy is also given by group where
the file names tell one (UTKFace's race field, IMFDB's actor, and the age band where
UTKFace's or All-Age-Faces' names give the age). --report writes the same figures
as pictures and a page, with the files it got wrong (train.report.write_evaluation_report).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import model
from model import PRECISIONS
from model import checkpoint as ckpt
from model.faces import NO_FACE, FaceRules
from model.inference import classify_in_batches
from model.pool import DecodePool, usable_cpus
from model.progress import Progress
from train import DefaultsHelp
from train.data import TrainingError, find_labeled_images, summarize_file_groups
from train.metrics import format_summary, percent, summarize
from train.report import write_evaluation_report


def evaluate_folder(folder: Path, checkpoint: ckpt.Checkpoint, pool: DecodePool, batch_size: int = 256) -> dict:
    """Accuracy overall, per class and by group, the files that could not be read, and `mistakes`:
    every picture answered wrongly or without a face found (file, truth, answer, probability, box)."""
    items = find_labeled_images(folder, checkpoint.class_names)
    truth, predicted, failed, no_face, mistakes = [], [], [], [], []
    answers: dict[Path, int | None] = {}  # None: no face found
    progress = Progress(len(items), f"evaluating {folder.name}")
    label_of = dict(items)
    for outcomes in classify_in_batches(list(label_of), checkpoint, pool, FaceRules(), batch_size):
        for outcome in outcomes:
            path, label = outcome.path, label_of[outcome.path]
            mistake = {
                "file": str(path),
                "truth": checkpoint.class_names[label],
                "answer": None,
                "probability": None,
                "box": None,
            }
            if outcome.prediction is None:
                if outcome.error == NO_FACE:
                    answers[path] = None
                    no_face.append(label)
                    mistakes.append(mistake)
                else:
                    failed.append(f"{path}: {outcome.error}")
                continue
            truth.append(label)
            predicted.append(checkpoint.class_names.index(outcome.prediction.label))
            answers[path] = predicted[-1]
            if predicted[-1] != label:
                main_face = outcome.faces[0]
                mistake |= {"answer": main_face.prediction.label, "probability": main_face.prediction.probability}
                mistakes.append(mistake | {"box": list(main_face.box)})
        progress.advance(len(outcomes))
    groups = summarize_file_groups(answers, label_of, checkpoint.class_names)
    summary = summarize(truth, predicted, checkpoint.class_names, no_face)
    return summary | {"unreadable": failed, "groups": groups, "mistakes": mistakes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train.evaluate",
        description=__doc__.splitlines()[0],
        formatter_class=DefaultsHelp,
        epilog="example: python -m train.evaluate ../shared/data/other/lfw ../shared/data/other/imfdb\n"
        "exit status: 0 done, 1 a folder had no readable image, 2 usage or checkpoint error",
    )
    p.add_argument("folders", nargs="+", type=Path, help="labeled folders, each with female/ and male/")
    p.add_argument("--checkpoint", type=Path, default=model.DEFAULT_CHECKPOINT, help="checkpoint to measure")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="forward-pass precision (auto: bfloat16 where fast)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="also write a report to DIR: summary.md, a confusion matrix per folder, and the files it got wrong "
        "(list and contact sheet; the sheets are kept out of git, as the data's terms may forbid sharing its pictures)",
    )
    args = p.parse_args(argv)
    if args.json and (args.json.is_dir() or not args.json.absolute().parent.is_dir()):
        p.error(f"--json {args.json}: it is a folder, or its folder does not exist")
    names = [folder.resolve().name for folder in args.folders]
    if len(set(names)) != len(names):
        p.error(f"folders are reported by name, and these repeat one: {', '.join(map(str, args.folders))}")
    if args.report and ((args.report.exists() and not args.report.is_dir()) or not args.report.absolute().parent.is_dir()):
        p.error(f"--report {args.report}: it must be a folder, in one that exists")
    try:
        checkpoint = ckpt.load(args.checkpoint, args.precision)
    except ckpt.CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for folder in args.folders:
        try:
            find_labeled_images(folder, checkpoint.class_names)
        except TrainingError as exc:
            p.error(str(exc))
    print(f"checkpoint {args.checkpoint} (version {checkpoint.version})")
    results = {}
    with DecodePool(usable_cpus()) as pool:
        for folder in args.folders:
            results[str(folder)] = evaluate_folder(folder, checkpoint, pool)
            print(format_summary(str(folder), results[str(folder)], checkpoint.class_names))
            for group, summary in results[str(folder)]["groups"].items():
                per_class = ", ".join(f"{n} {percent(a)}" for n, a in summary["per_class"].items())
                print(f"  {group}: {percent(summary['accuracy'])} of {summary['count']} ({per_class})")
            for line in results[str(folder)]["unreadable"]:
                print(f"  unreadable: {line}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.report:
        write_evaluation_report(args.report, results, checkpoint.class_names, str(args.checkpoint), checkpoint.version)
        print(f"wrote {args.report / 'summary.md'}")
    empty = [folder for folder, r in results.items() if not r["count"]]
    if empty:
        print(f"error: no readable image to score in {', '.join(empty)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
