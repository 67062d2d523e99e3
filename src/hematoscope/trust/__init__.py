"""Trust: calibration, out-of-distribution scores and abstention for every bundle kind.

    >>> from hematoscope.trust import fit_trust            # doctest: +SKIP
    >>> report = fit_trust(bundle, train=(train_out, y_train), val=(val_out, y_val))
    >>> bundle.save(path)                                   # threshold + scorer travel with it

:class:`hematoscope.bundle.Bundle.decide` uses what is fitted here: the temperature, the OOD
flag (score > ``config.ood["threshold"]``) and the abstain threshold.
"""
from hematoscope.trust.calibration import (CalibrationError, expected_calibration_error, fit_temperature, nll,
                                           reliability_curve, softmax)
from hematoscope.trust.fit import DEFAULT_ABSTAIN_COST, fit_trust
from hematoscope.trust.scorers import (OOD_FILE, OODScorer, ScorerError, get_scorer, list_scorers, load_scorer,
                                       register_scorer)

__all__ = [
    "CalibrationError", "DEFAULT_ABSTAIN_COST", "OOD_FILE", "OODScorer", "ScorerError", "expected_calibration_error",
    "fit_temperature", "fit_trust", "get_scorer", "list_scorers", "load_scorer", "nll", "register_scorer",
    "reliability_curve", "softmax",
]
