"""ROC AUC against hand-counted pairs, the ROC curve, Youden's threshold and threshold metrics."""

import itertools

import numpy as np
import pytest
import torch

from engine.classification import classification_metrics, predict_probabilities, roc_auc, roc_curve, \
    threshold_metrics, youden_threshold


def test_auc_matches_a_hand_computed_case_with_ties():
    scores = np.array([0.9, 0.8, 0.7, 0.7, 0.4, 0.3, 0.2])
    labels = np.array([1, 0, 1, 0, 1, 0, 0])
    # Positives 0.9, 0.7, 0.4 against negatives 0.8, 0.7, 0.3, 0.2 (12 pairs):
    # 0.9 beats 4; 0.7 beats 2, ties 1 (0.5); 0.4 beats 2 -> (4 + 2.5 + 2) / 12.
    assert roc_auc(scores, labels) == pytest.approx(8.5 / 12)
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0
             for p, n in itertools.product(scores[labels == 1], scores[labels == 0])]
    assert roc_auc(scores, labels) == pytest.approx(np.mean(pairs))
    assert roc_auc(-scores, labels) == pytest.approx(1 - 8.5 / 12)
    assert np.isnan(roc_auc(scores, np.zeros(7)))


def test_roc_curve_and_trapezoid_area_agree_with_auc():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 101)
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounded: many ties
    fpr, tpr, thresholds = roc_curve(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(thresholds) < 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(scores, labels))


def test_youden_threshold_and_metrics_at_it():
    scores = np.array([0.1, 0.2, 0.35, 0.4, 0.6, 0.8])
    labels = np.array([0, 0, 1, 0, 1, 1])
    # Thresholds 0.35 (tpr 1, fpr 1/3) and 0.6 (tpr 2/3, fpr 0) both give J = 2/3; the first is kept.
    assert youden_threshold(scores, labels) == 0.35
    metrics = threshold_metrics(scores, labels, 0.35)
    assert (metrics["tp"], metrics["fp"], metrics["tn"], metrics["fn"]) == (3, 1, 2, 0)
    assert metrics["sensitivity"] == 1.0 and metrics["specificity"] == pytest.approx(2 / 3)
    assert metrics["precision"] == 0.75 and metrics["f1"] == pytest.approx(6 / 7)
    assert metrics["accuracy"] == pytest.approx(5 / 6)
    assert threshold_metrics(scores, labels, 0.9)["precision"] == 0.0  # nothing called positive


def test_classification_metrics_are_flat_numbers():
    metrics = classification_metrics(np.array([0.2, 0.7, 0.4, 0.9]), np.array([0, 1, 0, 1]))
    assert {"auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "threshold_youden",
            "accuracy_youden", "sensitivity_youden", "specificity_youden", "precision_youden",
            "f1_youden"} <= set(metrics)
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert metrics["auc"] == 1.0 and metrics["threshold_youden"] == 0.7


def test_predict_probabilities_keeps_loader_order():
    class MeanLogit(torch.nn.Module):
        def forward(self, image):
            return image.mean(dim=(2, 3))  # (B, 1)

    images = torch.linspace(-2, 2, 5).view(5, 1, 1, 1).expand(5, 1, 3, 3)
    batches = [{"image": images[i:i + 2], "label": torch.tensor([0, 1][:len(images[i:i + 2])]),
                "index": torch.arange(i, min(i + 2, 5)) + 10} for i in range(0, 5, 2)]
    probabilities, labels, indices = predict_probabilities(MeanLogit(), batches, device=torch.device("cpu"),
                                                           amp_dtype=None, progress=False)
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-np.linspace(-2, 2, 5))), rtol=1e-6)
    assert indices.tolist() == [10, 11, 12, 13, 14] and labels.tolist() == [0, 1, 0, 1, 0]
