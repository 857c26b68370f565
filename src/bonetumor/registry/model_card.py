"""The model card of a registered version: a Markdown page for people and a metadata document for programs.

The page follows the sections of Mitchell et al. 2019, "Model Cards for Model Reporting" (model details, intended
use, factors, metrics, evaluation and training data, quantitative analyses, ethical considerations, caveats and
recommendations), plus what changed since the champion it was compared with. The machine-readable part uses the
keys of MONAI bundles' ``metadata.json`` (``version``, ``changelog``, ``task``, ``description``, ``data_source``,
``label_classes``, ``eval_metrics``, ``intended_use``, ``network_data_format`` ...) so that tools that read those
find what they expect.

The card is built by one pure function, :func:`build_model_card`, from :class:`CardSources`: plain documents that
registration has at hand (the evaluation's report of the winner and of the baseline, the bundle's metadata, the
data counts, the gate's record, the previous champion's tags). Registration logs those sources beside the card
(``model_card/card_sources.json``) so that a later release of this code can render the same card again
(``bonetumor model-card VERSION``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scipy.stats import binomtest

from bonetumor.errors import ArtifactError
from bonetumor.registry.gate import GATE_PREFIX
from bonetumor.registry.tracking import TAG_PREFIX
from bonetumor.utils import write_json

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from bonetumor.config import Config
    from bonetumor.registry.gate import GateMetrics

log = logging.getLogger(__name__)

#: Folder of the refit run's artifacts that holds the card.
CARD_DIR = "model_card"
CARD_MD = "model_card.md"
CARD_JSON = "model_card.json"
CARD_SOURCES = "card_sources.json"
#: Version tag naming the logged card (``runs:/<refit run>/model_card/model_card.md``).
CARD_TAG = "bonetumor.model_card"
#: The schema the card's metadata follows (MONAI bundle metadata keys, plus ``bonetumor`` for the rest).
METADATA_SCHEMA = "bonetumor-model-card/1 (MONAI bundle metadata keys)"
PAPER = (
    "Arunachalam HB et al. (2019) Viable and necrotic tumor assessment from whole slide images of osteosarcoma "
    "using machine-learning and deep-learning models. PLoS ONE 14(4): e0210706"
)
DATA_SOURCE = (
    "TCIA Osteosarcoma-Tumor-Assessment (Leavey et al. 2019, https://doi.org/10.7937/tcia.2019.bvhjhdas), "
    "CC BY 3.0; the full collection holds 1144 tiles of 4 patients"
)


@dataclasses.dataclass(frozen=True)
class CardSources:
    """Everything a model card is built from, as plain JSON-able data.

    Attributes:
        model: ``name``, ``version``, ``alias``, ``run_id`` (refit run), ``cv_run_id``, ``registered_at`` (UTC).
        metadata: The bundle's metadata (``ModelMetadata`` as a dict: arch, classes, sizes, normalisation,
            provenance, library versions, referral rule, input checks, runtime).
        scores: The evaluation's report of the registered architecture (``reports/<arch>.json``): pooled
            per-class figures, ``fold_summary`` with intervals, ``calibration``, ``referral``.
        baseline: The same report of the colour-histogram baseline on the same folds, or None.
        baseline_what: One line describing the baseline.
        others: Other architectures' ``fold_f1_macro_mean`` and ``accuracy`` on the same folds.
        data: ``tiles``, ``slides``, ``patients``, ``per_class`` (real tiles), ``data_version``, ``dvc_md5``,
            ``restore`` (the restore commands), ``synthetic`` (the balance stage's decision) and ``group_by``.
        test: Figures on the held-out test tiles, or None when the split kept none.
        gate: The champion gate's record (``gate_document``).
        previous: The champion the gate compared with (its tags: version, arch, figures, data version, params
            hash, commit, init), or None for a first registration.
        settings: ``target_class``, ``target_recall``, ``max_error``, ``confidence_level``.
        training: The recipe of the registered architecture (``train`` params: optimizer, lr, scheduler, label
            smoothing, trainable layers...); empty when not recorded.
    """

    model: dict[str, Any]
    metadata: dict[str, Any]
    scores: dict[str, Any]
    baseline: dict[str, Any] | None
    baseline_what: Any
    others: dict[str, dict[str, Any]]
    data: dict[str, Any]
    test: dict[str, Any] | None
    gate: dict[str, Any]
    previous: dict[str, Any] | None
    settings: dict[str, Any]
    training: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``card_sources.json``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "card sources") -> CardSources:
        """Rebuild sources from :meth:`to_dict`'s output.

        Raises:
            ArtifactError: A field is missing.
        """
        fields = dataclasses.fields(cls)
        names = [f.name for f in fields]
        required = [
            f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [n for n in required if n not in data]
        if missing:
            raise ArtifactError(f"{source}: missing field(s) {missing}; expected {names}")
        return cls(**{n: data[n] for n in names if n in data})


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """A rendered card: titled Markdown sections and the machine-readable metadata."""

    title: str
    sections: tuple[tuple[str, str], ...]
    metadata: dict[str, Any]

    def to_markdown(self) -> str:
        """The card as one Markdown page."""
        parts = [f"# {self.title}", ""]
        for heading, body in self.sections:
            parts += [f"## {heading}", "", body.strip(), ""]
        return "\n".join(parts)

    def to_metadata(self) -> dict[str, Any]:
        """The machine-readable card (MONAI bundle metadata keys)."""
        return self.metadata


def _pct(value: Any, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * float(value):.{digits}f}%"


def _num(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{float(value):.{digits}f}"


def _interval(summary: dict[str, Any] | None) -> str:
    """``mean [low, high]`` of a fold summary, or the mean alone when the folds were too few for an interval."""
    if not summary or summary.get("mean") is None:
        return "n/a"
    if summary.get("ci_low") is None:
        return f"{_num(summary['mean'])} (n={summary.get('n', '?')}, no interval)"
    return f"{_num(summary['mean'])} [{_num(summary['ci_low'])}, {_num(summary['ci_high'])}]"


def wilson_interval(successes: int, trials: int, level: float) -> tuple[float, float] | None:
    """Wilson score interval of a proportion (None with no trials)."""
    if trials <= 0:
        return None
    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def _pooled_interval(successes: int, trials: int, level: float) -> str:
    ci = wilson_interval(successes, trials, level)
    if ci is None:
        return "n/a (no tiles)"
    return f"{_num(successes / trials)} [{_num(ci[0])}, {_num(ci[1])}] ({successes}/{trials})"


def _per_class_counts(scores: dict[str, Any], classes: list[str]) -> dict[str, dict[str, int]]:
    """True positives, actual and predicted counts per class, from the pooled confusion matrix."""
    matrix = scores.get("confusion_matrix") or []
    out = {}
    for i, name in enumerate(classes):
        row = matrix[i] if i < len(matrix) else []
        column = [r[i] for r in matrix if i < len(r)]
        out[name] = {"tp": int(row[i]) if i < len(row) else 0, "actual": int(sum(row)), "predicted": int(sum(column))}
    return out


def _model_details(src: CardSources) -> str:
    meta, model, prov = src.metadata, src.model, src.metadata.get("provenance", {})
    libraries = ", ".join(f"{k} {v}" for k, v in sorted((meta.get("versions") or {}).items()))
    runtime = meta.get("runtime") or {}
    return "\n".join(
        [
            f"- **Model**: `{model['name']}` version {model['version']}, registered {model.get('registered_at', '')} "
            f"as `@{model.get('alias', '')}`.",
            f"- **Architecture**: torchvision `{meta.get('arch')}`, with a dropout {meta.get('dropout')} head over "
            f"{len(meta.get('classes', []))} classes: {', '.join(meta.get('classes', []))}.",
            f"- **Initialisation**: {_init_text(prov.get('init', ''))}",
            f"- **Training**: refit on every training tile for {prov.get('refit_steps', '?')} optimiser steps "
            f"(the folds' median best step); {_recipe(src.training)}; params hash `{prov.get('params_hash', '?')}`.",
            f"- **Input**: an RGB H&E tile, resized to {meta.get('tile_size')} px, "
            f"{meta.get('test_crops')} test-time crop(s) of "
            f"{meta.get('input_size')} px{' with flips' if meta.get('test_flips') else ''}, "
            f"{'stain-normalised, ' if meta.get('stain') else ''}ImageNet-normalised.",
            f"- **Served by**: {runtime.get('engine', 'torch')} ({runtime.get('reason', 'no ONNX export')}).",
            f"- **Runs**: refit `{model.get('run_id')}`, cross-validation `{model.get('cv_run_id')}`; "
            f"commit `{prov.get('git_commit', '?')}`. `bonetumor lineage models:/{model['name']}/{model['version']}` "
            "prints the whole chain.",
            f"- **Libraries**: {libraries or 'not recorded'}.",
            f"- **Method**: after {PAPER}.",
            "- **Licence of the data**: CC BY 3.0 (TCIA); cite the collection when you use this model.",
        ]
    )


def _recipe(train: dict[str, Any]) -> str:
    """The training recipe in one phrase, from the ``train`` params."""
    if not train:
        return "cross-entropy (the recipe was not recorded with this card)"
    layers = {"all": "all layers", "top": "the top block and the head", "head": "the head only"}
    warm = f", the head alone for {train['head_steps']} steps first" if train.get("head_steps") else ""
    return (
        f"{train.get('optimizer', '?')} at lr {train.get('lr', '?')} with a {train.get('scheduler', '?')} schedule, "
        f"weight decay {train.get('weight_decay', '?')}, cross-entropy with label smoothing "
        f"{train.get('label_smoothing', '?')}, batch {train.get('batch_size', '?')}, training "
        f"{layers.get(str(train.get('trainable')), str(train.get('trainable', '?')))}{warm}, the project's "
        "augmentation policy"
    )


def _init_text(init: str) -> str:
    if init.startswith("imagenet"):
        return f"transfer learning from ImageNet weights (`{init}`)."
    if init.startswith("scratch"):
        return (
            f"**from scratch** (`{init}`): no ImageNet weights were available, so the figures below are those of "
            "a network that learned only from these tiles."
        )
    return f"`{init or 'not recorded'}`."


def _intended_use(src: CardSources) -> str:
    target = src.settings.get("target_class", "")
    return "\n".join(
        [
            "**Intended use.** Decision support for pathologists assessing osteosarcoma resections after "
            "neoadjuvant chemotherapy: it labels H&E tiles as Non-Tumor, Non-Viable-Tumor (necrosis) or "
            "Viable-Tumor, estimates the necrotic share of the tumour over a whole slide, and **refers** to a "
            f"pathologist every tile its calibrated confidence does not support (the rule protects `{target}`). "
            "Every answer names the model version, its run and the request id, so that it can be audited.",
            "",
            "**Not for:**",
            "- a diagnosis, a grade or a treatment decision without a pathologist's review;",
            "- other tumours, other stains (IHC, frozen sections), other magnifications or tile sizes than those "
            "it was trained on, or cytology;",
            "- tiles the service answers with `referral.refer = true`: those are the model saying it does not know;",
            "- ranking patients or predicting survival: it was never trained or validated for that.",
            "",
            "**Users**: pathologists and their ML platform teams; applications calling the service's `/predict`.",
        ]
    )


def _factors(src: CardSources) -> str:
    data = src.data
    return (
        f"Tiles from one slide look alike, so every split groups tiles by `{data.get('group_by', 'slide')}`: no "
        "slide (and, when grouped by patient, no patient) is on both sides of a fold. The relevant factors are the "
        "scanner and staining protocol (one centre here), the patient (only "
        f"{data.get('patients', '?')} patients), the chemotherapy response, and tile quality (blur, folds, "
        "little tissue: the service refers a tile with less tissue than validation required of training tiles). "
        "Performance is not broken down by age, sex or ethnicity: the collection does not record them per tile."
    )


def _metrics_section(src: CardSources) -> str:
    level = float(src.settings.get("confidence_level", 0.95))
    return (
        "Accuracy and per-class precision, recall and F1, from out-of-fold predictions of a grouped k-fold "
        "cross-validation (each tile predicted once, by a model that never saw its slide). The model is ranked "
        "by the **mean per-fold macro-F1**; its interval is a Student-t interval over the folds at "
        f"{level:.0%}, the figure that respects the grouping. Per-class intervals are Wilson intervals over the "
        "pooled out-of-fold tiles: they treat tiles as independent, and tiles of one slide are not, so they are "
        "narrower than the truth. Calibration is the expected calibration error before and after temperature "
        "scaling; the referral rule is reported as coverage (the share of tiles answered without referral) and "
        "the error among accepted tiles, with its upper bound."
    )


def _data_section(src: CardSources) -> str:
    data = src.data
    per_class = ", ".join(f"{k} {v}" for k, v in (data.get("per_class") or {}).items())
    synthetic = data.get("synthetic") or {}
    lines = [
        f"- **Source**: {DATA_SOURCE}.",
        f"- **This version's data**: {data.get('tiles', '?')} real tiles ({per_class}) from "
        f"{data.get('slides', '?')} slides of {data.get('patients', '?')} patients.",
        f"- **Data version**: `{data.get('data_version', '?')}` (content hash of the manifest); DVC md5 "
        f"`{data.get('dvc_md5') or 'not recorded'}`.",
        f"- **Synthetic tiles**: {'used' if synthetic.get('use_synthetic') else 'not used'} in training. "
        f"The balance stage's decision: {synthetic.get('reason', 'not recorded')}. Evaluation figures are on real "
        "tiles only.",
    ]
    restore = data.get("restore") or {}
    if restore.get("commands"):
        lines.append("- **Restore the exact tiles**: `" + " && ".join(restore["commands"]) + "`")
    elif restore.get("reason"):
        lines.append(f"- **Restore**: {restore['reason']}")
    if src.test:
        lines.append(
            f"- **Held-out test tiles**: {sum(v.get('support', 0) for v in src.test.get('per_class', {}).values())} "
            "tiles of slides no fold, GAN or refit saw."
        )
    else:
        lines.append("- **Held-out test tiles**: none (`split.test_fraction` is 0); the figures are out-of-fold.")
    return "\n".join(lines)


def _quantitative(src: CardSources) -> str:
    scores, level = src.scores, float(src.settings.get("confidence_level", 0.95))
    classes = list(src.metadata.get("classes") or scores.get("per_class", {}).keys())
    summary = scores.get("fold_summary", {})
    lines = [
        f"Out-of-fold, {sum(c['actual'] for c in _per_class_counts(scores, classes).values())} tiles; "
        f"intervals at {level:.0%}.",
        "",
        "| | this model | baseline |",
        "|---|---|---|",
        f"| mean per-fold macro-F1 | {_interval(summary.get('f1_macro'))} | "
        f"{_interval((src.baseline or {}).get('fold_summary', {}).get('f1_macro'))} |",
        f"| mean per-fold accuracy | {_interval(summary.get('accuracy'))} | "
        f"{_interval((src.baseline or {}).get('fold_summary', {}).get('accuracy'))} |",
        f"| pooled accuracy | {_num(scores.get('accuracy'))} | {_num((src.baseline or {}).get('accuracy'))} |",
        "",
        f"Baseline: {_baseline_text(src.baseline_what)}.",
        "",
        *_per_class_table("This model, per class", scores, classes, level),
    ]
    if src.baseline:
        lines += ["", *_per_class_table("Baseline, per class", src.baseline, classes, level)]
    if src.others:
        lines += [
            "",
            "Other architectures on the same folds: "
            + "; ".join(
                f"{name} mean per-fold macro-F1 {_num(o.get('fold_f1_macro_mean'))}, accuracy {_num(o.get('accuracy'))}"
                for name, o in sorted(src.others.items())
            )
            + ".",
        ]
    if src.test:
        lines += ["", *_test_lines(src.test)]
    return "\n".join(lines)


def _baseline_text(what: Any) -> str:
    """The baseline in words (the evaluation records it as a dict: model, trees, features, tile size, stain)."""
    if not what:
        return "not scored on these folds"
    if not isinstance(what, dict):
        return str(what)
    stain = "stain-normalised" if what.get("stain_normalization") else "no stain normalisation"
    return (
        f"a {what.get('model', 'model')} of {what.get('trees', '?')} trees on {what.get('features', '?')}, tiles at "
        f"{what.get('tile_size', '?')} px, {stain}, cross-validated on the same folds"
    )


def _per_class_table(title: str, scores: dict[str, Any], classes: list[str], level: float) -> list[str]:
    counts, per_class = _per_class_counts(scores, classes), scores.get("per_class", {})
    summary = scores.get("fold_summary", {})
    rows = [
        f"**{title}**",
        "",
        "| class | tiles | precision | recall | F1 | recall per fold |",
        "|---|---|---|---|---|---|",
    ]
    for name in classes:
        c, figures = counts[name], per_class.get(name, {})
        rows.append(
            f"| {name} | {c['actual']} | {_pooled_interval(c['tp'], c['predicted'], level)} | "
            f"{_pooled_interval(c['tp'], c['actual'], level)} | {_num(figures.get('f1'))} | "
            f"{_interval(summary.get(f'recall_{name}'))} |"
        )
    return rows


def _test_lines(test: dict[str, Any]) -> list[str]:
    per_class = ", ".join(f"{k} recall {_num(v.get('recall'))}" for k, v in test.get("per_class", {}).items())
    return [
        f"On the held-out test tiles: accuracy {_num(test.get('accuracy'))}, macro-F1 {_num(test.get('f1_macro'))}"
        f" ({per_class}); the referral rule accepted {_pct(test.get('referral_coverage'))} of them, "
        f"{_num(test.get('accepted_accuracy'))} of those correctly."
    ]


def _calibration_section(src: CardSources) -> str:
    calibration, referral = src.scores.get("calibration", {}), src.scores.get("referral", {})
    target = src.settings.get("target_class", "")
    met = referral.get("target_met")
    lines = [
        f"- **Calibration**: temperature {_num(calibration.get('temperature'), 3)}"
        f"{' (at the bound of its search: treat with care)' if calibration.get('temperature_at_bound') else ''}; "
        f"expected calibration error {_num(calibration.get('ece_before'))} before, "
        f"{_num(calibration.get('ece_after'))} after.",
        _rule_line(referral),
        f"- **Coverage**: {_pct(referral.get('coverage'))} of out-of-fold tiles are answered; accuracy among them "
        f"{_num(referral.get('accepted_accuracy'))}, accepted error at most "
        f"{_num(referral.get('accepted_error_upper'))} at {_pct(referral.get('confidence'), 0)} confidence "
        f"(target: at most {_num(referral.get('max_error'))}).",
        f"- **Protected class** `{target}`: recall among accepted tiles {_num(referral.get('accepted_target_recall'))}"
        f", lower bound {_num(referral.get('accepted_recall_lower'))} (target: {src.settings.get('target_recall')}).",
        f"- **Targets met**: {'yes' if met else 'no'}."
        + (
            ""
            if met
            else " The rule could not reach its error and recall targets on these tiles, so it refers "
            "more tiles (possibly all): do not trust an answer of this version without review."
        ),
    ]
    return "\n".join(lines)


def _rule_line(referral: dict[str, Any]) -> str:
    if not referral.get("coverage"):
        return (
            "- **Referral rule**: **every tile is referred** to a pathologist: no confidence threshold left "
            "accepted out-of-fold tiles that met the error and recall targets by their bounds."
        )
    return (
        f"- **Referral rule**: a tile is answered when its calibrated confidence is at least "
        f"{_num(referral.get('confidence_threshold'))}, else referred to a pathologist."
    )


def _ethics(src: CardSources) -> str:
    return (
        "The tiles come from a public, de-identified collection (TCIA); no patient can be identified from the model "
        "or its card. The main risk is over-trust: a confident wrong answer on a slide unlike the training data "
        "(another scanner, stain or centre) could misstate the share of viable tumour, and so the grade of a "
        "patient's response to chemotherapy. The referral rule, the tissue check, the prediction log and drift "
        "monitoring (`bonetumor drift`) are there to catch that; a pathologist decides."
    )


def _caveats(src: CardSources) -> str:
    data, meta = src.data, src.metadata
    lines = [
        f"- Trained and evaluated on {data.get('tiles', '?')} tiles of {data.get('patients', '?')} patients from one "
        "centre: the intervals above are wide, and performance on other centres is unknown until measured.",
        "- It expects H&E tiles at the collection's magnification (the network sees them resized to "
        f"{meta.get('tile_size')} px); the service refuses uploads smaller than "
        f"{(meta.get('input_checks') or {}).get('min_size', '?')} px and refers tiles with too little tissue.",
    ]
    prov = meta.get("provenance", {})
    if str(prov.get("init", "")).startswith("scratch"):
        lines.append("- It was trained from scratch: expect it to be weaker than an ImageNet-initialised model.")
    gate = src.gate or {}
    if src.baseline and not _beats_baseline(src):
        lines.append(
            "- It does **not** beat the colour-histogram baseline on the same folds: prefer the baseline's figures "
            "as the bar, and read this version as a challenger."
        )
    if not gate.get("promoted", False):
        lines.append(f"- The champion gate did not make it the champion: {gate.get('reason', 'no record')}.")
    if not (src.scores.get("referral") or {}).get("target_met"):
        lines.append("- Its referral rule did not meet its targets (see above).")
    restore = data.get("restore") or {}
    if restore and not restore.get("restorable", True):
        lines.append(f"- Its data cannot be restored from the recorded commit: {restore.get('reason', '')}")
    lines.append(
        "- Recommendations: keep a pathologist in the loop for every referred tile and for the slide-level "
        "necrosis estimate; run `bonetumor drift` on the served tiles; retrain (`bonetumor retrain`) when they drift."
    )
    return "\n".join(lines)


def _beats_baseline(src: CardSources) -> bool:
    mine = src.scores.get("fold_f1_macro_mean")
    bar = (src.baseline or {}).get("fold_f1_macro_mean")
    return mine is not None and bar is not None and float(mine) > float(bar)


def _changes(src: CardSources) -> str:
    previous = src.previous
    if not previous:
        return "No version held the champion alias when this one was registered: there is nothing to compare with."
    prov = src.metadata.get("provenance", {})
    mine = {
        "arch": ("architecture", src.metadata.get("arch")),
        "init": ("initialisation", prov.get("init")),
        "data_version": ("data version", src.data.get("data_version")),
        "params_hash": ("params hash", prov.get("params_hash")),
        "git_commit": ("git commit", prov.get("git_commit")),
        "folds_digest": ("folds file", prov.get("folds_digest")),
    }
    rows = [
        f"Compared with version {previous.get('version')}, the champion when this version was registered.",
        "",
        "| | previous champion | this version |",
        "|---|---|---|",
        f"| mean per-fold macro-F1 | {_num(previous.get('fold_f1_macro_mean'))} | "
        f"{_num(src.scores.get('fold_f1_macro_mean'))} |",
        f"| protected-class recall (accepted) | {_num(previous.get('target_recall'))} | "
        f"{_num((src.scores.get('referral') or {}).get('accepted_target_recall'))} |",
    ]
    for key, (label, value) in mine.items():
        before = previous.get(key)
        mark = " (not recorded before)" if before is None else "" if before == value else " **(changed)**"
        rows.append(f"| {label} | `{before or '?'}` | `{value or '?'}`{mark} |")
    rows += ["", f"Gate: {(src.gate or {}).get('reason', 'no record')}"]
    return "\n".join(rows)


def _eval_metrics(src: CardSources) -> dict[str, Any]:
    scores = src.scores
    fold = scores.get("fold_summary", {}).get("f1_macro", {})
    referral = scores.get("referral", {})
    return {
        "fold_f1_macro_mean": scores.get("fold_f1_macro_mean"),
        "fold_f1_macro_ci": [fold.get("ci_low"), fold.get("ci_high")],
        "oof_accuracy": scores.get("accuracy"),
        "oof_f1_macro": scores.get("f1_macro"),
        "per_class": {
            k: {m: v.get(m) for m in ("precision", "recall", "f1", "support")}
            for k, v in scores.get("per_class", {}).items()
        },
        "ece_after": scores.get("calibration", {}).get("ece_after"),
        "referral_coverage": referral.get("coverage"),
        "referral_accepted_error_upper": referral.get("accepted_error_upper"),
        "referral_target_met": referral.get("target_met"),
        "baseline_fold_f1_macro_mean": (src.baseline or {}).get("fold_f1_macro_mean"),
        "test": None if not src.test else {k: src.test.get(k) for k in ("accuracy", "f1_macro")},
    }


def _metadata(src: CardSources) -> dict[str, Any]:
    meta, model = src.metadata, src.model
    prov, versions = meta.get("provenance", {}), meta.get("versions") or {}
    classes = list(meta.get("classes") or [])
    previous = (src.previous or {}).get("version")
    return {
        "schema": METADATA_SCHEMA,
        "version": str(model["version"]),
        "changelog": {
            str(model["version"]): f"registered as @{model.get('alias')}"
            + (f"; compared with champion version {previous}" if previous else "; no champion to compare with")
        },
        "monai_version": None,
        "pytorch_version": versions.get("torch"),
        "numpy_version": versions.get("numpy"),
        "optional_packages_version": {k: v for k, v in versions.items() if k not in ("torch", "numpy")},
        "name": model["name"],
        "task": "H&E tile classification (osteosarcoma: Non-Tumor, Non-Viable-Tumor, Viable-Tumor) with referral",
        "description": f"{meta.get('arch')} ({prov.get('init', 'init not recorded')}) registered as version "
        f"{model['version']} of {model['name']}",
        "authors": "bonetumor contributors",
        "copyright": "model: the bonetumor contributors; data: TCIA, CC BY 3.0",
        "data_source": DATA_SOURCE,
        "data_type": "RGB image tile (JPEG/PNG/TIFF)",
        "image_classes": "three-channel RGB H&E tile",
        "label_classes": {str(i): name for i, name in enumerate(classes)},
        "pred_classes": {str(i): name for i, name in enumerate(classes)},
        "eval_metrics": _eval_metrics(src),
        "intended_use": "decision support with referral to a pathologist; not for diagnosis without review",
        "references": [PAPER, "Mitchell et al. 2019, Model Cards for Model Reporting, FAT* '19"],
        "network_data_format": _data_format(meta, classes),
        "bonetumor": {
            "model": model,
            "data": {
                k: src.data.get(k) for k in ("tiles", "slides", "patients", "per_class", "data_version", "dvc_md5")
            },
            "init": prov.get("init"),
            "git_commit": prov.get("git_commit"),
            "params_hash": prov.get("params_hash"),
            "gate": {k: (src.gate or {}).get(k) for k in ("promoted", "reason")},
            "previous_champion": previous,
        },
    }


def _data_format(meta: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    side = meta.get("input_size")
    return {
        "inputs": {
            "image": {
                "type": "image",
                "format": "RGB",
                "modality": "histology (H&E)",
                "num_channels": 3,
                "spatial_shape": [side, side],
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": True,
                "channel_def": {"0": "R", "1": "G", "2": "B"},
                "normalisation": {"mean": meta.get("mean"), "std": meta.get("std")},
                "tile_size": meta.get("tile_size"),
            }
        },
        "outputs": {
            "pred": {
                "type": "probabilities",
                "format": "classes",
                "num_channels": len(classes),
                "spatial_shape": [1],
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": False,
                "channel_def": {str(i): name for i, name in enumerate(classes)},
            }
        },
    }


def build_model_card(src: CardSources) -> ModelCard:
    """Build the card of one registered version from its sources (pure: no I/O).

    Args:
        src: The documents the card reports (see :class:`CardSources`).

    Returns:
        The card: Mitchell et al.'s sections, what changed since the previous champion, and the metadata.

    Raises:
        ArtifactError: The sources lack the registered model's name or version.
    """
    missing = [k for k in ("name", "version") if not src.model.get(k)]
    if missing:
        raise ArtifactError(f"model card sources: model is missing {missing}; expected name and version")
    sections = (
        ("Model details", _model_details(src)),
        ("Intended use", _intended_use(src)),
        ("Factors", _factors(src)),
        ("Metrics", _metrics_section(src)),
        ("Training and evaluation data", _data_section(src)),
        ("Quantitative analyses", _quantitative(src)),
        ("Calibration and referral", _calibration_section(src)),
        ("Ethical considerations", _ethics(src)),
        ("Caveats and recommendations", _caveats(src)),
        ("Changes since the previous champion", _changes(src)),
    )
    title = f"Model card: {src.model['name']} version {src.model['version']} ({src.metadata.get('arch', '?')})"
    return ModelCard(title, sections, _metadata(src))


def write_model_card(card: ModelCard, sources: CardSources, out_dir: str | Path) -> Path:
    """Write ``model_card.md``, ``model_card.json`` and ``card_sources.json`` into ``out_dir``.

    Returns:
        The folder written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CARD_MD).write_text(card.to_markdown(), encoding="utf-8")
    write_json(out / CARD_JSON, card.to_metadata())
    write_json(out / CARD_SOURCES, sources.to_dict())
    return out


def log_model_card(sources: CardSources, out_dir: str | Path) -> dict[str, str]:
    """Build the card, write it to ``out_dir`` and log it under the active MLflow run's ``model_card/``.

    Returns:
        The version tag that names the logged card (``bonetumor.model_card``).

    Raises:
        ArtifactError: There is no active run to log it with.
    """
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise ArtifactError("a model card is logged with the registering run, and no MLflow run is active")
    folder = write_model_card(build_model_card(sources), sources, out_dir)
    mlflow.log_artifacts(str(folder), CARD_DIR)
    return {CARD_TAG: f"runs:/{run.info.run_id}/{CARD_DIR}/{CARD_MD}"}


def read_card_sources(path: str | Path) -> CardSources:
    """Read ``card_sources.json``.

    Raises:
        ArtifactError: The file is missing, not JSON, or lacks a field.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: cannot read the model card sources ({exc}); expected card_sources.json") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object of model card sources")
    return CardSources.from_dict(data, source=str(path))


def card_settings(config: Config) -> dict[str, Any]:
    """The settings a card reports its figures against (the referral targets and the interval level)."""
    return {
        "target_class": config.referral.target_class,
        "target_recall": config.referral.target_recall,
        "max_error": config.referral.max_error,
        "confidence_level": config.evaluate.confidence_level,
    }


def card_training(config: Config, arch: str) -> dict[str, Any]:
    """The training recipe of ``arch`` (its ``train`` params, per-architecture overrides applied)."""
    train = config.for_arch(arch).train
    keys = ("optimizer", "lr", "scheduler", "weight_decay", "label_smoothing", "batch_size", "trainable", "head_steps")
    return {k: getattr(train, k) for k in keys} | {"steps": train.steps, "dropout": train.dropout}


def previous_champion(model_name: str, champion: GateMetrics | None) -> dict[str, Any] | None:
    """What the card compares with: the champion's gate figures and its version tags (arch, data, params, commit).

    Returns:
        None when there was no champion.
    """
    if champion is None:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    out: dict[str, Any] = {
        "version": champion.version,
        "fold_f1_macro_mean": champion.fold_f1_macro_mean,
        "target_recall": champion.target_recall,
        "data_version": champion.data_version,
        "folds_digest": champion.folds_digest,
    }
    try:
        tags = MlflowClient().get_model_version(model_name, champion.version).tags
    except MlflowException as exc:
        log.warning("model card: the champion's tags (version %s) are unreadable: %s", champion.version, exc)
        return out
    for key in ("arch", "init", "params_hash", "git_commit"):
        out[key] = tags.get(f"{TAG_PREFIX}{key}")
    return out


def _download(run_id: str, artifact_path: str, into: Path) -> Path | None:
    """Download one artifact of a run; None when the run has no such artifact."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(into)))
    except (MlflowException, OSError):
        return None


def stored_card(version: ModelVersion) -> tuple[str, dict[str, Any]] | None:
    """The card logged with a version: its Markdown and metadata; None for a version registered without one.

    Raises:
        ArtifactError: The version's tag names a card whose files are unreadable.
    """
    uri = version.tags.get(CARD_TAG)
    if not uri or not version.run_id:
        return None
    with tempfile.TemporaryDirectory(prefix="bonetumor-card-") as tmp:
        folder = _download(version.run_id, CARD_DIR, Path(tmp))
        if folder is None or not (folder / CARD_MD).is_file():
            raise ArtifactError(
                f"version {version.version}: its tag {CARD_TAG} names {uri}, which does not download; "
                f"expected {CARD_DIR}/{CARD_MD} in run {version.run_id}"
            )
        card_json = folder / CARD_JSON
        try:
            metadata = json.loads(card_json.read_text(encoding="utf-8")) if card_json.is_file() else {}
            return (folder / CARD_MD).read_text(encoding="utf-8"), metadata
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(
                f"version {version.version}: its model card in run {version.run_id} is unreadable ({exc}); "
                f"expected UTF-8 {CARD_DIR}/{CARD_MD} and JSON {CARD_DIR}/{CARD_JSON}"
            ) from exc


def sources_from_registry(config: Config, version: ModelVersion, metadata: dict[str, Any]) -> CardSources:
    """Rebuild a version's card sources from what MLflow holds, for versions registered before model cards.

    Uses the version's logged ``card_sources.json`` when there is one; otherwise the cross-validation run's
    evaluation report (``evaluation/<arch>.json``), the refit run's ``lineage/lineage.json``, and the version's
    gate tags (only the baseline's mean per-fold macro-F1 is known then).

    Args:
        config: The project's config (model name, referral targets).
        version: The registered version.
        metadata: Its bundle's metadata (``ModelMetadata`` as a dict).

    Raises:
        ArtifactError: The cross-validation run's evaluation report cannot be downloaded.
    """
    from bonetumor.registry.gate import GateMetrics

    tags, run_id = version.tags, version.run_id or ""
    with tempfile.TemporaryDirectory(prefix="bonetumor-card-") as tmp:
        logged = _download(run_id, f"{CARD_DIR}/{CARD_SOURCES}", Path(tmp))
        if logged is not None:
            return read_card_sources(logged)
        arch, cv_run = tags.get(f"{TAG_PREFIX}arch", metadata.get("arch", "")), tags.get(f"{TAG_PREFIX}cv_run_id", "")
        report = _download(cv_run, f"evaluation/{arch}.json", Path(tmp))
        if report is None:
            raise ArtifactError(
                f"version {version.version}: its cross-validation run {cv_run or '(none tagged)'} has no "
                f"evaluation/{arch}.json; rerun `bonetumor evaluate` for it, or re-register"
            )
        scores = json.loads(report.read_text(encoding="utf-8"))
        lineage_file = _download(run_id, "lineage/lineage.json", Path(tmp))
        lineage = json.loads(lineage_file.read_text(encoding="utf-8")) if lineage_file else {}
    bar = tags.get(f"{GATE_PREFIX}candidate.baseline_fold_f1_macro_mean")
    champion_version = tags.get(f"{GATE_PREFIX}champion.version")
    champion = None
    if champion_version:
        try:
            champion = GateMetrics.from_tags(
                {
                    k.replace(f"{GATE_PREFIX}champion.", f"{GATE_PREFIX}candidate."): v
                    for k, v in tags.items()
                    if k.startswith(f"{GATE_PREFIX}champion.")
                },
                champion_version,
            )
        except ArtifactError:
            champion = None
    created = version.creation_timestamp or 0
    return CardSources(
        model={
            "name": config.register.model_name,
            "version": str(version.version),
            "alias": tags.get(f"{GATE_PREFIX}decision", ""),
            "run_id": run_id,
            "cv_run_id": cv_run,
            "registered_at": _iso(created),
        },
        metadata=metadata,
        scores=scores,
        baseline={"fold_f1_macro_mean": float(bar)} if bar else None,
        baseline_what="the colour-histogram baseline (only its mean per-fold macro-F1 was recorded)" if bar else "",
        others={},
        data={
            **(lineage.get("tiles") or {}),
            "restore": lineage.get("restore"),
            "data_version": tags.get(f"{TAG_PREFIX}data_version"),
            "dvc_md5": tags.get(f"{TAG_PREFIX}dvc_data_md5"),
            "synthetic": None,
            "group_by": config.split.group_by,
        },
        test=None,
        gate={
            "promoted": tags.get(f"{GATE_PREFIX}decision") == config.register.alias,
            "reason": tags.get(f"{GATE_PREFIX}reason", "no gate record"),
        },
        previous=previous_champion(config.register.model_name, champion),
        settings=card_settings(config),
        training=_recorded_training(lineage.get("params") or {}, arch),
    )


def _recorded_training(params: dict[str, Any], arch: str) -> dict[str, Any]:
    """The ``train`` section of the params a lineage recorded, with ``arch``'s per-architecture overrides."""
    train = dict(params.get("train") or {})
    overrides = (train.pop("per_arch", None) or {}).get(arch) or {}
    return {k: v for k, v in {**train, **overrides}.items() if not isinstance(v, (dict, list))}


def _iso(milliseconds: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(milliseconds / 1000, UTC).isoformat(timespec="seconds")
