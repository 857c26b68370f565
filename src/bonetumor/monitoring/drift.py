"""Has what the service receives drifted from what the model was trained on? Tests, decision and report.

:func:`detect_drift` compares the prediction-log records of served answers (each with the ``stats`` and
``embedding`` of :func:`bonetumor.monitoring.reference.served_features`, its ``label`` and ``referral``) with the
model's :class:`~bonetumor.monitoring.reference.DriftReference`:

* each tile statistic: a two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``), its p-values adjusted
  for the number of statistics (Holm), and the population stability index (PSI) on bins at the reference's
  quantiles. A statistic is flagged when its Holm-adjusted p < ``ks_alpha`` AND its PSI > ``psi_threshold``: the
  shift must be both real (not chance) and large (not a trivial shift that many records make significant);
* the embeddings (projected on the reference's principal components): MMD² with an RBF kernel whose bandwidth is
  the median heuristic, and a permutation p-value (fixed seed); flagged when p < ``mmd_alpha``. A classifier
  two-sample test (logistic regression told to separate reference from served, cross-validated balanced
  accuracy: 0.5 is chance) is reported beside it, never flagged: it says how separable the two sets are;
* when the reference has them, the label rates (chi-square goodness of fit) and the referral rate (exact binomial
  test); each flagged when p < ``rate_alpha``.

The batch has drifted when any test is flagged (status ``drift``, exit code 1); otherwise status ``ok`` (exit
code 0). With fewer than ``min_records`` usable records nothing is tested: status ``insufficient`` (exit code 2),
not drifted, "not enough data". Records without features (errors, whole-slide assessments) and records of another
model version than the reference's are left out and counted.

:func:`write_drift_report` writes ``drift.md`` (table and decision with reasons), ``drift.json``
(:meth:`DriftReport.to_dict`) and two figures: the statistics' distributions, reference against served, and the
first two principal components of the embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import NDArray
from scipy import stats as scipy_stats
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bonetumor.errors import ArtifactError, ConfigError
from bonetumor.monitoring.reference import DriftReference
from bonetumor.utils import write_json

Status = Literal["ok", "drift", "insufficient"]
#: Exit code of each status (``bonetumor``-style CLIs and schedulers branch on it).
EXIT_CODES: dict[str, int] = {"ok": 0, "drift": 1, "insufficient": 2}
#: Seed of the permutations, the subsamples and the classifier test's folds: a report is reproducible.
SEED = 0
#: At most this many reference and this many served embeddings enter MMD and the classifier test (subsampled with
#: :data:`SEED`): the kernel matrix stays small for a long prediction log.
MAX_EMBEDDINGS = 1000
#: PSI bins: the reference's quantiles, with at least 10 reference tiles per bin, between 2 and 10 bins.
MAX_PSI_BINS = 10
TILES_PER_PSI_BIN = 10
#: Files :func:`write_drift_report` writes.
REPORT_FILES = ("drift.md", "drift.json", "drift_statistics.png", "drift_embeddings.png")


@dataclass(frozen=True)
class DriftThresholds:
    """When a test flags drift (mirrored by the caller from the project's params).

    Attributes:
        ks_alpha: Level of the Holm-adjusted KS p-values of the statistics.
        psi_threshold: PSI a flagged statistic must also exceed (0.25 is the usual "major shift").
        mmd_alpha: Level of the embeddings' MMD permutation p-value.
        permutations: Permutations of the MMD test (its smallest p-value is ``1 / (permutations + 1)``).
        rate_alpha: Level of the label-rate and referral-rate tests.
        min_records: Fewest usable served records for a decision; fewer give status ``insufficient``.

    Raises:
        ConfigError: A level is not in (0, 1), the PSI threshold is not positive, too few permutations to reach
            ``mmd_alpha``, or ``min_records`` < 2.
    """

    ks_alpha: float = 0.01
    psi_threshold: float = 0.25
    mmd_alpha: float = 0.01
    permutations: int = 200
    rate_alpha: float = 0.01
    min_records: int = 20

    def __post_init__(self) -> None:
        for name in ("ks_alpha", "mmd_alpha", "rate_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ConfigError(f"drift thresholds: {name}={value!r}; expected a level in (0, 1)")
        if not (isinstance(self.psi_threshold, (int, float)) and self.psi_threshold > 0):
            raise ConfigError(f"drift thresholds: psi_threshold={self.psi_threshold!r}; expected a number > 0")
        if not isinstance(self.permutations, int) or 1.0 / (self.permutations + 1) >= self.mmd_alpha:
            raise ConfigError(
                f"drift thresholds: permutations={self.permutations!r} cannot give a p-value below "
                f"mmd_alpha={self.mmd_alpha} (the smallest is 1 / (permutations + 1)); expected an int > "
                f"{math.ceil(1.0 / self.mmd_alpha) - 1}"
            )
        if not isinstance(self.min_records, int) or self.min_records < 2:
            raise ConfigError(f"drift thresholds: min_records={self.min_records!r}; expected an int >= 2")

    def rule(self) -> str:
        """The decision rule in words, as the report states it."""
        return (
            f"a tile statistic drifts when its Holm-adjusted KS p < {self.ks_alpha:g} and its PSI > "
            f"{self.psi_threshold:g}; the embeddings drift when the MMD² permutation p < {self.mmd_alpha:g} "
            f"({self.permutations} permutations; the classifier two-sample test is reported, not used); the label "
            f"and referral rates drift when their test's p < {self.rate_alpha:g}; the served inputs have drifted "
            f"when any of these is flagged; fewer than {self.min_records} usable records: not enough data"
        )


@dataclass(frozen=True)
class DriftCheck:
    """One test of a drift report (a table row).

    Attributes:
        kind: ``statistic``, ``embedding``, ``label`` or ``referral``.
        name: What was compared (a statistic's name, ``embedding``, ``labels``, ``referral``).
        test: The test (``KS + PSI``, ``MMD² (RBF, permutation)``, ``C2ST (logistic regression)``, ...).
        value: The test statistic (KS D, MMD², balanced accuracy, chi-square, served referral rate).
        p_value: Its p-value (None for the classifier test).
        adjusted_p: Holm-adjusted p-value (statistics only).
        effect: PSI (statistics), total variation distance of the rates (labels); else None.
        reference: Reference mean (statistics) or rate; None where it does not apply.
        served: Served mean or rate.
        flagged: Whether this check counts as drift.
        note: What the numbers mean, in a few words.
    """

    kind: str
    name: str
    test: str
    value: float
    p_value: float | None
    adjusted_p: float | None = None
    effect: float | None = None
    reference: float | dict[str, float] | None = None
    served: float | dict[str, float] | None = None
    flagged: bool = False
    note: str = ""


@dataclass(frozen=True)
class DriftReport:
    """The outcome of :func:`detect_drift`.

    Attributes:
        status: ``ok``, ``drift`` or ``insufficient`` (not enough data: nothing was tested).
        checks: The tests, statistics first.
        reasons: Why the decision is what it is, one line per flagged test (or why there is no decision).
        rule: The decision rule (:meth:`DriftThresholds.rule`).
        thresholds: The thresholds applied.
        n_reference: Training tiles of the reference.
        n_served: Served records tested.
        skipped: Records left out, by why (``no features``, ``other model version``).
        reference_version: The model version of the reference.
        reference_created_at: When the reference was built.
    """

    status: Status
    checks: tuple[DriftCheck, ...]
    reasons: tuple[str, ...]
    rule: str
    thresholds: DriftThresholds
    n_reference: int
    n_served: int
    skipped: dict[str, int] = field(default_factory=dict)
    reference_version: str = ""
    reference_created_at: str = ""

    @property
    def drifted(self) -> bool:
        """Whether any test flagged drift."""
        return self.status == "drift"

    @property
    def exit_code(self) -> int:
        """0 for ``ok``, 1 for ``drift``, 2 for ``insufficient`` (not enough data)."""
        return EXIT_CODES[self.status]

    @property
    def flagged(self) -> list[str]:
        """Names of the flagged checks (the drifted statistics, ``embedding``, ``labels``, ``referral``)."""
        return [check.name for check in self.checks if check.flagged]

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON data."""
        return {
            "status": self.status,
            "drifted": self.drifted,
            "exit_code": self.exit_code,
            "reasons": list(self.reasons),
            "rule": self.rule,
            "flagged": self.flagged,
            "thresholds": asdict(self.thresholds),
            "n_reference": self.n_reference,
            "n_served": self.n_served,
            "skipped": dict(self.skipped),
            "reference": {"version": self.reference_version, "created_at": self.reference_created_at},
            "checks": [asdict(check) for check in self.checks],
        }


@dataclass(frozen=True)
class ServedSample:
    """The usable served records of a prediction log, as arrays in the reference's layout."""

    statistics: NDArray[np.float64]
    embeddings: NDArray[np.float64]
    records: tuple[Mapping[str, Any], ...]
    skipped: dict[str, int]


def served_sample(reference: DriftReference, records: Sequence[Mapping[str, Any]]) -> ServedSample:
    """Collect the records that carry drift features (and belong to the reference's model version).

    Raises:
        ArtifactError: A record's ``stats`` lacks a statistic or holds a non-number, or its ``embedding`` is not
            ``reference.components`` numbers (a log written with another reference).
    """
    names, k = reference.statistic_names, reference.components
    stats: list[list[float]] = []
    embeddings: list[list[float]] = []
    used: list[Mapping[str, Any]] = []
    skipped: dict[str, int] = {}
    for index, record in enumerate(records):
        version = (record.get("model") or {}).get("version") if isinstance(record.get("model"), dict) else None
        if "stats" not in record or "embedding" not in record:
            skipped["no features"] = skipped.get("no features", 0) + 1
            continue
        if reference.version and version not in (None, "", reference.version):
            skipped["other model version"] = skipped.get("other model version", 0) + 1
            continue
        where = f"prediction-log record {index} (request {record.get('request_id', '?')})"
        try:
            row = [float(record["stats"][name]) for name in names]
            embedding = [float(value) for value in record["embedding"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"{where}: malformed drift features ({type(exc).__name__}: {exc}); expected 'stats' with "
                f"{list(names)} and 'embedding' with {k} numbers (served_features)"
            ) from exc
        if len(embedding) != k or not all(map(math.isfinite, row + embedding)):
            raise ArtifactError(
                f"{where}: 'embedding' has {len(embedding)} values (or a value is not finite); the reference has "
                f"{k} components: the record was projected with another reference"
            )
        stats.append(row)
        embeddings.append(embedding)
        used.append(record)
    return ServedSample(
        statistics=np.array(stats, dtype=np.float64).reshape(-1, len(names)),
        embeddings=np.array(embeddings, dtype=np.float64).reshape(-1, k),
        records=tuple(used),
        skipped=skipped,
    )


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` (family-wise error), in their original order."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p)
    m = len(p)
    adjusted = np.minimum(np.maximum.accumulate((m - np.arange(m)) * p[order]), 1.0)
    result = np.empty(m)
    result[order] = adjusted
    return result.tolist()


def psi(reference: NDArray[Any], served: NDArray[Any], bins: int | None = None) -> float:
    """Population stability index of ``served`` against ``reference``, on bins at the reference's quantiles.

    ``sum((s - r) * ln(s / r))`` over the bins' shares; each bin's count gets half a tile added (no empty bin
    makes it infinite). ``bins`` defaults to one per :data:`TILES_PER_PSI_BIN` reference values, 2 to
    :data:`MAX_PSI_BINS`; bins that tied reference values make coincide are merged.
    """
    ref = np.asarray(reference, dtype=np.float64)
    new = np.asarray(served, dtype=np.float64)
    bins = bins or min(MAX_PSI_BINS, max(2, len(ref) // TILES_PER_PSI_BIN))
    edges = np.unique(np.quantile(ref, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    shares = []
    for values in (ref, new):
        counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1) + 0.5
        shares.append(counts / counts.sum())
    return float(np.sum((shares[1] - shares[0]) * np.log(shares[1] / shares[0])))


def _statistic_checks(
    reference: DriftReference, served: NDArray[np.float64], thresholds: DriftThresholds
) -> list[DriftCheck]:
    names = reference.statistic_names
    tests = [scipy_stats.ks_2samp(reference.statistics[:, j], served[:, j]) for j in range(len(names))]
    p_values = [float(test.pvalue) for test in tests]
    adjusted = holm(p_values)
    checks = []
    for j, name in enumerate(names):
        index = psi(reference.statistics[:, j], served[:, j])
        checks.append(
            DriftCheck(
                kind="statistic",
                name=name,
                test="KS + PSI",
                value=float(tests[j].statistic),
                p_value=p_values[j],
                adjusted_p=adjusted[j],
                effect=index,
                reference=float(reference.statistics[:, j].mean()),
                served=float(served[:, j].mean()),
                flagged=adjusted[j] < thresholds.ks_alpha and index > thresholds.psi_threshold,
                note="value: KS D; effect: PSI; reference/served: means",
            )
        )
    return checks


def _subsample(array: NDArray[np.float64], rng: np.random.Generator) -> NDArray[np.float64]:
    return array if len(array) <= MAX_EMBEDDINGS else array[rng.choice(len(array), MAX_EMBEDDINGS, replace=False)]


def mmd_test(x: NDArray[Any], y: NDArray[Any], permutations: int, seed: int = SEED) -> tuple[float, float, float]:
    """Unbiased MMD² of two samples with an RBF kernel, and its permutation p-value.

    The kernel is ``exp(-|a - b|² / h)`` with ``h`` the median squared distance between all pooled points (the
    median heuristic). The p-value is ``(1 + #{permuted MMD² >= observed}) / (1 + permutations)``, over random
    re-splits of the pooled points (``seed``).

    Args:
        x: ``(n, k)``, n >= 2.
        y: ``(m, k)``, m >= 2.
        permutations: Number of random re-splits.
        seed: Their seed.

    Returns:
        ``(mmd2, p_value, h)``.
    """
    pooled = np.concatenate([np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)])
    n, total = len(x), len(pooled)
    norms = np.sum(pooled**2, axis=1)
    squared = np.maximum(norms[:, None] + norms[None, :] - 2.0 * pooled @ pooled.T, 0.0)
    np.fill_diagonal(squared, 0.0)
    positive = squared[np.triu_indices(total, k=1)]
    positive = positive[positive > 0]
    bandwidth = float(np.median(positive)) if len(positive) else 1.0
    kernel = np.exp(-squared / bandwidth)
    rng = np.random.default_rng(seed)
    members = np.zeros((permutations + 1, total))
    members[0, :n] = 1.0
    for row in range(1, permutations + 1):
        members[row, rng.permutation(total)[:n]] = 1.0
    m = total - n
    # For a split into X (indicator a) and Y (b = 1 - a): sum over X x X of k is a'Ka, its diagonal (k = 1) is n.
    ka = members @ kernel
    within_x = np.einsum("ij,ij->i", ka, members) - n
    row_sums = kernel.sum(axis=1)
    cross = members @ row_sums - np.einsum("ij,ij->i", ka, members)
    within_y = kernel.sum() - 2.0 * cross - (within_x + n) - m
    mmd2 = within_x / (n * (n - 1)) + within_y / (m * (m - 1)) - 2.0 * cross / (n * m)
    p_value = float((1 + np.sum(mmd2[1:] >= mmd2[0])) / (1 + permutations))
    return float(mmd2[0]), p_value, bandwidth


def classifier_test(x: NDArray[Any], y: NDArray[Any], seed: int = SEED) -> float | None:
    """Cross-validated balanced accuracy of a logistic regression separating ``x`` from ``y`` (0.5: chance).

    Up to 5 stratified folds (fewer when a side has fewer points); None when a side has fewer than 2 points.
    """
    smallest = min(len(x), len(y))
    if smallest < 2:
        return None
    features = np.concatenate([x, y])
    labels = np.r_[np.zeros(len(x)), np.ones(len(y))]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced"))
    folds = StratifiedKFold(n_splits=min(5, smallest), shuffle=True, random_state=seed)
    return float(cross_val_score(model, features, labels, cv=folds, scoring="balanced_accuracy").mean())


def _embedding_checks(
    reference: DriftReference, served: NDArray[np.float64], thresholds: DriftThresholds
) -> list[DriftCheck]:
    rng = np.random.default_rng(SEED)
    x, y = _subsample(reference.embeddings, rng), _subsample(served, rng)
    mmd2, p_value, bandwidth = mmd_test(x, y, thresholds.permutations)
    accuracy = classifier_test(x, y)
    return [
        DriftCheck(
            kind="embedding",
            name="embedding",
            test="MMD² (RBF, permutation)",
            value=mmd2,
            p_value=p_value,
            flagged=p_value < thresholds.mmd_alpha,
            note=f"{reference.components} principal components; kernel bandwidth (median squared distance) "
            f"{bandwidth:.4g}; {thresholds.permutations} permutations",
        ),
        DriftCheck(
            kind="embedding",
            name="embedding (C2ST)",
            test="C2ST (logistic regression)",
            value=math.nan if accuracy is None else accuracy,
            p_value=None,
            note="cross-validated balanced accuracy separating served from reference; 0.5 is chance; "
            "reported, not used for the decision",
        ),
    ]


def _referred(record: Mapping[str, Any]) -> bool:
    referral = record.get("referral")
    return bool(referral.get("refer")) if isinstance(referral, Mapping) else bool(referral)


def _rate_checks(
    reference: DriftReference, records: Sequence[Mapping[str, Any]], thresholds: DriftThresholds
) -> list[DriftCheck]:
    checks = []
    if reference.label_rates is not None:
        classes = list(reference.label_rates)
        labels = [record["label"] for record in records if "label" in record]
        unknown = sorted({str(label) for label in labels} - set(classes))
        if unknown:
            raise ArtifactError(
                f"prediction-log labels {unknown} are not classes of the drift reference ({classes}): the records "
                "come from another model"
            )
        if labels:
            observed = np.array([labels.count(name) for name in classes], dtype=np.float64)
            rates = np.maximum(np.array([reference.label_rates[name] for name in classes]), 1e-6)
            expected = rates / rates.sum() * observed.sum()
            test = scipy_stats.chisquare(observed, expected)
            served_rates = observed / observed.sum()
            checks.append(
                DriftCheck(
                    kind="label",
                    name="labels",
                    test="chi-square goodness of fit",
                    value=float(test.statistic),
                    p_value=float(test.pvalue),
                    effect=float(0.5 * np.abs(served_rates - expected / expected.sum()).sum()),
                    reference=dict(reference.label_rates),
                    served=dict(zip(classes, map(float, served_rates), strict=True)),
                    flagged=float(test.pvalue) < thresholds.rate_alpha,
                    note=f"{len(labels)} labelled answers; effect: total variation distance of the label rates",
                )
            )
    referrals = [_referred(record) for record in records if "referral" in record]
    if reference.referral_rate is not None and referrals:
        referred = int(sum(referrals))
        p_value = float(scipy_stats.binomtest(referred, len(referrals), reference.referral_rate).pvalue)
        checks.append(
            DriftCheck(
                kind="referral",
                name="referral",
                test="exact binomial",
                value=referred / len(referrals),
                p_value=p_value,
                reference=reference.referral_rate,
                served=referred / len(referrals),
                flagged=p_value < thresholds.rate_alpha,
                note=f"{referred} of {len(referrals)} answers referred",
            )
        )
    return checks


def _reason(check: DriftCheck, thresholds: DriftThresholds) -> str:
    if check.kind == "statistic":
        return (
            f"{check.name}: served mean {check.served:.4g} vs reference {check.reference:.4g}; KS D {check.value:.3f}, "
            f"Holm-adjusted p {check.adjusted_p:.2g} < {thresholds.ks_alpha:g} and PSI {check.effect:.3f} > "
            f"{thresholds.psi_threshold:g}"
        )
    if check.kind == "embedding":
        return f"embedding: MMD² {check.value:.4g}, permutation p {check.p_value:.2g} < {thresholds.mmd_alpha:g}"
    return (
        f"{check.name} rate: served {_rate_text(check.served)} vs reference {_rate_text(check.reference)}; "
        f"{check.test} p {check.p_value:.2g} < {thresholds.rate_alpha:g}"
    )


def _rate_text(value: float | dict[str, float] | None) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{name} {rate:.0%}" for name, rate in value.items())
    return "n/a" if value is None else f"{value:.1%}"


def detect_drift(
    reference: DriftReference,
    records: Sequence[Mapping[str, Any]],
    thresholds: DriftThresholds | None = None,
) -> DriftReport:
    """Test served prediction-log records against a model's drift reference (see the module docstring).

    Args:
        reference: The served model's reference.
        records: Prediction-log records (:func:`bonetumor.serving.audit.read_prediction_log`); those with
            ``stats`` and ``embedding`` (and, if they say, of the reference's model version) are tested, their
            ``label`` and ``referral`` too.
        thresholds: The decision thresholds; None takes the defaults.

    Returns:
        The report: status ``ok`` / ``drift`` / ``insufficient``, the tests and the reasons.

    Raises:
        ArtifactError: A record's features are malformed or come from another reference or model.
    """
    thresholds = thresholds or DriftThresholds()
    sample = served_sample(reference, records)
    reason = (
        f"not enough data: {len(sample.records)} served records with drift features, fewer than the "
        f"{thresholds.min_records} a decision needs (min_records); nothing was tested"
    )
    insufficient = DriftReport(
        status="insufficient",
        checks=(),
        reasons=(reason,),
        rule=thresholds.rule(),
        thresholds=thresholds,
        n_reference=reference.n_tiles,
        n_served=len(sample.records),
        skipped=sample.skipped,
        reference_version=reference.version,
        reference_created_at=reference.created_at,
    )
    if len(sample.records) < thresholds.min_records:
        return insufficient
    checks = (
        _statistic_checks(reference, sample.statistics, thresholds)
        + _embedding_checks(reference, sample.embeddings, thresholds)
        + _rate_checks(reference, sample.records, thresholds)
    )
    reasons = tuple(_reason(check, thresholds) for check in checks if check.flagged)
    if not reasons:
        reasons = (f"no test flagged drift in {len(sample.records)} served records",)
    status: Status = "drift" if any(check.flagged for check in checks) else "ok"
    return replace(insufficient, status=status, checks=tuple(checks), reasons=reasons)


def _number(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if value != 0 and abs(value) < 10 ** (-digits):
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def _float(value: float | dict[str, float] | None) -> float | None:
    return value if isinstance(value, float) else None


def _yes(flagged: bool) -> str:
    return "**yes**" if flagged else "no"


def _markdown(report: DriftReport) -> str:
    verdict = {
        "ok": "**No drift**: the served inputs look like the training tiles.",
        "drift": "**Drift**: the served inputs differ from the training tiles.",
        "insufficient": "**Not enough data**: no decision (not drifted).",
    }[report.status]
    skipped = ", ".join(f"{count} {why}" for why, count in report.skipped.items()) or "none"
    lines = [
        "# Input drift report",
        "",
        f"Status: `{report.status}` (exit code {report.exit_code}). {verdict}",
        "",
        f"Model version {report.reference_version or 'unknown'}; reference built {report.reference_created_at or '?'}"
        f" on {report.n_reference} training tiles; {report.n_served} served records tested (left out: {skipped}).",
        "",
        "## Decision",
        "",
        *[f"- {reason}" for reason in report.reasons],
        "",
        f"Rule: {report.rule}.",
    ]
    statistics = [check for check in report.checks if check.kind == "statistic"]
    if statistics:
        lines += [
            "",
            "## Tile statistics",
            "",
            "| statistic | reference mean | served mean | KS D | p | Holm p | PSI | drift |",
            "|---|---:|---:|---:|---:|---:|---:|:---:|",
        ]
        lines += [
            f"| {c.name} | {_number(_float(c.reference))} | {_number(_float(c.served))} | {_number(c.value)} | "
            f"{_number(c.p_value)} | {_number(c.adjusted_p)} | {_number(c.effect)} | {_yes(c.flagged)} |"
            for c in statistics
        ]
    others = [check for check in report.checks if check.kind != "statistic"]
    if others:
        lines += [
            "",
            "## Embeddings and answers",
            "",
            "| check | test | value | p | drift | note |",
            "|---|---|---:|---:|:---:|---|",
        ]
        lines += [
            f"| {c.name} | {c.test} | {_number(c.value, 4)} | {_number(c.p_value)} | {_yes(c.flagged)} | {c.note} |"
            for c in others
        ]
    if report.status != "insufficient" or report.n_served:
        lines += ["", "![statistics](drift_statistics.png)", "", "![embeddings](drift_embeddings.png)"]
    return "\n".join(lines) + "\n"


def plot_statistics(
    reference: DriftReference, served: NDArray[np.float64], flagged: Sequence[str], out_png: str | Path
) -> Path:
    """Small multiples: each statistic's histogram, reference against served (densities, shared bins).

    A flagged statistic's panel title is red and says so.
    """
    names = reference.statistic_names
    columns = 4
    rows = math.ceil(len(names) / columns)
    fig = Figure(figsize=(3.2 * columns, 2.4 * rows))
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for j, (axis, name) in enumerate(zip(axes, names, strict=False)):
        pooled = np.concatenate([reference.statistics[:, j], served[:, j]])
        low, high = float(pooled.min()), float(pooled.max())
        bins = np.linspace(low, high if high > low else low + 1e-6, 21)
        axis.hist(reference.statistics[:, j], bins=bins, density=True, alpha=0.55, color="tab:blue", label="reference")
        if len(served):
            axis.hist(served[:, j], bins=bins, density=True, alpha=0.55, color="tab:orange", label="served")
        drifted = name in flagged
        axis.set_title(f"{name}{' (drift)' if drifted else ''}", fontsize=9, color="tab:red" if drifted else "black")
        axis.tick_params(labelsize=7)
        axis.set_yticks([])
    for axis in axes[len(names) :]:
        axis.set_visible(False)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Tile statistics: {len(reference.statistics)} training tiles vs {len(served)} served")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return Path(out_png)


def plot_embeddings(reference: DriftReference, served: NDArray[np.float64], out_png: str | Path) -> Path:
    """The first two principal components of the embeddings, reference against served (one: a histogram)."""
    fig = Figure(figsize=(5.5, 4.8))
    axis = fig.subplots()
    if reference.components >= 2:
        axis.scatter(
            reference.embeddings[:, 0], reference.embeddings[:, 1], s=18, alpha=0.6, color="tab:blue", label="reference"
        )
        if len(served):
            axis.scatter(served[:, 0], served[:, 1], s=18, alpha=0.6, color="tab:orange", marker="^", label="served")
        axis.set(xlabel="PC 1", ylabel="PC 2")
    else:
        axis.hist(reference.embeddings[:, 0], bins=20, density=True, alpha=0.55, color="tab:blue", label="reference")
        if len(served):
            axis.hist(served[:, 0], bins=20, density=True, alpha=0.55, color="tab:orange", label="served")
        axis.set(xlabel="PC 1", ylabel="density")
    axis.legend(fontsize=8)
    axis.set_title("Penultimate-layer embeddings on the reference's principal components", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return Path(out_png)


def write_drift_report(
    report: DriftReport, reference: DriftReference, records: Sequence[Mapping[str, Any]], out_dir: str | Path
) -> Path:
    """Write ``drift.md``, ``drift.json``, ``drift_statistics.png`` and ``drift_embeddings.png`` into ``out_dir``.

    Args:
        report: The outcome of :func:`detect_drift` on ``records``.
        reference: The reference it was tested against.
        records: The same prediction-log records (for the figures).
        out_dir: The folder (created).

    Returns:
        The path of ``drift.md``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sample = served_sample(reference, records)
    plot_statistics(reference, sample.statistics, report.flagged, out / REPORT_FILES[2])
    plot_embeddings(reference, sample.embeddings, out / REPORT_FILES[3])
    write_json(out / REPORT_FILES[1], report.to_dict())
    markdown = out / REPORT_FILES[0]
    markdown.write_text(_markdown(report), encoding="utf-8")
    return markdown
