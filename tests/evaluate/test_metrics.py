"""classification_metrics agrees with scikit-learn and with hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support)

from hematoscope.evaluate import classification_metrics
from hematoscope.trust import expected_calibration_error


def test_hand_computed_example():
    m = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], None, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    # F1: a = 2*(1/2*1/2)/(1) = 0.5; b = 2*(2/3*1)/(5/3) = 0.8; c = 0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0) / 3)
    assert m["per_class"]["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8),
                                   "support": 2}
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert "ece" not in m


def test_agrees_with_sklearn_on_random_predictions():
    rng = np.random.default_rng(0)
    labels = [f"class_{i}" for i in range(5)]
    y = rng.integers(0, 5, 300)
    probs = rng.dirichlet(np.ones(5), 300)
    probs[np.arange(150), y[:150]] += 2  # half of them right and confident
    probs /= probs.sum(1, keepdims=True)
    pred = probs.argmax(1)
    m = classification_metrics(y, pred, probs, labels)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    p, r, f, s = precision_recall_fscore_support(y, pred)
    for i, lab in enumerate(labels):
        assert m["per_class"][lab] == {"precision": pytest.approx(p[i]), "recall": pytest.approx(r[i]),
                                       "f1": pytest.approx(f[i]), "support": int(s[i])}
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    assert m["ece"] == pytest.approx(expected_calibration_error(probs, y))
    assert m["n"] == 300 and m["labels"] == labels


def test_classes_absent_from_the_data_do_not_drag_macro_f1_down():
    m = classification_metrics([0, 0, 1, 1], [0, 0, 1, 1], None, ["a", "b", "c", "d"])
    assert m["macro_f1"] == 1.0 and m["per_class"]["c"]["support"] == 0 and m["predicted_other_classes"] == 0


def test_answers_of_a_class_the_data_lacks_are_errors_of_the_true_class_only():
    """White cells called platelets: recall of the white cells drops; no F1 of 0 for platelets."""
    y, pred = [0, 0, 1, 1], [0, 2, 1, 1]
    m = classification_metrics(y, pred, None, ["a", "b", "platelet"])
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, labels=[0, 1], average="macro"))
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1) / 2) and m["predicted_other_classes"] == 0.25
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1) / 2)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="equal, non-zero"):
        classification_metrics([0, 1], [0], None, ["a", "b"])
