"""Accuracy, per-class accuracy and confusion matrices, as numbers and as text."""

from __future__ import annotations

from bisect import bisect_right
from itertools import pairwise


def confusion(truth: list[int], predicted: list[int], num_classes: int) -> list[list[int]]:
    """matrix[true][predicted] = count."""
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(truth, predicted, strict=True):
        matrix[t][p] += 1
    return matrix


def summarize(truth: list[int], predicted: list[int], class_names: list[str]) -> dict:
    """Accuracy overall and per class; None where there is nothing to score (not 0 %, which
    would read as every image wrong)."""
    matrix = confusion(truth, predicted, len(class_names))
    total = sum(map(sum, matrix))
    correct = sum(matrix[i][i] for i in range(len(class_names)))
    return {
        "count": total,
        "accuracy": correct / total if total else None,
        "per_class": {name: (matrix[i][i] / sum(matrix[i]) if sum(matrix[i]) else None) for i, name in enumerate(class_names)},
        "confusion": matrix,
    }


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def format_summary(title: str, summary: dict, class_names: list[str]) -> str:
    width = max(len(n) for n in class_names) + 2
    lines = [
        f"{title}: accuracy {percent(summary['accuracy'])} on {summary['count']} images",
        "  per class: " + ", ".join(f"{n} {percent(a)}" for n, a in summary["per_class"].items()),
        "  confusion (rows: true, columns: predicted)",
        "  " + " " * width + "".join(f"{n:>{width}}" for n in class_names),
    ]
    for name, row in zip(class_names, summary["confusion"], strict=True):
        lines.append("  " + f"{name:>{width}}" + "".join(f"{c:>{width}}" for c in row))
    return "\n".join(lines)


def equal_recall_threshold(margins: list[float], labels: list[int]) -> float:
    """Two classes scored by margin = logit(1) - logit(0), class 1 predicted when margin > t: the
    t at which both classes have (as nearly as these examples allow) the same recall; of equally
    good ones, the nearest to 0."""
    neg = sorted(m for m, y in zip(margins, labels, strict=True) if y == 0)
    pos = sorted(m for m, y in zip(margins, labels, strict=True) if y == 1)
    if not neg or not pos:
        return 0.0
    values = sorted(set(margins))
    candidates = [0.0] + [(a + b) / 2 for a, b in pairwise(values)]

    def gap(t: float) -> tuple[float, float]:
        recall_neg = bisect_right(neg, t) / len(neg)
        recall_pos = 1 - bisect_right(pos, t) / len(pos)
        return abs(recall_neg - recall_pos), abs(t)

    return min(candidates, key=gap)
