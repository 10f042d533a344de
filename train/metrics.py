"""Accuracy, per-class accuracy and confusion matrices, as numbers and as text."""

from __future__ import annotations


def confusion(truth: list[int], predicted: list[int], num_classes: int) -> list[list[int]]:
    """matrix[true][predicted] = count."""
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(truth, predicted, strict=True):
        matrix[t][p] += 1
    return matrix


def summarize(truth: list[int], predicted: list[int], class_names: list[str]) -> dict:
    matrix = confusion(truth, predicted, len(class_names))
    total = sum(map(sum, matrix))
    correct = sum(matrix[i][i] for i in range(len(class_names)))
    return {
        "count": total,
        "accuracy": correct / total if total else 0.0,
        "per_class": {name: (matrix[i][i] / sum(matrix[i]) if sum(matrix[i]) else 0.0) for i, name in enumerate(class_names)},
        "confusion": matrix,
    }


def format_summary(title: str, summary: dict, class_names: list[str]) -> str:
    width = max(len(n) for n in class_names) + 2
    lines = [
        f"{title}: accuracy {summary['accuracy']:.2%} on {summary['count']} images",
        "  per class: " + ", ".join(f"{n} {a:.2%}" for n, a in summary["per_class"].items()),
        "  confusion (rows: true, columns: predicted)",
        "  " + " " * width + "".join(f"{n:>{width}}" for n in class_names),
    ]
    for name, row in zip(class_names, summary["confusion"], strict=True):
        lines.append("  " + f"{name:>{width}}" + "".join(f"{c:>{width}}" for c in row))
    return "\n".join(lines)
