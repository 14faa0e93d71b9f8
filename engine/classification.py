"""Binary classification: predicted probabilities over a loader, ROC AUC, and metrics at a threshold.

AUC is computed from ranks (the Mann-Whitney statistic): the probability that a random positive scores
above a random negative, ties counting one half. It needs no curve integration and is exact.
"""

import numpy as np
import torch
from tqdm import tqdm


@torch.inference_mode()
def predict_probabilities(model, loader, *, device: torch.device, amp_dtype: torch.dtype | None,
                          progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sigmoid of the single logit for every sample of ``loader``.

    Returns:
        probabilities (N,) float64, labels (N,) int64, dataset indices (N,) int64, in loader order.
    """
    model.eval()
    probabilities, labels, indices = [], [], []
    for batch in tqdm(loader, desc="validate", leave=False, disable=not progress):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(batch["image"].to(device, non_blocking=True))  # (B, 1)
        probabilities.append(torch.sigmoid(logits.float()[:, 0]).cpu().numpy())
        labels.append(batch["label"].numpy())
        indices.append(batch["index"].numpy())
    return (np.concatenate(probabilities).astype(np.float64), np.concatenate(labels).astype(np.int64),
            np.concatenate(indices).astype(np.int64))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start of each run of equal values, and each run's mean rank.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_ranks = (starts + 1 + ends) / 2
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(mean_ranks, ends - starts)
    return ranks


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold (score >= threshold is positive),
    from the highest threshold down; the first point is (0, 0) at +inf."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_run = np.r_[scores[1:] != scores[:-1], True]
    true_positives = np.cumsum(labels)[last_of_run]
    false_positives = np.cumsum(~labels)[last_of_run]
    tpr = np.r_[0.0, true_positives / max(labels.sum(), 1)]
    fpr = np.r_[0.0, false_positives / max((~labels).sum(), 1)]
    return fpr, tpr, np.r_[np.inf, scores[last_of_run]]


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (Youden's J); 0.5 if undefined."""
    labels = np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        return 0.5
    fpr, tpr, thresholds = roc_curve(scores, labels)
    best = int(np.argmax(tpr[1:] - fpr[1:])) + 1  # skip the +inf point, which predicts nothing
    return float(thresholds[best])


def threshold_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """Confusion matrix and the rates derived from it, for ``score >= threshold`` as positive.
    A rate whose denominator is zero is 0 (e.g. precision when nothing is called positive)."""
    predicted = np.asarray(scores) >= threshold
    labels = np.asarray(labels).astype(bool)
    tp, fp = int((predicted & labels).sum()), int((predicted & ~labels).sum())
    tn, fn = int((~predicted & ~labels).sum()), int((~predicted & labels).sum())

    def ratio(numerator: int, denominator: int) -> float:
        return numerator / denominator if denominator else 0.0

    precision, sensitivity = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {"accuracy": ratio(tp + tn, len(labels)), "sensitivity": sensitivity,
            "specificity": ratio(tn, tn + fp), "precision": precision,
            "f1": ratio(2 * tp, 2 * tp + fp + fn), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def classification_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float | None = None) -> dict:
    """Flat dict: ``auc``; accuracy, sensitivity, specificity, precision, f1 and the confusion matrix
    at 0.5; the same with a ``_youden`` suffix at ``threshold`` (default: Youden's on these scores),
    and ``threshold_youden``."""
    if threshold is None:
        threshold = youden_threshold(scores, labels)
    metrics = {"auc": roc_auc(scores, labels), **threshold_metrics(scores, labels, 0.5)}
    metrics.update({f"{k}_youden": v for k, v in threshold_metrics(scores, labels, threshold).items()})
    metrics["threshold_youden"] = float(threshold)
    return metrics
