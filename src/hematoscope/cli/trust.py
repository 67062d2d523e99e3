"""``hematoscope trust``: calibrate a bundle, fit its OOD detector, measure both, make OOD test sets."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hematoscope.cli._common import TtaOption, apply_tta, console, err_console, user_errors

trust_app = typer.Typer(help="Trust: calibration, out-of-distribution detection, abstention.", no_args_is_help=True)


@trust_app.command("fit")
def fit_cmd(
    bundle_path: Annotated[Path, typer.Argument(metavar="BUNDLE", help="Bundle directory or .zip (re-saved in place).")],
    data: Annotated[Path, typer.Argument(metavar="DATA_OR_SPLIT",
                                         help="Split CSV (uses its train and val rows), or a dataset folder "
                                              "(split here with --seed; its val part must not have been trained on). "
                                              "A bundle from `hematoscope train` needs its run's split.csv (or a "
                                              "split whose val rows it was not trained on).")],
    method: Annotated[Optional[str], typer.Option(
        help="OOD score: a registered method (hematoscope.trust.list_scorers(): knn_energy, mahalanobis, knn, "
             "isolation_forest ...; default: knn_energy when the model has features).")] = None,
    target_tpr: Annotated[float, typer.Option("--target-tpr", help="Fraction of in-distribution val images the OOD "
                                                                   "flag accepts at least.")] = 0.95,
    target_answered: Annotated[float, typer.Option(
        "--target-answered", help="Fraction of val images answered (OOD flag and abstain rule together) by every "
                                  "view count; 0 = OOD threshold at --target-tpr only.")] = 0.95,
    abstain_min_confidence: Annotated[Optional[float], typer.Option(
        "--abstain-below", help="Abstain below this calibrated confidence (default: Chow's rule, 0.75).")] = None,
    max_train: Annotated[int, typer.Option("--max-train", help="At most this many train images fit the OOD score.")] = 5000,
    allow_other_split: Annotated[bool, typer.Option(
        "--allow-other-split", help="Fit on DATA although it is not the split the bundle records having been "
                                    "trained with and its run's split.csv is not beside the bundle to check it "
                                    "against (val rows found to be training images are refused even so).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the train subset (and of the split when DATA is a folder).")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Save to this path instead of over BUNDLE.")] = None,
    tta: Annotated[Optional[int], typer.Option(
        "--tta", help="Make this many fixed views the bundle's default instead of the cascade (trust is still "
                      "fitted for every view count).")] = None,
    cascade: Annotated[bool, typer.Option("--cascade/--no-cascade", help="Fit the adaptive-view cascade and make "
                                          "it the default (bundles with views).")] = True,
    reframe_zooms: Annotated[Optional[str], typer.Option(
        "--reframe-zooms", help="Framing search for cells flagged as unlike the training data: shares of the side "
                                "to try, comma-separated, below 1 centre crops, above 1 padded frames (the shipped "
                                "model: 0.85,0.75,0.6; padded frames e.g. 1.5,2,2.5), or 'none' to turn it off (default: keep the "
                                "bundle's).")] = None,
    reframe_margin: Annotated[Optional[float], typer.Option(
        "--reframe-margin", min=0.0, help="With --reframe-zooms: how far under the OOD threshold a padded frame "
                                          "must bring a cell to be kept (default 2.0).")] = None,
    reframe_size: Annotated[Optional[bool], typer.Option(
        "--reframe-size/--no-reframe-size", help="Framing search: measure the stained-nucleus share of a seeded "
        "sample of the train images, so a flagged crop framed much tighter than them also tries a padded frame of "
        "its size (the shipped model has it), or drop that (default: keep the bundle's).")] = None,
) -> None:
    """Fit temperature, OOD score + threshold and abstain threshold on a bundle's own split.

    Every view count (1, 2, 4, 8) and the cascade are fitted from one pass of the model over all
    8 views of the train and val images.
    """
    from hematoscope.bundle.base import load_bundle
    from hematoscope.data.readers import read_dataset
    from hematoscope.models.preprocess import TTA_VIEWS
    from hematoscope.bundle.ood import list_scorers
    from hematoscope.trust.fit import fit_trust_on_table
    from hematoscope.trust.training_split import check_fit_split

    if method is not None and method not in list_scorers():
        raise typer.BadParameter(f"choose one of {', '.join(list_scorers())}", param_hint="--method")
    if tta is not None and tta not in TTA_VIEWS:
        raise typer.BadParameter(f"choose one of {', '.join(map(str, TTA_VIEWS))}", param_hint="--tta")
    zooms = _zooms(reframe_zooms)
    with user_errors():
        bundle = load_bundle(bundle_path)
        if tta is not None and tta != 1 and not bundle.supports_tta:
            raise ValueError(f"{bundle.kind!r} bundles do not support test-time views")
        table = read_dataset(data)
        made_here = "split" not in table.columns
        if made_here:
            from hematoscope.data.splits import make_split

            table = make_split(table, seed=seed)
        # a bundle from `hematoscope train` records its split: val rows it was trained on are refused
        check = check_fit_split(bundle, bundle_path, data, table, split_made_here=made_here, seed=seed,
                                allow_other=allow_other_split)
        if check.status in ("checked", "other_data"):
            err_console().print(f"note: {check.message}", highlight=False)
        elif check.status == "unchecked":
            err_console().print(f"[yellow]warning:[/] {check.message}", highlight=False)
        elif made_here and check.status == "unrecorded":
            err_console().print(f"[yellow]warning:[/] {data} has no split; making one (seed {seed}). Its val "
                                "images must not have been used to train the bundle.")
        _set_reframe(bundle, table, reframe_zooms, zooms, reframe_margin, reframe_size, seed)
        report = fit_trust_on_table(bundle, table, max_train=max_train, seed=seed, target_tpr=target_tpr,
                                    target_answered=target_answered or None,
                                    method=method, abstain_min_confidence=abstain_min_confidence,
                                    default_views=tta, cascade=cascade and tta is None)
        target = bundle.save(out or bundle_path)  # in place: only config, metrics and card change
    c = console()
    base = report["base"]
    bank = report["bank_views"]
    c.print(f"OOD {base['ood_method']} fitted on {report['n_train']} train images "
            f"({bank} view{'s' if bank > 1 else ''}); each view count's threshold accepts at least {target_tpr:.0%} "
            f"of val (n={report['n_val']})"
            + (f" and aims to answer {target_answered:.0%} of it with the abstain rule" if target_answered else "")
            + f"; abstain below confidence {base['abstain_threshold']:.3f} ({base['abstain_rule']})", highlight=False)
    for v, entry in sorted(report["views"].items(), key=lambda kv: int(kv[0])):
        trust = bundle.config.view_trust[v]
        acc = entry["accuracy_answered"]
        ood = "" if trust.ood_threshold is None else f", OOD threshold {trust.ood_threshold:.4g}"
        default = " (default)" if int(v) == report["default_views"] and not bundle.uses_cascade else ""
        why = "" if "ood_accepted" not in entry else (
            f" (set aside: {1 - entry['ood_accepted']:.1%} unlike the training data, "
            f"{entry.get('low_confidence', 0):.1%} below confidence {trust.abstain_threshold:.2f})")
        c.print(f"{v} view{'s' if int(v) > 1 else ''}{default}: temperature {trust.temperature:.3f}{ood}, ECE "
                f"{entry['ece_before']:.4f} → {entry['ece_after']:.4f}; val: answered {entry['answered']:.1%}{why}, "
                f"accuracy {entry['accuracy']:.2%}, on the answered {'n/a' if acc is None else f'{acc:.2%}'}",
                highlight=False)
    short = {v: e["answered"] for v, e in report["views"].items()
             if target_answered and e["answered"] < target_answered - 0.005}
    if short:  # the flag was capped: too few validation cells are confident enough to reach it
        err_console().print(
            f"[yellow]warning:[/] the aim of answering {target_answered:.0%} of val was not reached ("
            + ", ".join(f"{v} view{'s' if int(v) > 1 else ''}: {a:.1%}" for v, a in sorted(short.items(), key=lambda kv: int(kv[0])))
            + "): too few cells are confident above the abstain cut; the model needs more training, or a lower "
            "--abstain-below answers more of them", highlight=False)
    if report["cascade"] is not None:
        rule, val = report["cascade"], report["cascade"]["val"]
        gate = f"confidence < {rule['min_confidence']:.4g}" + (
            f" or OOD score > {rule['max_ood']:.4g}" if rule["max_ood"] is not None else "")
        c.print(f"cascade (default): {rule['fast_views']} view, {rule['slow_views']} views when {gate}: "
                f"{val['slow_share']:.1%} of val took the slow path; accuracy {val['accuracy']:.2%}, answered "
                f"{1 - val['abstained']:.1%} (accuracy {val['accuracy_answered']:.2%}); agrees with "
                f"{val.get('reference_views', rule['slow_views'])} views on "
                f"{val.get('agreement_with_reference', 1.0):.1%} of val", highlight=False)
    else:
        c.print(f"default: {report['default_views']} fixed view{'s' if report['default_views'] > 1 else ''}")
    rule = bundle.config.reframe
    if rule is not None:
        c.print(f"framing search: cells flagged on the whole crop are tried at "
                f"{', '.join(f'{z:g}' for z in rule.zooms)} of the side"
                + (f", and padded to their size when framed {rule.size_gate:g}x tighter than the train images "
                   f"(median stained share {rule.size_ref:.3f})" if rule.size_ref else ""), highlight=False)
    c.print(f"saved {target}")


def _set_reframe(bundle, table, zooms_given: str | None, zooms: list[float] | None, margin: float | None,
                 size: bool | None, seed: int) -> None:
    """Apply the --reframe-* options in one step: new zooms (and margin) replace the rule's, the
    size reference is measured (--reframe-size), dropped (--no-reframe-size) or kept as it was;
    the rule's colour changes are kept."""
    rule = bundle.config.reframe
    if zooms_given is None and size is None:
        return
    if zooms_given is None:
        zooms, margin = rule.zooms if rule else None, rule.out_margin if rule else None
    if size is not None and zooms is None:
        raise ValueError("--reframe-size/--no-reframe-size needs a framing search: give --reframe-zooms")
    size_images = None
    if size:
        from hematoscope.trust.fit import size_reference_images

        size_images = size_reference_images(table, bundle.preprocess, seed=seed)
    keep = rule.size_ref if size is None and rule is not None else None
    bundle.set_reframe(zooms, margin, size_images=size_images, size_ref=keep, colours=rule.colours if rule else ())


def _zooms(text: str | None) -> list[float] | None:
    """A ``--reframe-zooms`` value as centre-crop shares; None for 'none' (or not given)."""
    if text is None or text.strip().lower() == "none":
        return None
    try:
        return [float(z) for z in text.split(",") if z.strip()]
    except ValueError:
        raise typer.BadParameter(f"comma-separated numbers or 'none'; got {text!r}",
                                 param_hint="--reframe-zooms") from None


@trust_app.command("eval")
def eval_cmd(
    bundle_path: Annotated[Path, typer.Argument(metavar="BUNDLE", help="Bundle directory or .zip.")],
    data: Annotated[Path, typer.Argument(metavar="DATA", help="In-distribution labelled data (folder, or split "
                                                               "CSV: its test rows, or the rows --split names).")],
    ood: Annotated[Path, typer.Option("--ood", help="Folder of out-of-distribution images.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for trust_eval.json and the plots.")],
    split: Annotated[Optional[str], typer.Option(help="Rows of a split CSV to use: one of its parts (test, val, "
                                                      "train; fold_0, fold_1 ... of a k-fold file) or all (default: "
                                                      "test; a split file without test rows needs one named).")] = None,
    tta: TtaOption = None,
) -> None:
    """AUROC and FPR at 95 % TPR of OOD vs DATA, plus the risk-coverage curve."""
    from hematoscope.bundle.base import load_bundle
    from hematoscope.data.readers import read_dataset
    from hematoscope.trust.evaluation import evaluate_ood
    from hematoscope.data.splits import ALL_ROWS, SplitRowsError, select_split_rows

    with user_errors():
        bundle = load_bundle(bundle_path)
        apply_tta(bundle, tta)
        table = read_dataset(data)
        try:  # as `hematoscope evaluate` chooses them: a run's split.csv (train/val only) needs --split
            table, chosen = select_split_rows(table, split, data)
        except SplitRowsError as exc:
            raise typer.BadParameter(str(exc), param_hint=exc.param_hint) from None
        report = evaluate_ood(bundle, table, ood, plots_dir=out, rows=chosen or ALL_ROWS,
                              about={"model": bundle.name, "data": Path(data).name})
    c = console()
    m, rc = report["ood"], report["risk_coverage"]
    c.print(f"score: {report['score']}")
    c.print(f"OOD vs in-distribution: AUROC {m['auroc']:.4f}, FPR@95%TPR {m['fpr_at_95_tpr']:.4f} "
            f"({m['n_ood']} OOD, {m['n_in']} in-distribution images: "
            f"{'all rows' if report['rows'] == ALL_ROWS else report['rows'] + ' rows'} of {data})")
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
