"""``hematoscope trust``: calibrate a bundle, fit its OOD detector, measure both, make OOD test sets."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hematoscope.cli._common import TtaOption, apply_tta, console, err_console, user_errors

trust_app = typer.Typer(help="Trust: calibration, out-of-distribution detection, abstention.", no_args_is_help=True)

METHODS = ("knn_energy", "mahalanobis", "knn", "energy", "max_softmax")


@trust_app.command("fit")
def fit_cmd(
    bundle_path: Annotated[Path, typer.Argument(metavar="BUNDLE", help="Bundle directory or .zip (re-saved in place).")],
    data: Annotated[Path, typer.Argument(metavar="DATA_OR_SPLIT",
                                         help="Split CSV (uses its train and val rows), or a dataset folder "
                                              "(split here with --seed; its val part must not have been trained on).")],
    method: Annotated[Optional[str], typer.Option(help=f"OOD score: {', '.join(METHODS)} "
                                                       "(default: knn_energy when the model has features).")] = None,
    target_tpr: Annotated[float, typer.Option("--target-tpr", help="Fraction of in-distribution val images the OOD "
                                                                   "flag accepts.")] = 0.95,
    abstain_min_confidence: Annotated[Optional[float], typer.Option(
        "--abstain-below", help="Abstain below this calibrated confidence (default: Chow's rule, 0.75).")] = None,
    max_train: Annotated[int, typer.Option("--max-train", help="At most this many train images fit the OOD score.")] = 5000,
    seed: Annotated[int, typer.Option(help="Seed of the train subset (and of the split when DATA is a folder).")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Save to this path instead of over BUNDLE.")] = None,
    tta: TtaOption = None,
) -> None:
    """Fit temperature, OOD score + threshold and abstain threshold on a bundle's own split.

    With --tta the bundle is saved with that many test-time views, since its thresholds fit them.
    """
    from hematoscope.bundle.base import load_bundle
    from hematoscope.data.readers import read_dataset
    from hematoscope.trust.fit import fit_trust_on_table, resave_bundle

    if method is not None and method not in METHODS:
        raise typer.BadParameter(f"choose one of {', '.join(METHODS)}", param_hint="--method")
    with user_errors():
        bundle = load_bundle(bundle_path)
        apply_tta(bundle, tta)
        table = read_dataset(data)
        if "split" not in table.columns:
            from hematoscope.data.splits import make_split

            err_console().print(f"[yellow]warning:[/] {data} has no split; making one (seed {seed}). Its val "
                                "images must not have been used to train the bundle.")
            table = make_split(table, seed=seed)
        report = fit_trust_on_table(bundle, table, max_train=max_train, seed=seed, target_tpr=target_tpr,
                                    method=method, abstain_min_confidence=abstain_min_confidence)
        target = resave_bundle(bundle, out or bundle_path)
    cal = report["calibration"]
    c = console()
    c.print(f"temperature {cal['temperature']:.3f}: ECE {cal['ece_before']:.4f} → {cal['ece_after']:.4f} "
            f"(val, n={cal['n']})")
    c.print(f"OOD {report['ood_method']}: threshold {report['ood_threshold']:.4g}, accepts "
            f"{report['val_ood_accept_rate']:.1%} of val (fitted on {report['n_train']} train images)")
    acc = report["val_accuracy_accepted"]
    c.print(f"abstain below confidence {report['abstain_threshold']:.3f} ({report['abstain_rule']}): val coverage "
            f"{report['val_coverage']:.1%}, accuracy answered {'n/a' if acc is None else f'{acc:.2%}'}")
    c.print(f"saved {target}")


@trust_app.command("eval")
def eval_cmd(
    bundle_path: Annotated[Path, typer.Argument(metavar="BUNDLE", help="Bundle directory or .zip.")],
    data: Annotated[Path, typer.Argument(metavar="DATA", help="In-distribution labelled data (folder, or split "
                                                               "CSV: its test rows).")],
    ood: Annotated[Path, typer.Option("--ood", help="Folder of out-of-distribution images.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for trust_eval.json and the plots.")],
    tta: TtaOption = None,
) -> None:
    """AUROC and FPR at 95 % TPR of OOD vs DATA, plus the risk-coverage curve."""
    from hematoscope.bundle.base import load_bundle
    from hematoscope.trust.evaluation import evaluate_ood

    with user_errors():
        bundle = load_bundle(bundle_path)
        apply_tta(bundle, tta)
        report = evaluate_ood(bundle, data, ood, plots_dir=out)
    c = console()
    m, rc = report["ood"], report["risk_coverage"]
    c.print(f"score: {report['score']}")
    c.print(f"OOD vs in-distribution: AUROC {m['auroc']:.4f}, FPR@95%TPR {m['fpr_at_95_tpr']:.4f} "
            f"({m['n_ood']} OOD, {m['n_in']} in-distribution images)")
    if report["at_threshold"]:
        t = report["at_threshold"]
        c.print(f"at the bundle threshold: {t['in_accept_rate']:.1%} in-distribution accepted, "
                f"{t['ood_flag_rate']:.1%} OOD flagged")
    c.print(f"accuracy {report['accuracy']:.4f}; at 90 % coverage {rc['accuracy_at_90_coverage']:.4f}; "
            f"AURC {rc['aurc']:.4f}; ECE {report['ece']:.4f}")
    c.print(f"wrote {out}/trust_eval.json and plots")


@trust_app.command("make-ood")
def make_ood_cmd(
    kind: Annotated[str, typer.Argument(help="noise, flat, text, fractal, stripes, not_cells (mix), blur, "
                                             "overexposed, stain_shift, corrupted (mix).")],
    out: Annotated[Path, typer.Argument(help="Folder to write PNGs and ood_manifest.json into.")],
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 100,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    size: Annotated[int, typer.Option(help="Side of generated (not-cell) images.")] = 128,
    source: Annotated[Optional[Path], typer.Option(help="Folder of real cell images (for corruptions).")] = None,
) -> None:
    """Generate an honestly labelled out-of-distribution test set."""
    from hematoscope.trust.ood_sets import make_ood_set

    with user_errors():
        files = make_ood_set(kind, out, n=n, seed=seed, size=size, source=source)
    console().print(f"wrote {len(files)} {kind} images to {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(trust_app, name="trust")
