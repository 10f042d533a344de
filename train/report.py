"""Reports as pictures (drawn with Pillow) and pages: the training report (curves, confusion
matrix, JSON and Markdown) and the evaluation report (confusion per folder, accuracy by group, the
files answered wrongly as a list and a contact sheet)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from model.decode import open_upright
from train.metrics import format_summary, percent

# Matplotlib's "tab10": distinct for the train, validation and up to eight development curves.
COLOURS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]
INK, GRID, MUTED = (0, 0, 0), (225, 225, 225), (110, 110, 110)


def _font(size: int = 13) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # a Pillow without FreeType: its small bitmap font
        return ImageFont.load_default()


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round values (steps of 1, 2, 2.5 or 5 times a power of ten) that span low..high."""
    if high <= low:
        low, high = low - 0.5 * (abs(low) or 1), high + 0.5 * (abs(high) or 1)
    raw = (high - low) / (count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def _decimals(ticks: list[float], scale: float) -> int:
    step = (ticks[1] - ticks[0]) * scale if len(ticks) > 1 else 1.0
    return max(0, -math.floor(math.log10(step) + 1e-9))


def _panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    title: str,
    series: dict[str, list[float | None]],
    chosen_epoch: int,
    as_percent: bool,
) -> None:
    """One chart: round y ticks with grid lines, every epoch on the x axis (or every few), the kept
    epoch marked, and the legend below the chart so that it never covers a curve."""
    left, top, right, bottom = box
    font, small = _font(14), _font(12)
    draw.text((left, top - 22), title, fill=INK, font=font)
    values = [v for s in series.values() for v in s if v is not None]
    longest = max((len(s) for s in series.values()), default=0)
    if not values or not longest:
        draw.rectangle(box, outline=INK)
        return
    ticks = nice_ticks(min(values), max(values))
    low, high = ticks[0], ticks[-1]
    scale = 100 if as_percent else 1
    decimals = _decimals(ticks, scale)

    def x_of(epoch: int) -> float:
        return left + (right - left) * ((epoch - 1) / max(longest - 1, 1))

    def y_of(value: float) -> float:
        return bottom - (bottom - top) * (value - low) / (high - low)

    for tick in ticks:
        y = y_of(tick)
        draw.line((left, y, right, y), fill=GRID)
        label = f"{tick * scale:.{decimals}f}" + ("%" if as_percent else "")
        draw.text((left - 8, y), label, fill=MUTED, font=small, anchor="rm")
    every = max(1, math.ceil(longest / 12))
    for epoch in range(1, longest + 1):
        if epoch % every == 0 or epoch == 1:
            draw.text((x_of(epoch), bottom + 6), str(epoch), fill=MUTED, font=small, anchor="mt")
    draw.text(((left + right) / 2, bottom + 24), "epoch", fill=INK, font=small, anchor="mt")
    kept = x_of(chosen_epoch)
    for y in range(top, bottom, 8):  # dashed
        draw.line((kept, y, kept, min(y + 4, bottom)), fill=MUTED)
    draw.text(
        (kept - 4, top + 4), f"kept: epoch {chosen_epoch}", fill=MUTED, font=small, anchor="ra" if kept > left + 100 else "la"
    )
    draw.rectangle(box, outline=INK)
    for i, (name, s) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = [(x_of(j + 1), y_of(v)) for j, v in enumerate(s) if v is not None]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=colour)
        column, row = i % 2, i // 2
        lx, ly = left + column * (right - left) // 2, bottom + 46 + row * 18
        draw.line((lx, ly + 7, lx + 18, ly + 7), fill=colour, width=3)
        draw.text((lx + 24, ly), name, fill=INK, font=small)


def draw_curves(history: list[dict], chosen_epoch: int, path: Path) -> None:
    """Loss and accuracy per epoch: training, validation and, where given, each development set."""
    dev_names = list(dict.fromkeys(name for h in history for name in h.get("dev_acc", {})))
    accuracy = {"training": [h["train_acc"] for h in history], "validation": [h["val_acc"] for h in history]}
    accuracy |= {f"dev: {name}": [h.get("dev_acc", {}).get(name) for h in history] for name in dev_names}
    legend_rows = math.ceil(len(accuracy) / 2)
    img = Image.new("RGB", (1000, 420 + 18 * legend_rows), "white")
    draw = ImageDraw.Draw(img)
    losses = {"training": [h["train_loss"] for h in history], "validation": [h["val_loss"] for h in history]}
    _panel(draw, (80, 40, 470, 340), "loss (cross-entropy)", losses, chosen_epoch, as_percent=False)
    _panel(draw, (590, 40, 980, 340), "accuracy", accuracy, chosen_epoch, as_percent=True)
    img.save(path)


def draw_confusion(matrix: list[list[int]], class_names: list[str], title: str, path: Path) -> None:
    """Counts and row shares; the title on a line of its own above the grid."""
    n, cell, left, top = len(class_names), 110, 100, 80
    font, small = _font(13), _font(12)
    width = max(left + n * cell + 20, int(_text_width(title, font)) + 20)
    img = Image.new("RGB", (width, top + n * cell + 20), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill=INK, font=font)
    draw.text((10, 28), "rows: true class, columns: answered", fill=MUTED, font=small)
    for i, row in enumerate(matrix):
        total = max(sum(row), 1)
        draw.text((10, top + i * cell + cell // 2), class_names[i], fill=INK, font=small, anchor="lm")
        draw.text((left + i * cell + cell // 2, top - 8), class_names[i], fill=INK, font=small, anchor="mb")
        for j, count in enumerate(row):
            shade = int(255 * (1 - count / total))
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell, top + (i + 1) * cell)
            draw.rectangle(box, fill=(shade, shade, 255), outline=INK)
            draw.text(
                (box[0] + cell // 2, box[1] + cell // 2),
                f"{count} ({count / total:.1%})",
                fill=INK if shade > 120 else (255, 255, 255),
                font=small,
                anchor="mm",
            )
    img.save(path)


def _text_width(text: str, font: ImageFont.ImageFont) -> float:
    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font)


def _separator(columns: int) -> str:
    """The line under a Markdown table's header of `columns` columns."""
    return "|" + "---|" * columns


def write_report(folder: Path, summary: dict, history: list[dict], class_names: list[str]) -> None:
    """summary.json, summary.md, curves.png and confusion.png in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    draw_curves(history, summary["best_epoch"], folder / "curves.png")
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
        _separator(3 + len(class_names)),
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


SHEET_COLUMNS, SHEET_MAX, TILE = 10, 200, 112


def _tile(mistake: dict) -> Image.Image:
    """The face the model answered for (the main face's box with a margin), or the whole picture
    when no face was found, captioned with the truth and the answer."""
    tile = Image.new("RGB", (TILE, TILE + 30), "white")
    try:
        picture = open_upright(mistake["file"])  # boxes are in upright pixels
        if mistake["box"]:
            x, y, w, h = mistake["box"]
            margin = 0.25 * max(w, h)
            picture = picture.crop((int(x - margin), int(y - margin), int(x + w + margin), int(y + h + margin)))
        tile.paste(ImageOps.pad(picture, (TILE, TILE), color=(255, 255, 255)))
    except Exception:  # a damaged file that was answered as such: the sheet still shows the rest
        ImageDraw.Draw(tile).text((8, TILE // 2), "cannot show", fill=MUTED, font=_font(11))
    draw = ImageDraw.Draw(tile)
    answer = "no face" if mistake["answer"] is None else f"{mistake['answer']} {mistake['probability']:.2f}"
    draw.text((3, TILE + 1), f"{mistake['truth']} -> {answer}", fill=INK, font=_font(11))
    draw.text((3, TILE + 15), Path(mistake["file"]).name[:20], fill=MUTED, font=_font(10))
    return tile


def draw_contact_sheet(mistakes: list[dict], path: Path) -> int:
    """The first SHEET_MAX mistakes, SHEET_COLUMNS to a row; returns how many are shown."""
    shown = mistakes[:SHEET_MAX]
    rows = max(1, math.ceil(len(shown) / SHEET_COLUMNS))
    sheet = Image.new("RGB", (SHEET_COLUMNS * (TILE + 4), rows * (TILE + 34)), (240, 240, 240))
    for i, mistake in enumerate(shown):
        sheet.paste(_tile(mistake), ((i % SHEET_COLUMNS) * (TILE + 4), (i // SHEET_COLUMNS) * (TILE + 34)))
    sheet.save(path, quality=85)
    return len(shown)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "folder"


def write_evaluation_report(
    folder: Path, results: dict[str, dict], class_names: list[str], checkpoint: str, version: str
) -> None:
    """summary.md; per evaluated folder a confusion matrix (PNG), the mistakes as JSON lines and a
    contact sheet of them (JPEG) in pictures/, whose .gitignore keeps the data's own pictures out
    of any repository the report is written into."""
    pictures = folder / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    (pictures / ".gitignore").write_text("# pictures of the evaluated data: its terms may forbid sharing them\n*\n")
    lines = [f"# Evaluation of `{checkpoint}` (version `{version}`)", ""]
    lines += [
        "| folder | images | accuracy | " + " | ".join(class_names) + " | without a face |",
        _separator(4 + len(class_names)),
    ]
    for name, r in results.items():
        per_class = " | ".join(map(percent, r["per_class"].values()))
        lines.append(f"| {name} | {r['count']} | {percent(r['accuracy'])} | {per_class} | {r['unanswered']} |")
    for name, r in results.items():
        slug = _slug(Path(name).name)
        draw_confusion(
            r["confusion"], class_names, f"{name} (pictures without a face not shown)", folder / f"{slug}-confusion.png"
        )
        with open(folder / f"{slug}-mistakes.jsonl", "w") as out:
            out.writelines(json.dumps(m) + "\n" for m in r["mistakes"])
        shown = draw_contact_sheet(r["mistakes"], pictures / f"{slug}-mistakes.jpg")
        lines += ["", f"## {name}", "", f"![confusion matrix]({slug}-confusion.png)", ""]
        if r["groups"]:
            lines += ["| group | images | accuracy | " + " | ".join(class_names) + " |", _separator(3 + len(class_names))]
            for group, g in sorted(r["groups"].items(), key=lambda kv: (kv[1]["accuracy"] is None, kv[1]["accuracy"] or 0)):
                per_class = " | ".join(map(percent, g["per_class"].values()))
                lines.append(f"| {group} | {g['count']} | {percent(g['accuracy'])} | {per_class} |")
            lines.append("")
        lines.append(
            f"{len(r['mistakes'])} pictures answered wrongly or without a face found, listed in `{slug}-mistakes.jsonl`; "
            f"the first {shown} in `pictures/{slug}-mistakes.jpg` (truth -> answer and its probability)."
        )
        lines += [f"Could not be read: {len(r['unreadable'])}." if r["unreadable"] else ""]
    (folder / "summary.md").write_text("\n".join(lines) + "\n")
