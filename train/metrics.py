"""Accuracy, per-class accuracy and confusion matrices, as numbers and as text."""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate, pairwise


def confusion(truth: list[int], predicted: list[int], num_classes: int) -> list[list[int]]:
    """matrix[true][predicted] = count."""
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(truth, predicted, strict=True):
        matrix[t][p] += 1
    return matrix


def summarize(truth: list[int], predicted: list[int], class_names: list[str], unanswered: list[int] = ()) -> dict:
    """Accuracy overall and per class; None where there is nothing to score (not 0 %, which
    would read as every image wrong). `unanswered`: the true classes of pictures that got no
    answer (no face found), which count as wrong."""
    matrix = confusion(truth, predicted, len(class_names))
    missing = [sum(1 for t in unanswered if t == i) for i in range(len(class_names))]
    total = sum(map(sum, matrix)) + len(unanswered)
    correct = sum(matrix[i][i] for i in range(len(class_names)))

    def recall(i: int) -> float | None:
        n = sum(matrix[i]) + missing[i]
        return matrix[i][i] / n if n else None

    return {
        "count": total,
        "accuracy": correct / total if total else None,
        "per_class": {name: recall(i) for i, name in enumerate(class_names)},
        "confusion": matrix,
        "unanswered": len(unanswered),
    }


def summarize_groups(
    truth: list[int], predicted: list[int | None], groups: list[list[str]], class_names: list[str]
) -> dict[str, dict]:
    """summarize() for each group that some example is in (an example may be in several, or none); a
    None prediction is an unanswered picture."""
    out = {}
    for group in sorted({g for gs in groups for g in gs}):
        keep = [i for i, gs in enumerate(groups) if group in gs]
        answered = [i for i in keep if predicted[i] is not None]
        out[group] = summarize(
            [truth[i] for i in answered],
            [predicted[i] for i in answered],
            class_names,
            [truth[i] for i in keep if predicted[i] is None],
        )
    return out


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def format_summary(title: str, summary: dict, class_names: list[str]) -> str:
    width = max(len(n) for n in class_names) + 2
    unanswered = f" ({summary['unanswered']} without a face found, counted wrong)" if summary.get("unanswered") else ""
    lines = [
        f"{title}: accuracy {percent(summary['accuracy'])} on {summary['count']} images{unanswered}",
        "  per class: " + ", ".join(f"{n} {percent(a)}" for n, a in summary["per_class"].items()),
        "  confusion (rows: true, columns: predicted)",
        "  " + " " * width + "".join(f"{n:>{width}}" for n in class_names),
    ]
    for name, row in zip(class_names, summary["confusion"], strict=True):
        lines.append("  " + f"{name:>{width}}" + "".join(f"{c:>{width}}" for c in row))
    return "\n".join(lines)


def equal_recall_threshold(margins: list[float], labels: list[int], weights: list[float] | None = None) -> float:
    """Two classes scored by margin = logit(1) - logit(0), class 1 predicted when margin > t: the
    t at which both classes have (as nearly as these examples allow) the same recall, each example
    counted with its weight (default 1); of equally good ones, the nearest to 0."""
    weights = [1.0] * len(margins) if weights is None else weights
    sides = []
    for cls in (0, 1):
        pairs = sorted((m, w) for m, y, w in zip(margins, labels, weights, strict=True) if y == cls)
        sides.append(([m for m, _ in pairs], list(accumulate(w for _, w in pairs))))
    (neg, neg_cum), (pos, pos_cum) = sides
    if not neg or not pos:
        return 0.0
    values = sorted(set(margins))
    candidates = [0.0] + [(a + b) / 2 for a, b in pairwise(values)]

    def share_at_or_below(sorted_margins: list[float], cumulative: list[float], t: float) -> float:
        k = bisect_right(sorted_margins, t)
        return cumulative[k - 1] / cumulative[-1] if k else 0.0

    def gap(t: float) -> tuple[float, float]:
        recall_neg = share_at_or_below(neg, neg_cum, t)
        recall_pos = 1 - share_at_or_below(pos, pos_cum, t)
        return abs(recall_neg - recall_pos), abs(t)

    return min(candidates, key=gap)
