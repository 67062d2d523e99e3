"""Trust: calibration, out-of-distribution scores and abstention for every bundle kind.

    >>> from hematoscope.trust import fit_trust            # doctest: +SKIP
    >>> report = fit_trust(bundle, train=(train_out, y_train), val=(val_out, y_val))
    >>> bundle.save(path)                                   # threshold + scorer travel with it

:class:`hematoscope.bundle.Bundle.decide` uses what is fitted here: the temperature, the OOD
flag (score > ``config.ood.threshold``) and the abstain threshold.
"""
from hematoscope.bundle.ood import (OOD_FILE, OODScorer, ScorerError, get_scorer, list_scorers, load_scorer,
                                    register_scorer)
from hematoscope.trust.calibration import (CalibrationError, expected_calibration_error, fit_temperature, nll,
                                           reliability_curve, softmax)
from hematoscope.trust.evaluation import evaluate_ood, ood_metrics, risk_coverage
from hematoscope.trust.fit import DEFAULT_ABSTAIN_COST, bundle_outputs, fit_trust, fit_trust_on_table, table_targets

__all__ = [
    "CalibrationError", "DEFAULT_ABSTAIN_COST", "OOD_FILE", "OODScorer", "ScorerError", "bundle_outputs",
    "evaluate_ood", "expected_calibration_error", "fit_temperature", "fit_trust", "fit_trust_on_table", "get_scorer",
    "list_scorers", "load_scorer", "nll", "ood_metrics", "register_scorer", "reliability_curve", "risk_coverage",
    "softmax", "table_targets",
]
