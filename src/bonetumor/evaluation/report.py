"""The README's "Measured" figures, written from the current run's outputs, never typed by hand.

:func:`measured_markdown` reads what the pipeline wrote (``evaluate/comparison.json``, ``train/runs.json``,
``register/champion.json``) and returns a Markdown block: per model, where its weights started, the out-of-fold
accuracy and macro-F1 with their fold intervals, whether it beats the baseline, and the referral rule's coverage
and accepted accuracy; then the champion gate's decision. :func:`update_readme` puts the block between two marker
comments of a README, so ``bonetumor report --readme README.md`` after a run keeps the README true.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bonetumor.errors import ArtifactError
from bonetumor.utils import format_interval as _interval
from bonetumor.utils import format_number as _num
from bonetumor.utils import read_json

#: The README's block of figures lies between these two lines.
BEGIN = "<!-- measured:begin (written by `bonetumor report --readme README.md`; do not edit by hand) -->"
END = "<!-- measured:end -->"


def measured_markdown(outputs: str | Path, demo_time: str | None = None) -> str:
    """Return the Markdown figures of the run whose outputs lie in ``outputs``.

    Args:
        outputs: The pipeline's output folder (``outputs/``).
        demo_time: The measured wall time of ``make pipeline`` on a fresh clone, to quote (None: not quoted).

    Raises:
        ArtifactError: An output is missing or malformed (the run is incomplete: run ``make pipeline``).
    """
    outputs = Path(outputs)
    comparison = read_json(outputs / "evaluate" / "comparison.json", "architecture comparison")
    champion = read_json(outputs / "register" / "champion.json", "registration record")
    try:
        scores: dict[str, Any] = comparison["scores"]
        ranking: list[str] = comparison["ranking"]
        candidates: list[str] = comparison.get("candidates", [])
        init: dict[str, str] = comparison.get("init", {})
        baseline = (comparison.get("baseline") or {}).get("name")
        beats: dict[str, bool] = comparison.get("beats_baseline", {})
        gate = champion["gate"]
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{outputs}: the run's outputs lack {exc}; rerun `make pipeline`") from exc
    level = next(iter(scores.values()))["fold_summary"]["f1_macro"]["level"]
    n_folds = next(iter(scores.values()))["fold_summary"]["f1_macro"]["n"]
    lines = [
        f"Out-of-fold predictions of grouped {n_folds}-fold cross-validation on the sample (folds by slide); "
        f"per-fold means with {level:.0%} t intervals over the folds, clipped to [0, 1]. CPU ms/tile: fold 0's model "
        "with its test-time views, batch `candidates.latency_batch`, on the machine that ran the pipeline.",
        "",
        "| model | starting weights | OOF accuracy | OOF macro-F1 | per-fold macro-F1 | beats baseline "
        "| referral coverage | accuracy of accepted | CPU ms/tile |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in [*([baseline] if baseline else []), *ranking, *candidates]:
        s = scores[name]
        referral = s.get("referral", {})
        if name == baseline:
            verdict = "(the bar)"
        else:
            verdict = "n/a" if name not in beats else "yes" if beats[name] else "**no**"
        lines.append(
            f"| {name} | {init.get(name, 'n/a' if name != baseline else '-')} | {_num(s['accuracy'])} | "
            f"{_num(s['f1_macro'])} | {_interval(s['fold_summary'].get('f1_macro'), 2, '')} | {verdict} | "
            f"{_num(referral.get('coverage'), 2)} | {_num(referral.get('accepted_accuracy'))} | "
            f"{_num(s.get('cpu_ms_per_tile'), 1)} |"
        )
    winner = scores[ranking[0]]
    bounded = [n for n, s in scores.items() if s.get("calibration", {}).get("temperature_at_bound")]
    lines += [
        "",
        f"Registered: version {champion['version']} ({champion['arch']}) as `@{champion['alias']}`. Gate: "
        f"{gate['reason']}.",
        f"Referral rule of {ranking[0]}: temperature {_num(winner['calibration']['temperature'])}, confidence "
        f"threshold {_num(winner['referral'].get('confidence_threshold'))}; it accepts "
        f"{_num(winner['referral'].get('coverage'), 2)} of the out-of-fold tiles (error upper bound "
        f"{_num(winner['referral'].get('accepted_error_upper'))} against {_num(winner['referral'].get('max_error'), 2)}"
        f") and refers the rest to a pathologist.",
    ]
    if bounded:
        lines.append(f"Temperature fit at its bound (unreliable calibration): {', '.join(bounded)}.")
    if demo_time:
        lines.append(f"`time make pipeline` on a fresh clone, install included, 2 CPU cores: {demo_time}.")
    return "\n".join(lines) + "\n"


def update_readme(readme: str | Path, block: str) -> Path:
    """Replace the text between :data:`BEGIN` and :data:`END` in ``readme`` with ``block``.

    Raises:
        ArtifactError: The README lacks the markers (or has them out of order).
    """
    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ArtifactError(f"{path}: no '{BEGIN}' ... '{END}' block to write the figures into")
    path.write_text(text[: start + len(BEGIN)] + "\n" + block + text[end:], encoding="utf-8")
    return path
