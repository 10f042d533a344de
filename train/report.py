"""The training report: curves and confusion matrix as PNG (drawn with Pillow), JSON and Markdown."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from train.metrics import format_summary, percent

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, series: dict[str, list[float]]) -> None:
    left, top, right, bottom = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((left + 5, top - 15), title, fill=(0, 0, 0))
    values = [v for s in series.values() for v in s]
    if not values:
        return
    low, high = min(values), max(values)
    high = high if high > low else low + 1e-6
    longest = max(len(s) for s in series.values())
    for frac in (0.0, 0.5, 1.0):
        y = bottom - frac * (bottom - top)
        draw.text((left - 48, y - 6), f"{low + frac * (high - low):.4f}", fill=(90, 90, 90))
    for i, (name, s) in enumerate(series.items()):
        points = [
            (left + (right - left) * (j / max(longest - 1, 1)), bottom - (bottom - top) * (v - low) / (high - low))
            for j, v in enumerate(s)
        ]
        colour = COLOURS[i % len(COLOURS)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((right - 110, top + 5 + 14 * i), name, fill=colour)
    draw.text(((left + right) // 2 - 20, bottom + 5), f"epoch 1..{longest}", fill=(0, 0, 0))


def draw_curves(history: list[dict], path: Path) -> None:
    img = Image.new("RGB", (900, 360), "white")
    draw = ImageDraw.Draw(img)
    _panel(
        draw,
        (60, 30, 430, 320),
        "loss",
        {"train loss": [h["train_loss"] for h in history], "val loss": [h["val_loss"] for h in history]},
    )
    _panel(
        draw,
        (510, 30, 880, 320),
        "accuracy",
        {"train acc": [h["train_acc"] for h in history], "val acc": [h["val_acc"] for h in history]},
    )
    img.save(path)


def draw_confusion(matrix: list[list[int]], class_names: list[str], title: str, path: Path) -> None:
    n, cell = len(class_names), 110
    img = Image.new("RGB", (120 + n * cell, 80 + n * cell), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title + "  (rows: true, columns: predicted)", fill=(0, 0, 0))
    for i, row in enumerate(matrix):
        total = max(sum(row), 1)
        draw.text((10, 60 + i * cell + cell // 2), class_names[i], fill=(0, 0, 0))
        for j, count in enumerate(row):
            shade = int(255 * (1 - count / total))
            box = (100 + j * cell, 50 + i * cell, 100 + (j + 1) * cell, 50 + (i + 1) * cell)
            draw.rectangle(box, fill=(shade, shade, 255), outline=(0, 0, 0))
            draw.text(
                (box[0] + 10, box[1] + cell // 2 - 6),
                f"{count} ({count / total:.1%})",
                fill=(0, 0, 0) if shade > 120 else (255, 255, 255),
            )
        draw.text((100 + i * cell + 10, 35), class_names[i], fill=(0, 0, 0))
    img.save(path)


def write_report(folder: Path, summary: dict, history: list[dict], class_names: list[str]) -> None:
    """summary.json, summary.md, curves.png and confusion.png in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    draw_curves(history, folder / "curves.png")
    draw_confusion(summary["test"]["all"]["confusion"], class_names, "test split", folder / "confusion.png")
    lines = [
        "# Training report",
        "",
        f"Checkpoint version `{summary['version']}`, trained with:",
        "",
        f"    {summary['command']}",
        "",
        f"Data: `{summary['data']}`: {summary['sizes']['train']} train / {summary['sizes']['val']} validation / "
        f"{summary['sizes']['test']} test images (seed {summary['seed']}); {len(summary['skipped'])} unreadable files skipped. "
        "Faces: " + ", ".join(f"{n} {how.replace('_', ' ')}" for how, n in summary["faces"].items()) + ".",
        (f"Started from the weights of checkpoint `{summary['init']}`. " if summary.get("init") else "")
        + f"Best epoch by validation loss: {summary['best_epoch']} of {summary['epochs']}; "
        f"wall time {summary['wall_seconds'] / 60:.1f} min on {summary['threads']} threads. Decision threshold moved by "
        f"{summary['decision_shift']:+.3f} (logit {class_names[1]} - {class_names[0]}) for equal recall on the validation split, "
        "weighted as the epochs are drawn.",
        "",
        f"Test split: loss {summary['test']['loss']:.4f}.",
        "",
        "| set | images | accuracy | " + " | ".join(class_names) + " |",
        "|---|---|---|" + "---|" * len(class_names),
    ]
    rows = [(f"test: {k}", v) for k, v in summary["test"].items() if isinstance(v, dict)] + [
        (f"dev: {k}", v) for k, v in summary["dev"].items()
    ]
    rows += [(f"test: {k}", v) for k, v in summary["test_groups"].items()]
    rows += [(f"dev: {folder}: {k}", v) for folder, groups in summary["dev_groups"].items() for k, v in groups.items()]
    for name, s in rows:
        lines.append(
            f"| {name} | {s['count']} | {percent(s['accuracy'])} | " + " | ".join(map(percent, s["per_class"].values())) + " |"
        )
    lines += ["", "Development sets count a picture in which no face was found as wrong (see `unanswered` in summary.json)."]
    lines += ["", "```", format_summary("test split", summary["test"]["all"], class_names), "```", ""]
    lines += ["![training curves](curves.png)", "", "![confusion matrix](confusion.png)", ""]
    (folder / "summary.md").write_text("\n".join(lines))
