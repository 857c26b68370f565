"""Validate: a Great Expectations suite over the manifest and the decoded images.

The suite is code (:func:`build_suite`), versioned with the project. Every tile is decoded once; what decoding
found (format, mode, size, whether the checksum still matches the manifest) becomes columns next to the
manifest's, and the suite checks the whole table. The JSON report names, for each failed expectation, the
failing files; a failure raises :class:`DataValidationError` so the pipeline stops.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig

from bonetumor.config import Config, save_resolved
from bonetumor.errors import DataValidationError
from bonetumor.manifest import MANIFEST_COLUMNS, read_manifest, resolve_paths
from bonetumor.preprocess import inspect_image
from bonetumor.utils import sha256_file, write_json

log = logging.getLogger(__name__)

SUITE_NAME = "bonetumor-tiles"
REPORT_FILE = "report.json"
#: How many failing files a report lists per expectation (the count is always complete).
MAX_LISTED_FILES = 50


def inspect_tiles(manifest: pd.DataFrame, manifest_dir: str | Path) -> pd.DataFrame:
    """Decode every tile of the manifest and return the manifest with what decoding found.

    Added columns: ``decodes``, ``format``, ``mode``, ``decoded_width``, ``decoded_height``, ``decode_error``
    and ``sha256_matches`` (the file's checksum still equals the manifest's).
    """
    files = resolve_paths(manifest, manifest_dir)
    records = []
    for file, expected_sha in zip(files, manifest["sha256"], strict=True):
        info = inspect_image(file)
        records.append(
            {
                "decodes": info.decodes,
                "format": info.format,
                "mode": info.mode,
                "decoded_width": info.width,
                "decoded_height": info.height,
                "decode_error": info.error,
                "sha256_matches": file.is_file() and sha256_file(file) == expected_sha,
            }
        )
    inspected = pd.DataFrame(records, index=manifest.index)
    for column in ("decoded_width", "decoded_height"):
        inspected[column] = inspected[column].astype("Int64")
    return pd.concat([manifest, inspected], axis=1)


def build_suite(classes: Sequence[str], min_size: int) -> gx.ExpectationSuite:
    """Return the tile suite: schema, label set, unique checksums, decodable 8-bit RGB tiles of a minimum size.

    GX needs an active data context to build a suite, so call this after ``gx.get_context`` (as
    :func:`run_suite` does).
    """
    suite = gx.ExpectationSuite(name=SUITE_NAME)
    for column in MANIFEST_COLUMNS:
        suite.add_expectation(gxe.ExpectColumnToExist(column=column))
    for column in ("path", "label", "case", "slide", "sha256"):
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=column))
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(classes)))
    suite.add_expectation(gxe.ExpectColumnDistinctValuesToContainSet(column="label", value_set=list(classes)))
    suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column="sha256"))
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="decodes", value_set=[True]))
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="sha256_matches", value_set=[True]))
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=["RGB"]))
    suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="decoded_width", min_value=min_size))
    suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="decoded_height", min_value=min_size))
    return suite


def run_suite(table: pd.DataFrame, classes: Sequence[str], min_size: int) -> Any:
    """Run the tile suite on a dataframe in an ephemeral GX context and return the validation result."""
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("tiles")
        .add_dataframe_asset("tiles")
        .add_batch_definition_whole_dataframe("all")
    )
    suite = context.suites.add(build_suite(classes, min_size))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=SUITE_NAME, data=batch, suite=suite))
    return definition.run(
        batch_parameters={"dataframe": table},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["path"]},
    )


def _describe_result(result: Any, table: pd.DataFrame, classes: Sequence[str]) -> dict[str, Any]:
    config = result.expectation_config
    column = config.kwargs.get("column")
    entry: dict[str, Any] = {
        "expectation": config.type,
        "column": column,
        "kwargs": {k: v for k, v in config.kwargs.items() if k not in ("column", "batch_id")},
        "success": bool(result.success),
    }
    details = result.result or {}
    failing = sorted({str(item["path"]) for item in details.get("unexpected_index_list") or [] if "path" in item})
    if "unexpected_count" in details:
        entry["unexpected_count"] = int(details["unexpected_count"])
    if failing:
        entry["failing_files"] = failing[:MAX_LISTED_FILES]
        if column == "decodes":
            errors = table.set_index("path")["decode_error"]
            entry["errors"] = {path: str(errors.get(path)) for path in failing[:MAX_LISTED_FILES]}
        elif column in table.columns:
            values = table.set_index("path")[column]
            entry["values"] = {path: _plain(values.get(path)) for path in failing[:MAX_LISTED_FILES]}
    if config.type == "expect_column_distinct_values_to_contain_set":
        entry["missing_classes"] = [c for c in classes if c not in set(table["label"].dropna())]
    exception = getattr(result, "exception_info", None) or {}
    if isinstance(exception, dict) and exception.get("raised_exception"):
        entry["exception"] = str(exception.get("exception_message"))
    return entry


def _plain(value: Any) -> Any:
    if value is None or value is pd.NA:
        return None
    return value.item() if hasattr(value, "item") else value


def validate_dataset(
    manifest: pd.DataFrame, manifest_dir: str | Path, config: Config, report_path: str | Path
) -> dict[str, Any]:
    """Validate the data set and write the JSON report.

    Args:
        manifest: The tile manifest.
        manifest_dir: The folder its paths are relative to.
        config: Uses ``data.classes`` and ``validate.min_size``.
        report_path: Where the JSON report goes (written whether or not validation passes).

    Returns:
        The report.

    Raises:
        DataValidationError: At least one expectation failed; the message names each one and its failing files.
    """
    table = inspect_tiles(manifest, manifest_dir)
    result = run_suite(table, config.data.classes, config.validate.min_size)
    expectations = [_describe_result(r, table, config.data.classes) for r in result.results]
    counts = table["label"].value_counts()
    report = {
        "success": bool(result.success),
        "suite": SUITE_NAME,
        "n_tiles": len(table),
        "class_counts": {c: int(counts.get(c, 0)) for c in config.data.classes},
        "n_slides": int(table["slide"].nunique()),
        "n_cases": int(table["case"].nunique()),
        "failed": [e for e in expectations if not e["success"]],
        "expectations": expectations,
    }
    write_json(report_path, report)
    if not report["success"]:
        raise DataValidationError(format_failures(report, str(report_path)))
    log.info("data validation passed: %d expectations on %d tiles", len(expectations), len(table))
    return report


def format_failures(report: dict[str, Any], report_path: str) -> str:
    """Return a readable summary of a failed validation report: each failed expectation and its files."""
    lines = [f"data validation failed: {len(report['failed'])} expectation(s) not met (full report: {report_path})"]
    for failure in report["failed"]:
        what = f"{failure['expectation']}({failure['column'] or ''}"
        what += (", " + ", ".join(f"{k}={v}" for k, v in failure["kwargs"].items()) + ")") if failure["kwargs"] else ")"
        count = failure.get("unexpected_count")
        lines.append(f"  - {what}" + (f": {count} tile(s)" if count is not None else ""))
        if failure.get("missing_classes"):
            lines.append(f"      missing classes: {failure['missing_classes']}")
        explained = failure.get("errors") or failure.get("values") or {}
        for path in failure.get("failing_files", [])[:10]:
            lines.append(f"      {path}" + (f": {explained[path]}" if path in explained else ""))
        if len(failure.get("failing_files", [])) > 10:
            lines.append(f"      ... and {len(failure['failing_files']) - 10} more in the report")
        if failure.get("exception"):
            lines.append(f"      error: {failure['exception']}")
    return "\n".join(lines)


def run_validation(config: Config, manifest_path: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """The validate stage: run the suite on the manifest and write ``<out_dir>/report.json``.

    The report is written even when validation fails (outside the atomic output folder), so the user can read
    which files failed; the raised :class:`DataValidationError` stops the pipeline.
    """
    manifest_path = Path(manifest_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(config, out_dir, ("data", "validate"))
    return validate_dataset(read_manifest(manifest_path), manifest_path.parent, config, out_dir / REPORT_FILE)
