import numpy as np
import pytest

from hematoscope.trust import (CalibrationError, expected_calibration_error, fit_temperature, nll,
                               reliability_curve, softmax)


def test_fit_temperature_recovers_known_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2.0, (6000, 5))
    y = np.array([rng.choice(5, p=p) for p in softmax(true_logits)])
    for t_true in (0.5, 2.5):
        # A model whose logits are the true ones times t_true needs temperature t_true.
        t = fit_temperature(true_logits * t_true, y)
        assert t == pytest.approx(t_true, rel=0.08)
        assert nll(true_logits * t_true, y, t) < nll(true_logits * t_true, y)


def test_no_temperature_is_fitted_on_images_that_are_all_right():
    """A small validation set without an error drove T to its lower bound (0.01): every answer,
    wrong ones on new cells too, came out 100 % confident and the confidence abstain never fired."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 24)
    logits = rng.normal(0, 1, (24, 4))
    logits[np.arange(24), y] += 8  # every image right
    with pytest.warns(UserWarning, match="no temperature can be fitted"):
        assert fit_temperature(logits, y) == 1.0
    logits[0] = np.roll(logits[0], 1)  # one wrong: fitted again
    assert fit_temperature(logits, y) != 1.0


def test_ece_hand_made_example():
    # confidences 0.95 (right), 0.85 (wrong), 0.65 (right), 0.70 (right)
    probs = np.array([[0.95, 0.05], [0.85, 0.15], [0.65, 0.35], [0.30, 0.70]])
    y = np.array([0, 1, 0, 1])
    # 5 bins: (0.8, 1] holds 0.95 & 0.85 -> |0.5 - 0.9| * 2/4 = 0.2 ; (0.6, 0.8] holds 0.65 & 0.7
    # -> |1 - 0.675| * 2/4 = 0.1625
    assert expected_calibration_error(probs, y, n_bins=5) == pytest.approx(0.3625)
    # one bin: |accuracy 0.75 - mean confidence 0.7875|
    assert expected_calibration_error(probs, y, n_bins=1) == pytest.approx(0.0375)
    curve = reliability_curve(probs, y, n_bins=5)
    assert curve["count"] == [0, 0, 0, 2, 2]
    assert curve["accuracy"][3:] == [1.0, 0.5] and curve["confidence"][:3] == [None] * 3
    assert curve["confidence"][4] == pytest.approx(0.9)


def test_temperature_scaling_reduces_ece_of_overconfident_model():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(0, 1.5, (3000, 4))
    y = np.array([rng.choice(4, p=p) for p in softmax(true_logits)])
    over = true_logits * 3
    t = fit_temperature(over, y)
    assert expected_calibration_error(softmax(over, t), y) < 0.5 * expected_calibration_error(softmax(over), y)


@pytest.mark.parametrize("probs, y", [(np.ones((3, 1)), np.zeros(3, int)), (np.ones((3, 2)) / 2, np.zeros(2, int)),
                                      (np.ones((3, 2)) / 2, np.array([0, 1, 2])), (np.ones((2, 2)) / 2, np.array([0.0, 1.0]))])
def test_invalid_inputs_raise(probs, y):
    with pytest.raises(CalibrationError):
        expected_calibration_error(probs, y)
