"""The model card (README.md inside a bundle), generated from the bundle's own config and
metrics so it can never disagree with them."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hematoscope.bundle.base import Bundle


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _pct(v) -> str:
    return f"{v:.1%}" if isinstance(v, float) else str(v)


def shares_in_words(shares: dict[str, float]) -> str:
    """{class: share} as "neutrophil 58%, lymphocyte 28%, ...", largest first."""
    return ", ".join(f"{k} {v:.0%}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]))


def _mix(tuning: dict) -> str:
    """The class mix tuning held the mean answer to, in words."""
    mix = tuning.get("class_mix")
    if not isinstance(mix, dict):  # "uniform", or tuned before the mix was recorded
        return "equal shares"
    return f"the class mix estimated from these images ({shares_in_words(mix)})"


def _framing(share: float) -> str:
    return ("the whole" if share == 1 else f"the centre {share:.0%}" if share < 1
            else f"a frame {share:g} times the size (padded with the image's white point, its background)")


def _adaptation_lines(a: dict | None, c) -> list[str]:
    if not a:
        return []
    return [
        "## Adapted to a new lab",
        f"Adapted from `{a.get('adapted_from')}` on {a.get('date')} to {a.get('images')} unlabelled images of "
        f"'{a.get('source')}' (content sha256 {a.get('images_sha256')}; {a.get('skipped', 0)} unreadable skipped).",
        f"- changed: {(a.get('statistics') or {}).get('method', 'no normalisation statistics')}; the out-of-distribution "
        "reference and threshold were refitted on these images.",
        (f"- the network was tuned on these images without labels ({a['tuning'].get('method')}, "
         f"{a['tuning'].get('epochs')} epochs) among {', '.join(a.get('classes') or [])}, in {_mix(a['tuning'])}; "
         "labels, classifier layer, colour canonicalisation, temperature and abstain rule are as trained."
         if a.get("tuning") else
         "- weights, labels, colour canonicalisation, temperature and abstain rule are as trained."),
        *([f"- framing: the model sees {_framing(a['framing']['framing'])} of each crop (of the framings tried, "
           "the one where these images look most like the training data)"] if a.get("framing") else []),
        *([f"- the lab's crops hold {', '.join(a['classes'])}: the model answers among these by default "
           "(`predict --classes` changes that)."] if a.get("classes") and len(a["classes"]) < len(c.labels) else []),
        *([f"- its per-view trust and adaptive-view cascade (fitted on the source lab's labelled cells) were "
           f"dropped: it runs {a.get('views', c.tta)} fixed view(s) until `hematoscope trust fit` on a labelled split "
           "of this lab"] if a.get("per_view_trust_dropped") else []),
        f"- share of these images accepted as like the training data before adapting: {_pct(a.get('accepted_before'))}",
        f"- answered with confidence after adapting: {_pct(a.get('answered_confidently'))}",
        "- the metrics below were measured before adaptation, on the source lab's images.",
        "",
    ]


def model_card(bundle: "Bundle") -> str:
    c = bundle.config
    m = bundle.metrics
    lines = [
        f"# {c.name} ({c.kind} bundle)",
        "",
        f"Made with hematoscope {c.hematoscope_version} on {c.created}"
        + (f"; adapted to {c.adaptation.get('source')!r} on {c.adaptation['date']}" if c.adaptation and
           c.adaptation.get("date") else "") + f". Format version {c.format_version}.",
        "",
        "## Intended use",
        c.intended_use,
        "",
        "## Classes (output index order)",
        "",
        "| index | label |",
        "|---|---|",
        *[f"| {i} | {lab} |" for i, lab in enumerate(c.labels)],
        "",
        "## Input",
        f"RGB image, any size → {bundle.preprocess.size} px ({bundle.preprocess.resize}, "
        f"{bundle.preprocess.interpolation}), mean {list(bundle.preprocess.mean)}, std {list(bundle.preprocess.std)}.",
        *([f"Colour canonicalisation: {bundle.preprocess.colour} (each channel's 1st/99th percentiles mapped onto "
           f"{list(bundle.preprocess.colour_ref)})."] if bundle.preprocess.colour != "none" else []),
        *(["Black bars along an image's edges (padding where a crop ran past its slide image) are painted "
           "with the image's white point before anything else."] if bundle.preprocess.bars == "fill" else []),
        *([f"Framing: {_framing(bundle.preprocess.framing)} of each image, before resizing."]
          if bundle.preprocess.framing != 1 else []),
        "",
        "## Model",
        *[f"- {k}: {_fmt(v)}" for k, v in c.model.model_dump().items()],
        "",
        "## Training",
        *[f"- {k}: {_fmt(v)}" for k, v in c.training.model_dump().items() if not isinstance(v, (dict, list))],
        *([f"- data sources: {', '.join(c.data_sources)}"] if c.data_sources else []),
        "",
        *_adaptation_lines(c.adaptation, c),
        "## Trust",
        f"- temperature: {c.temperature:.4f}",
        f"- abstain below calibrated confidence: {c.abstain_threshold:.3f}",
        f"- out-of-distribution scorer: "
        f"{ {k: v for k, v in c.ood.model_dump().items() if k != 'accept_levels'} if c.ood else 'none fitted'}",
        *_operating_point_lines(c),
        f"- test-time views averaged per image: {c.tta}"
        + (" when a fixed view count is asked for" if c.cascade else ""),
        *_view_trust_lines(c),
        *([f"- framing search: a cell flagged as unlike the training data on its whole crop is tried again at "
           f"{', '.join(f'{z:g}' for z in c.reframe.zooms)} of its side (below 1 its centre, above 1 padded) and "
           "answered from the framing that looks most like the training data (a padded one only when it brings the "
           f"OOD score {c.reframe.out_margin:g} under the threshold)"
           + (f"; a crop whose stained-nucleus share says it is framed {c.reframe.size_gate:g}x tighter than the "
              f"training crops (median share {c.reframe.size_ref:.3f}) or more is also tried padded to their size"
              if c.reframe.size_ref else "")] if c.reframe else []),
        "",
        "## Metrics",
    ]
    split = m.get("split", "unspecified split")
    scalars = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if scalars:
        lines += [f"Measured on: {split}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in scalars.items()]
    else:
        lines.append("No metrics recorded.")
    per_class = m.get("per_class")
    if isinstance(per_class, dict):
        lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for lab, d in per_class.items():
            lines.append(f"| {lab} | {_fmt(d.get('precision'))} | {_fmt(d.get('recall'))} | "
                         f"{_fmt(d.get('f1'))} | {d.get('support')} |")
    cm = m.get("confusion_matrix")
    if isinstance(cm, list):
        lines += ["", "Confusion matrix (rows = true, columns = predicted, order as above):", "", "```"]
        lines += [" ".join(f"{v:5d}" for v in row) for row in cm]
        lines.append("```")
    lines += [
        "",
        "## Limits",
        "- Trained on the data sources above; other stains, scanners or magnifications shift the "
        "input distribution: check the out-of-distribution flag and validate locally.",
        "- Single-cell crops only; not for whole slides or cell counting from fields of view.",
        "",
    ]
    return "\n".join(lines)


def _operating_point_lines(c) -> list[str]:
    """Where the OOD flag is set and where it can be moved (``--ood-accept``)."""
    levels = c.ood.accept_levels if c.ood else None
    if not levels:
        return []
    shares = ", ".join(f"{float(q):.1%}" for q in levels)
    now = f"moved after fitting to accept {c.ood_accept:.1%}" if c.ood_accept is not None else "as fitted"
    return [f"- out-of-distribution flag: {now}; `--ood-accept` moves it to accept {shares} of the validation "
            "images (thresholds stored per view count)"]


def _view_trust_lines(c) -> list[str]:
    """The per-view trust table and the cascade rule, when fitted."""
    lines = []
    if c.view_trust:
        lines += ["", "Trust fitted per view count (validation images):", "",
                  "| views | temperature | OOD threshold | answered | accuracy | accuracy answered |",
                  "|---|---|---|---|---|---|"]
        for v, e in sorted(c.view_trust.items(), key=lambda kv: int(kv[0])):
            val = e.val
            lines.append(f"| {v} | {e.temperature:.4f} | {_fmt(e.ood_threshold)} | {_fmt(val.get('answered'))} | "
                         f"{_fmt(val.get('accuracy'))} | {_fmt(val.get('accuracy_answered'))} |")
    if c.cascade:
        r, val = c.cascade, c.cascade.val
        gate = f"calibrated confidence < {_fmt(r.min_confidence)}" + (
            f" or OOD score > {_fmt(r.max_ood)}" if r.max_ood is not None else "")
        lines += ["", f"Default: adaptive views. Every cell gets {r.fast_views} view; cells with {gate} "
                      f"(and OOD score up to {_fmt(r.reject_ood)}) get {r.slow_views}. On validation images "
                      f"{_fmt(val.get('slow_share'))} took the slow path; accuracy {_fmt(val.get('accuracy'))}, "
                      f"abstained {_fmt(val.get('abstained'))}."]
    return lines
