"""Schedule the compiled training pipeline on a Kubeflow Pipelines endpoint: a recurring run on a cron.

Usage::

    python -m pipelines.schedule --host http://localhost:8080 --cron '0 0 2 * * 1' [--name bonetumor]
        [--max-concurrency 1] [--catchup] [the run options of pipelines.submit]

``bonetumor pipeline schedule`` runs the same. The run arguments are built and checked as for
``pipelines.submit`` (params.yaml, data version, package) before the cluster is called; the recurring run's name
carries the commit and the data version (``<name>-<commit>-data-<md5[:8]>``), and its description the cron.

KFP's cron has six fields, seconds first (second, minute, hour, day of month, month, day of week):
``0 0 2 * * 1`` is every Monday at 02:00:00, in the time zone of the KFP controller (usually UTC). Every run of
the schedule trains the data version fixed here: schedule again to train newer data. Missed runs (a paused
schedule) are not caught up unless ``--catchup``.
"""

from __future__ import annotations

import argparse
import re
import sys

from bonetumor.errors import ConfigError
from pipelines.submit import (
    NAME_PREFIX,
    SubmitError,
    add_run_options,
    connect,
    fail,
    host_errors,
    normalise_host,
    prepare_from_args,
    run_name,
)

#: The fields of KFP's cron (robfig/cron with seconds), in order.
CRON_FIELDS = ("second", "minute", "hour", "day of month", "month", "day of week")
#: What one cron field may hold: numbers, names (MON, JAN), *, ?, ranges, steps and lists.
CRON_FIELD = re.compile(r"^[0-9A-Za-z*?/,\-]+$")
#: The most concurrent runs KFP accepts for a recurring run.
MAX_CONCURRENCY = 10


def check_cron(cron: str) -> str:
    """Return ``cron`` with single spaces when it has KFP's 6 fields, seconds first.

    Args:
        cron: The cron expression.

    Raises:
        SubmitError: It has another number of fields (a 5-field Unix cron is named as such), or a field that no cron
            field can hold.
    """
    fields = cron.split()
    layout = f"KFP's cron has 6 fields, seconds first ({', '.join(CRON_FIELDS)})"
    if len(fields) == 5:
        raise SubmitError(
            f"--cron {cron!r} has 5 fields, a Unix cron; {layout}: '0 {' '.join(fields)}' runs at the same times"
        )
    if len(fields) != 6:
        raise SubmitError(f"--cron {cron!r} has {len(fields)} fields; {layout}, e.g. '0 0 2 * * 1' (Mondays 02:00:00)")
    bad = [field for field in fields if not CRON_FIELD.match(field)]
    if bad:
        raise SubmitError(f"--cron {cron!r}: {' '.join(bad)} is not a cron field (numbers, names, * ? - , /)")
    return " ".join(fields)


def check_concurrency(value: int) -> int:
    """Return ``value`` when KFP accepts it as a recurring run's ``max_concurrency`` (1 to 10).

    Raises:
        SubmitError: It is out of range.
    """
    if not 1 <= value <= MAX_CONCURRENCY:
        raise SubmitError(f"--max-concurrency {value}: KFP accepts 1 to {MAX_CONCURRENCY} runs of a schedule at once")
    return value


def schedule(args: argparse.Namespace) -> None:
    """Create the recurring run from parsed options, printing what was scheduled.

    Raises:
        bonetumor.errors.ConfigError: params.yaml is missing or invalid.
        SubmitError: Anything else the user can fix (cron, data version, package, host, credentials).
    """
    cron = check_cron(args.cron)
    concurrency = check_concurrency(args.max_concurrency)
    request, images = prepare_from_args(args)
    name = run_name(request.commit, request.data_version.md5, prefix=args.name)
    description = (
        f"bonetumor training on cron '{cron}' ({', '.join(CRON_FIELDS)}): commit {request.commit}, "
        f"data version {request.data_version.md5}, image {', '.join(images)}"
    )
    client = connect(args.host, args.namespace, args.token_file)
    with host_errors(normalise_host(args.host), args.namespace):
        experiment = client.create_experiment(args.experiment, namespace=args.namespace)
        job = client.create_recurring_run(
            experiment_id=experiment.experiment_id,
            job_name=name,
            description=description,
            cron_expression=cron,
            max_concurrency=concurrency,
            no_catchup=not args.catchup,
            params=request.arguments,
            pipeline_package_path=args.package,
            enable_caching=False if args.no_cache else None,
            service_account=args.service_account,
        )
    for line in request.describe():
        print(line)
    print(f"image: {', '.join(images)}")
    print(
        f"scheduled recurring run {job.recurring_run_id} ({name}) on {args.host} (experiment {args.experiment}): "
        f"cron '{cron}' (seconds first; the KFP controller's time zone, usually UTC), at most {concurrency} at "
        f"once, {'catching up' if args.catchup else 'not catching up'} missed runs"
    )
    print(f"every run trains data version {request.data_version.md5}: schedule again to train newer data")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipelines.schedule``.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The exit status: 0 when the recurring run was created; 1 with one ``error:`` line on stderr otherwise.
    """
    parser = argparse.ArgumentParser(prog="python -m pipelines.schedule", description=__doc__.splitlines()[0])
    parser.add_argument("--cron", required=True, help="KFP cron, 6 fields, seconds first: '0 0 2 * * 1' (Mon 02:00)")
    parser.add_argument(
        "--name", default=NAME_PREFIX, help=f"start of the recurring run's name (default: {NAME_PREFIX})"
    )
    parser.add_argument("--max-concurrency", type=int, default=1, help="runs of the schedule at once (default: 1)")
    parser.add_argument("--catchup", action="store_true", help="run the missed runs of a paused schedule")
    add_run_options(parser)
    args = parser.parse_args(argv)
    try:
        schedule(args)
    except (ConfigError, SubmitError) as exc:
        return fail(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
