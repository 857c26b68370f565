"""Load test of the real BentoML service on loopback, beside in-process figures of the same model and runtime.

It first times the served model in this process (no HTTP, single thread, back to back, after a warm-up), then
starts ``bentoml serve service:BoneTumorClassifier`` from ``serving/`` on a free loopback port (the project's own
registry by default, ``BONETUMOR_PROJECT_DIR=--project``, a throw-away ``BENTOML_HOME`` and ``TMPDIR``, telemetry
off), waits for ``/readyz``, drives it with real tiles (read into memory once; requests cycle through them) and
stops it. The two never run at the same time, so they do not compete for the cores. ``--url`` drives a server
that is already running instead (no start, no ready time).

Which version: ``--alias`` (or ``--env BONETUMOR_MODEL_ALIAS=...``); without either, the alias the pipeline's
register stage gave the version it registered, read from ``--project``'s ``outputs/register/champion.json``
(``@challenger`` when the champion gate kept it back, as on the sample); without that file, params.yaml's
``register.alias``.

Usage::

    python -m benchmarks.serving_load [--project DIR] [--url URL] [--env KEY=VALUE ...] [--alias A]
        [--clients 1 8 16] [--seconds 30] [--soak-clients 16] [--soak-seconds 60]
        [--batch-clients 1 8] [--batch-size 8] [--explain-requests 20] [--warmup 20]
        [--ort-threads 1 2] [--inproc-calls 200] [--inproc-seconds 10] [--no-inprocess]
        [--images DIR] [--json PATH] [--markdown PATH] [--fail-on-errors]

For example ``python -m benchmarks.serving_load --clients 16 --seconds 60``: 16 concurrent clients on ``/predict``
for 60 s (and the other levels at their defaults), against what the pipeline registered.

Served figures (one load level = N client threads, each with its own ``requests.Session``, posting back to back
for ``--seconds``; each client sends one untimed request first to open its connection):

* ``/predict`` at each ``--clients`` level: requests (timed, finished), errors (a non-200, an exception, or an
  answer without a label), req/s (answered requests per second of wall time), p50/p95/p99 latency in ms of the
  answered requests as the client saw them (upload, multipart parsing, decode, checks, engine, JSON), and the
  ``model.version``/``model.runtime`` the answers named. ``client CPU`` is the share of one core this load
  generator used: on a small machine it competes with the server, so high values understate the server.
* soak: ``--soak-clients`` on ``/predict`` for ``--soak-seconds``: the error check (0 errors expected).
* ``/predict_batch`` with ``--batch-size`` tiles per request at each ``--batch-clients`` level: ms per tile (p50
  request latency / tiles) and tiles/s, and the ratio of tiles/s to ``/predict``'s req/s at the same clients
  (above 1: batching helps).
* ``/explain``: one client, ``--explain-requests`` requests, p50 ms.
* ready: seconds from starting the process to the first ``/readyz`` 200 (imports, registry, model load).

In-process figures (``ServedModel`` of ``open_served_model``, the object the service wraps): ``answer`` p50 (what
``/predict`` runs minus HTTP: decode, checks, fast engine, audit fields), the fast engine alone on a decoded
tile, the eager torch ``Predictor`` (one forward pass with the same test-time views), ``explain`` (Grad-CAM, what
``/explain`` runs), ``answer_many`` of ``--batch-size`` tiles per tile, and each ONNX file of the bundle (FP32,
INT8) built directly with every ``--ort-threads`` count.

The last lines give the errors over every level (0 expected) and the goals. ``--fail-on-errors`` exits 1 when any
timed request failed.

Goals (PASS/FAIL printed, never the exit code): served p50 at 1 client <= 1.15 x in-process ``answer`` p50;
p50 <= 15 ms at 1 client; >= 60 req/s at 8 clients; 0 errors in the soak; in-process explain p50 <= 2.5 x eager
forward p50; ready <= 10 s. A goal that was not measured (level not run, ``--url``, ``--no-inprocess``) is SKIP.

Results go to ``--json`` (machine, library versions, model, every figure, goals) and ``--markdown`` (tables ready
for the README, also printed).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests

REPO = Path(__file__).resolve().parent.parent
TELEMETRY_OFF = {"BENTOML_DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
#: Error messages kept per level.
KEPT_ERRORS = 5
#: What BentoML logs when the service's ``__init__`` raised; it then respawns the worker forever, so stop waiting.
STARTUP_FAILED = "Application startup failed"
#: What the register stage writes, relative to the project: the version registered and the alias the gate gave it.
CHAMPION_FILE = Path("outputs") / "register" / "champion.json"

Tile = tuple[str, bytes]
Files = list[tuple[str, tuple[str, bytes, str]]]


# --------------------------------------------------------------------------------------------------------------
# Figures


def latency_stats(seconds: Sequence[float]) -> dict[str, float | None]:
    """Return ``n`` and the mean, p50, p95 and p99 in milliseconds of durations given in seconds."""
    if not seconds:
        return {"n": 0, "mean_ms": None, "p50_ms": None, "p95_ms": None, "p99_ms": None}
    ms = np.asarray(seconds, dtype=float) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"n": len(ms), "mean_ms": float(ms.mean()), "p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def time_calls(fn: Callable[[int], object], warmup: int, calls: int, seconds: float) -> dict[str, float | None]:
    """Time ``fn(i)`` back to back after ``warmup`` untimed calls, for ``calls`` calls or ``seconds``, what ends first.

    At least one call is timed whatever ``seconds`` says.
    """
    for i in range(warmup):
        fn(i)
    durations: list[float] = []
    end = time.perf_counter() + seconds
    while len(durations) < calls and (not durations or time.perf_counter() < end):
        start = time.perf_counter()
        fn(len(durations))
        durations.append(time.perf_counter() - start)
    return latency_stats(durations)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


# --------------------------------------------------------------------------------------------------------------
# Clients


@dataclass
class Tally:
    """What one client thread measured."""

    latencies: list[float] = field(default_factory=list)
    requests: int = 0
    errors: int = 0
    messages: list[str] = field(default_factory=list)
    models: Counter[tuple[str, str]] = field(default_factory=Counter)
    started: float = math.inf
    ended: float = -math.inf

    def record(self, seconds: float, error: str | None, model: tuple[str, str] | None) -> None:
        """Count one timed request."""
        self.requests += 1
        if model is not None:
            self.models[model] += 1
        if error is None:
            self.latencies.append(seconds)
            return
        self.errors += 1
        if len(self.messages) < KEPT_ERRORS and error not in self.messages:
            self.messages.append(error)


def check_answer(endpoint: str, body: object) -> tuple[str | None, tuple[str, str] | None]:
    """Return what is wrong with a 200 answer (None when it is an answer) and the (version, runtime) it names."""
    if not isinstance(body, dict):
        return "the answer is not a JSON object", None
    block = body.get("model")
    model = (str(block.get("version")), str(block.get("runtime"))) if isinstance(block, dict) else None
    if endpoint != "/predict_batch":
        return (None if "label" in body else f"no label in the answer: {str(body)[:200]}"), model
    results = body.get("results")
    if not isinstance(results, list) or not results:
        return "no results in the batch answer", model
    bad = [r.get("error", "no label") if isinstance(r, dict) else "not an object" for r in results]
    bad = [b for b, r in zip(bad, results, strict=True) if not (isinstance(r, dict) and "label" in r)]
    return (f"{len(bad)} of {len(results)} files unanswered: {bad[0]}" if bad else None), model


def post(session: requests.Session, url: str, endpoint: str, files: Files, timeout: float) -> tuple[str | None, Any]:
    """POST one multipart request; return the error (None when answered) and the (version, runtime) it named."""
    try:
        response = session.post(url + endpoint, files=files, timeout=timeout)
    except requests.RequestException as exc:
        return f"{type(exc).__name__}: {exc}", None
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}", None
    try:
        body = response.json()
    except ValueError as exc:
        return f"the answer is not JSON: {exc}", None
    return check_answer(endpoint, body)


@dataclass(frozen=True)
class Level:
    """One load level: which endpoint, how many clients, for how long (or how many requests each)."""

    name: str
    endpoint: str
    clients: int
    seconds: float | None = None
    requests_per_client: int | None = None
    batch: int = 1


def client(
    url: str,
    level: Level,
    payloads: Sequence[Files],
    offset: int,
    barrier: threading.Barrier,
    tally: Tally,
    timeout: float,
) -> None:
    """One client thread: open a session, send one untimed request, wait for the others, then post back to back."""
    with requests.Session() as session:
        index = offset
        post(session, url, level.endpoint, payloads[index % len(payloads)], timeout)  # opens the connection
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=300)
        tally.started = time.perf_counter()
        deadline = tally.started + level.seconds if level.seconds else math.inf
        limit = level.requests_per_client if level.requests_per_client is not None else math.inf
        while tally.requests < limit and time.perf_counter() < deadline:
            index += 1
            start = time.perf_counter()
            error, model = post(session, url, level.endpoint, payloads[index % len(payloads)], timeout)
            tally.record(time.perf_counter() - start, error, model)
        tally.ended = time.perf_counter()


def summarize(level: Level, tallies: Sequence[Tally], cpu_share: float) -> dict[str, Any]:
    """Merge the clients' tallies of a level into its figures (``cpu_share``: this process's CPU / wall time)."""
    latencies = [s for t in tallies for s in t.latencies]
    requests_ = sum(t.requests for t in tallies)
    errors = sum(t.errors for t in tallies)
    elapsed = max(t.ended for t in tallies) - min(t.started for t in tallies)
    elapsed = elapsed if elapsed > 0 else float("nan")
    models: Counter[tuple[str, str]] = Counter()
    for t in tallies:
        models.update(t.models)
    stats = latency_stats(latencies)
    answered = requests_ - errors
    return {
        "name": level.name,
        "endpoint": level.endpoint,
        "clients": level.clients,
        "batch": level.batch,
        "seconds": round(elapsed, 3),
        "requests": requests_,
        "errors": errors,
        "error_messages": list(dict.fromkeys(m for t in tallies for m in t.messages))[:KEPT_ERRORS],
        "req_s": answered / elapsed,
        "tiles_s": answered * level.batch / elapsed,
        **stats,
        "ms_per_tile": None if stats["p50_ms"] is None else stats["p50_ms"] / level.batch,
        "models": [{"version": v, "runtime": r, "answers": n} for (v, r), n in models.most_common()],
        "client_cpu_pct": 100.0 * cpu_share,
    }


def run_level(url: str, level: Level, payloads: Sequence[Files], timeout: float) -> dict[str, Any]:
    """Run one load level with its client threads and return its figures; print one progress line."""
    length = f"{level.seconds:g} s" if level.seconds else f"{level.requests_per_client} requests per client"
    print(f"{level.name:<12} {level.endpoint:<14} {level.clients:>2} clients, {length} ...", end=" ", flush=True)
    tallies = [Tally() for _ in range(level.clients)]
    barrier = threading.Barrier(level.clients)
    step = max(1, len(payloads) // level.clients)
    threads = [
        threading.Thread(target=client, args=(url, level, payloads, i * step, barrier, tallies[i], timeout))
        for i in range(level.clients)
    ]
    cpu, wall = time.process_time(), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result = summarize(level, tallies, (time.process_time() - cpu) / (time.perf_counter() - wall))
    seen = ", ".join(f"v{m['version']} {m['runtime']}" for m in result["models"]) or "no model seen"
    print(
        f"{result['requests']} requests, {result['errors']} errors, {result['req_s']:.1f} req/s, "
        f"p50 {fmt(result['p50_ms'])} p95 {fmt(result['p95_ms'])} p99 {fmt(result['p99_ms'])} ms; {seen}",
        flush=True,
    )
    for message in result["error_messages"]:
        print(f"    error: {message}", flush=True)
    return result


def payloads_for(tiles: Sequence[Tile], field_name: str, per_request: int) -> list[Files]:
    """One multipart file list per tile: ``per_request`` consecutive tiles from it (cyclic) under ``field_name``."""
    payloads: list[Files] = []
    for i in range(len(tiles)):
        chosen = [tiles[(i * per_request + k) % len(tiles)] for k in range(per_request)]
        payloads.append([(field_name, (name, data, "image/jpeg")) for name, data in chosen])
    return payloads


def drive(url: str, tiles: Sequence[Tile], args: argparse.Namespace) -> dict[str, Any]:
    """Warm the server up, then run every load level; return the levels and the served model's info."""
    single = payloads_for(tiles, "image", 1)
    batches = payloads_for(tiles, "images", args.batch_size)
    print(f"warm-up: {args.warmup} requests to /predict, 2 to /predict_batch, 2 to /explain", flush=True)
    with requests.Session() as session:
        for i in range(args.warmup):
            post(session, url, "/predict", single[i % len(single)], args.timeout)
        for i in range(2):
            post(session, url, "/predict_batch", batches[i % len(batches)], args.timeout)
            post(session, url, "/explain", single[i % len(single)], args.timeout)
        try:
            info = session.get(f"{url}/model_info", timeout=args.timeout).json()
        except (requests.RequestException, ValueError) as exc:
            info = {"error": str(exc)}
    levels = [Level("predict", "/predict", n, seconds=args.seconds) for n in args.clients]
    levels += [Level("batch", "/predict_batch", n, args.seconds, batch=args.batch_size) for n in args.batch_clients]
    if args.explain_requests > 0:
        levels.append(Level("explain", "/explain", 1, requests_per_client=args.explain_requests))
    if args.soak_seconds > 0:
        levels.append(Level("soak", "/predict", args.soak_clients, seconds=args.soak_seconds))
    results = [
        run_level(url, lv, batches if lv.endpoint == "/predict_batch" else single, args.timeout) for lv in levels
    ]
    return {"levels": results, "model_info": info}


# --------------------------------------------------------------------------------------------------------------
# Server


@dataclass
class Server:
    """A ``bentoml serve`` subprocess (its own session, so its workers stop with it)."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    started: float

    def log_tail(self, chars: int = 5000) -> str:
        """The end of the server's output."""
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_ready(self, timeout: float) -> float:
        """Poll ``/readyz`` until it answers 200 and return the seconds since the process started.

        Raises:
            SystemExit: The server exited, its service failed to start, or it was not ready within ``timeout``
                seconds (with its log).
        """
        while True:
            try:
                if requests.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except requests.RequestException:
                pass
            failed = STARTUP_FAILED in self.log_path.read_text(errors="replace")
            if failed or self.process.poll() is not None or time.perf_counter() - self.started > timeout:
                self.stop()
                why = "its service failed to start" if failed else f"it was not ready within {timeout:g} s"
                raise SystemExit(f"bentoml serve did not become ready: {why}:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after 30 s."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(project: Path, home: Path, extra: dict[str, str]) -> dict[str, str]:
    """This environment plus the project, a private BentoML home and temp folder, telemetry off, and ``extra``."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env.update(
        BONETUMOR_PROJECT_DIR=str(project.resolve()),
        BENTOML_HOME=str(home / "bentoml"),
        TMPDIR=str(home / "tmp"),
        **TELEMETRY_OFF,
    )
    env.update(extra)
    return env


@contextlib.contextmanager
def served(project: Path, extra_env: dict[str, str], log_copy: Path, ready_timeout: float) -> Iterator[Server]:
    """Start ``bentoml serve`` on a free loopback port, yield it once ready, stop it (and keep its log) at the end."""
    with tempfile.TemporaryDirectory(prefix="bonetumor-serving-load-") as tmp:
        port = free_port()
        log_path = Path(tmp) / "server.log"
        command = ["bentoml", "serve", "service:BoneTumorClassifier", "--host", "127.0.0.1", "--port", str(port)]
        print(f"starting: {' '.join(command)} (cwd serving/, project {project})", flush=True)
        with log_path.open("wb") as log:
            started = time.perf_counter()
            process = subprocess.Popen(
                command,
                cwd=REPO / "serving",
                env=server_env(project, Path(tmp), extra_env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = Server(process, f"http://127.0.0.1:{port}", log_path, started)
        try:
            yield server
        finally:
            server.stop()
            log_copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log_path, log_copy)
            print(f"server stopped; its log: {log_copy}", flush=True)


# --------------------------------------------------------------------------------------------------------------
# In process


def time_onnx_files(model: Any, images: Sequence[Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time each ONNX file of the served bundle, built directly, with every ``--ort-threads`` count."""
    from bonetumor.errors import ArtifactError
    from bonetumor.serving.engines import OnnxPredictor

    rows: list[dict[str, Any]] = []
    for engine in ("onnx-fp32", "onnx-int8"):
        for threads in args.ort_threads:
            try:
                predictor = OnnxPredictor(model.bundle_dir, model.predictor.metadata, engine, threads=threads)
            except ArtifactError as exc:
                rows.append({"engine": engine, "threads": threads, "skipped": str(exc)})
                print(f"  {engine} x{threads} threads: skipped ({exc})", flush=True)
                break
            stats = time_calls(cycling(predictor, images), *limits(args))
            rows.append({"engine": engine, "threads": threads, **stats})
            print(f"  {engine} with {threads} ORT threads: p50 {fmt(stats['p50_ms'])} ms", flush=True)
    return rows


def cycling(engine: Any, images: Sequence[Any]) -> Callable[[int], object]:
    """A step classifying the ``i``-th image (cyclic) alone with ``engine``."""
    return lambda i: engine.predict_images([images[i % len(images)]])


def limits(args: argparse.Namespace) -> tuple[int, int, float]:
    """``(warmup, calls, seconds)`` of an in-process measurement."""
    return args.inproc_warmup, args.inproc_calls, args.inproc_seconds


def in_process(project: Path, alias: str | None, tiles: Sequence[Tile], args: argparse.Namespace) -> dict[str, Any]:
    """Time the served model in this process: answer, engine alone, eager torch, explain, answer_many, ONNX files."""
    import torch

    from bonetumor.registry.model_registry import open_served_model
    from bonetumor.transforms.decode import decode_image

    started = time.perf_counter()
    holder, config = open_served_model(project / "params.yaml", alias)
    model = holder.current
    load_s = time.perf_counter() - started
    print(f"in process: version {model.version}, {model.engine_name} ({model.engine_reason}); loaded in {load_s:.1f} s")
    images = [decode_image(data, source=name) for name, data in tiles]
    batch = [tiles[k % len(tiles)] for k in range(args.batch_size)]
    # Torch first: once ONNX Runtime has run in this thread, its spinning pool can slow torch's next calls.
    steps: dict[str, Callable[[int], object]] = {
        "eager": lambda i: model.predictor.predict_images([images[i % len(images)]]),
        "explain": lambda i: model.explain(tiles[i % len(tiles)][1], tiles[i % len(tiles)][0]),
        "answer": lambda i: model.answer(tiles[i % len(tiles)][1], tiles[i % len(tiles)][0]),
        "engine": lambda i: model.engine.predict_images([images[i % len(images)]]),
        "answer_many": lambda _: model.answer_many(batch),
    }
    figures: dict[str, Any] = {}
    for name, step in steps.items():
        print(f"  {name}: up to {args.inproc_calls} calls or {args.inproc_seconds:g} s ...", end=" ", flush=True)
        warmup, calls, seconds = limits(args)
        figures[name] = time_calls(step, min(warmup, 2) if name == "explain" else warmup, calls, seconds)
        print(f"p50 {fmt(figures[name]['p50_ms'])} ms", flush=True)
    p50_many = figures["answer_many"]["p50_ms"]
    figures["answer_many"]["ms_per_tile"] = None if p50_many is None else p50_many / args.batch_size
    return {
        "model": {"name": model.name, "version": model.version, "runtime": model.engine_name},
        "runtime_reason": model.engine_reason,
        "serving_ort_threads": config.serving.ort_threads,
        "torch_threads": torch.get_num_threads(),
        "load_s": load_s,
        "figures": figures,
        "onnx_files": time_onnx_files(model, images, args),
    }


# --------------------------------------------------------------------------------------------------------------
# Goals and report


def level_of(levels: Sequence[dict[str, Any]], name: str, clients: int) -> dict[str, Any] | None:
    """The level called ``name`` with ``clients`` clients, if it ran."""
    return next((lv for lv in levels if lv["name"] == name and lv["clients"] == clients), None)


def goal(
    name: str, value: float | None, limit: float | None, higher_is_better: bool, unit: str, ran: bool = True
) -> dict[str, Any]:
    """One goal: its value against its limit: PASS, FAIL, or SKIP when not measured.

    A level that ran but answered nothing has no value (no latency): FAIL when ``ran``.
    """
    if limit is None or value is None or math.isnan(value):
        status = "FAIL" if ran and limit is not None and value is None else "SKIP"
    else:
        status = "PASS" if (value >= limit if higher_is_better else value <= limit) else "FAIL"
    return {"goal": name, "value": value, "limit": limit, "unit": unit, "status": status}


def evaluate_goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Compare the figures with the goals."""
    levels = report["served"]["levels"] if report.get("served") else []
    figures = report["in_process"]["figures"] if report.get("in_process") else {}
    one, eight = level_of(levels, "predict", 1), level_of(levels, "predict", 8)
    soak = next((lv for lv in levels if lv["name"] == "soak"), None)
    served_p50 = one["p50_ms"] if one else None
    answer_p50 = figures.get("answer", {}).get("p50_ms")
    eager_p50 = figures.get("eager", {}).get("p50_ms")
    soak_name = f"0 errors at {soak['clients']} clients over the soak" if soak else "0 errors in the soak"
    return [
        goal(
            "served p50 (1 client) ≤ 1.15 × in-process answer p50",
            served_p50,
            None if answer_p50 is None else 1.15 * answer_p50,
            False,
            "ms",
            ran=one is not None,
        ),
        goal("p50 ≤ 15 ms at 1 client", served_p50, 15.0, False, "ms", ran=one is not None),
        goal("≥ 60 req/s at 8 clients", eight["req_s"] if eight else None, 60.0, True, "req/s", ran=eight is not None),
        goal(soak_name, float(soak["errors"]) if soak else None, 0.0, False, "errors", ran=soak is not None),
        goal(
            "explain p50 ≤ 2.5 × eager forward p50 (in process)",
            figures.get("explain", {}).get("p50_ms"),
            None if eager_p50 is None else 2.5 * eager_p50,
            False,
            "ms",
            ran=False,
        ),
        goal("ready ≤ 10 s", report.get("ready_s"), 10.0, False, "s", ran=False),
    ]


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for a table, ``-`` when missing."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def load_tables(levels: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown tables of the /predict, soak and explain levels and of the batch levels."""
    lines = [
        "| load | endpoint | clients | requests | errors | req/s | p50 ms | p95 ms | p99 ms | client CPU % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in (lv for lv in levels if lv["endpoint"] != "/predict_batch"):
        lines.append(
            f"| {lv['name']} | `{lv['endpoint']}` | {lv['clients']} | {lv['requests']} | {lv['errors']} | "
            f"{fmt(lv['req_s'])} | {fmt(lv['p50_ms'])} | {fmt(lv['p95_ms'])} | {fmt(lv['p99_ms'])} | "
            f"{fmt(lv['client_cpu_pct'], 0)} |"
        )
    batches = [lv for lv in levels if lv["endpoint"] == "/predict_batch"]
    if batches:
        lines += [
            "",
            "| `/predict_batch` clients | tiles/request | requests | errors | tiles/s | ms/tile (p50) | "
            "× `/predict` req/s |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for lv in batches:
            lines.append(
                f"| {lv['clients']} | {lv['batch']} | {lv['requests']} | {lv['errors']} | {fmt(lv['tiles_s'])} | "
                f"{fmt(lv['ms_per_tile'])} | {fmt(lv.get('vs_predict'), 2)} |"
            )
    return lines


def in_process_table(inproc: dict[str, Any]) -> list[str]:
    """Markdown table of the in-process figures."""
    figures = inproc["figures"]
    runtime = inproc["model"]["runtime"]
    rows = [
        (f"`answer` (decode, checks, {runtime}, audit)", figures["answer"]),
        (f"fast engine `{runtime}` on a decoded tile", figures["engine"]),
        ("eager torch forward (same views)", figures["eager"]),
        ("`explain` (Grad-CAM)", figures["explain"]),
    ]
    rows += [
        (f"`{r['engine']}` file, {r['threads']} ORT thread{'s' if r['threads'] != 1 else ''}", r)
        for r in inproc["onnx_files"]
        if "skipped" not in r
    ]
    lines = ["| in process (1 thread of calls) | calls | p50 ms | p95 ms |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {s['n']} | {fmt(s['p50_ms'])} | {fmt(s['p95_ms'])} |" for name, s in rows]
    many = figures["answer_many"]
    lines.append(f"| `answer_many`, per tile | {many['n']} | {fmt(many['ms_per_tile'])} | - |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The Markdown report: machine line, load tables, in-process table, goals."""
    machine, model = report["machine"], report["model"]
    lines = [
        f"Model {model.get('name', '?')} version {model.get('version', '?')}, runtime {model.get('runtime', '?')}; "
        f"{machine['cpu_model'] or machine['processor'] or 'unknown CPU'}, {machine['cpu_count']} cores; "
        f"torch {report['versions']['torch']}, onnxruntime {report['versions']['onnxruntime']}, "
        f"bentoml {report['versions']['bentoml']}; ready in {fmt(report.get('ready_s'))} s.",
        "",
    ]
    if report.get("served"):
        lines += [*load_tables(report["served"]["levels"]), ""]
    if report.get("in_process"):
        lines += [*in_process_table(report["in_process"]), ""]
    lines += ["| goal | measured | limit | result |", "|---|---:|---:|---|"]
    lines += [
        f"| {g['goal']} | {fmt(g['value'])} {g['unit']} | {fmt(g['limit'])} {g['unit']} | **{g['status']}** |"
        for g in report["goals"]
    ]
    return "\n".join(lines) + "\n"


def machine_info() -> dict[str, Any]:
    """CPU count and model, platform, load average."""
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries that matter here (without importing them)."""
    found: dict[str, str | None] = {}
    for name in ("torch", "onnxruntime", "bentoml", "numpy", "requests", "bonetumor"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


# --------------------------------------------------------------------------------------------------------------
# Command line


def read_tiles(folder: Path) -> list[Tile]:
    """Every ``*.jpg`` under ``folder`` (sorted), as (file name, bytes)."""
    tiles = [(p.name, p.read_bytes()) for p in sorted(folder.rglob("*.jpg"))]
    if not tiles:
        raise SystemExit(f"--images {folder}: no .jpg tiles found")
    return tiles


def registered_alias(project: Path) -> tuple[str, str] | None:
    """The alias the pipeline's last register run gave its version, and a line saying so; None without a record.

    Raises:
        SystemExit: The record exists but is not JSON or names no alias.
    """
    path = project / CHAMPION_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{path}: not a readable registration record ({exc}); pass --alias") from exc
    alias = record.get("alias") if isinstance(record, dict) else None
    if not isinstance(alias, str) or not alias:
        raise SystemExit(f"{path}: no alias in the registration record; pass --alias")
    version = record.get("version", "?")
    return alias, f"serving @{alias}: the alias the pipeline gave version {version} ({path})"


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving_load", description=__doc__.splitlines()[0])
    p.add_argument("--project", type=Path, default=REPO, help="project folder: params.yaml and its registry")
    p.add_argument("--url", help="drive this running server instead of starting one (no ready time)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra server environment")
    p.add_argument(
        "--alias",
        help="alias or version to serve and time (BONETUMOR_MODEL_ALIAS); default: the alias in "
        f"--project's {CHAMPION_FILE}, else params.yaml's register.alias",
    )
    p.add_argument("--images", type=Path, default=REPO / "data" / "sample" / "images", help="folder of .jpg tiles")
    p.add_argument("--clients", nargs="+", type=int, default=[1, 8, 16], help="/predict load levels")
    p.add_argument("--seconds", type=float, default=30.0, help="seconds per load level")
    p.add_argument("--soak-clients", type=int, default=16)
    p.add_argument("--soak-seconds", type=float, default=60.0, help="0 skips the soak")
    p.add_argument("--batch-clients", nargs="*", type=int, default=[1, 8], help="/predict_batch load levels")
    p.add_argument("--batch-size", type=int, default=8, help="tiles per /predict_batch request")
    p.add_argument("--explain-requests", type=int, default=20, help="/explain requests (1 client; 0 skips)")
    p.add_argument("--warmup", type=int, default=20, help="untimed /predict requests before the first level")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for /readyz")
    p.add_argument("--ort-threads", nargs="*", type=int, default=[1, 2], help="ORT threads for the ONNX files")
    p.add_argument("--inproc-calls", type=int, default=200, help="most timed calls per in-process figure")
    p.add_argument("--inproc-seconds", type=float, default=10.0, help="most seconds per in-process figure")
    p.add_argument("--inproc-warmup", type=int, default=5, help="untimed calls before each in-process figure")
    p.add_argument("--no-inprocess", action="store_true", help="skip the in-process figures")
    p.add_argument("--json", type=Path, default=REPO / "outputs" / "benchmarks" / "serving_load.json")
    p.add_argument("--markdown", type=Path, default=REPO / "outputs" / "benchmarks" / "serving_load.md")
    p.add_argument("--fail-on-errors", action="store_true", help="exit 1 when any timed request failed")
    return p


def served_figures(args: argparse.Namespace, tiles: Sequence[Tile], extra_env: dict[str, str]) -> dict[str, Any]:
    """Drive ``--url``, or start the server, wait for it, drive it and stop it; return the served figures."""
    if args.url:
        url = args.url.rstrip("/")
        try:
            status = requests.get(f"{url}/readyz", timeout=10).status_code
        except requests.RequestException as exc:
            raise SystemExit(f"--url {url}: /readyz does not answer: {exc}") from exc
        print(f"driving {url} (not started here; /readyz {status})", flush=True)
        return {"url": url, "ready_s": None, **drive(url, tiles, args)}
    log_copy = args.json.with_suffix(".server.log")
    with served(args.project, extra_env, log_copy, args.ready_timeout) as server:
        ready_s = server.wait_ready(args.ready_timeout)
        print(f"ready in {ready_s:.1f} s at {server.url}", flush=True)
        return {"url": server.url, "ready_s": ready_s, "server_log": str(log_copy), **drive(server.url, tiles, args)}


def finish(report: dict[str, Any]) -> None:
    """Add batch-vs-single ratios, the model seen, goals and notes to the report."""
    levels = report["served"]["levels"]
    for lv in levels:
        if lv["endpoint"] == "/predict_batch":
            single = level_of(levels, "predict", lv["clients"])
            lv["vs_predict"] = ratio(lv["tiles_s"], single["req_s"] if single else None)
    seen = {(m["version"], m["runtime"]) for lv in levels for m in lv["models"]}
    inproc = report.get("in_process")
    model = dict(inproc["model"]) if inproc else {}
    info = report["served"].get("model_info") or {}
    if "name" in info:
        model["name"] = info["name"]
    if seen:
        model["version"] = ", ".join(sorted({v for v, _ in seen}))
        model["runtime"] = ", ".join(sorted({r for _, r in seen}))
    report["model"] = model
    notes = report.setdefault("notes", [])
    if len(seen) > 1:
        notes.append(f"answers came from more than one (version, runtime): {sorted(seen)}")
    if inproc and seen and {(inproc["model"]["version"], inproc["model"]["runtime"])} != seen:
        notes.append(f"in process timed {inproc['model']}, the server answered from {sorted(seen)}")
    report["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report["goals"] = evaluate_goals(report)


def main(argv: list[str] | None = None) -> None:
    """Measure in process, then served; print progress, the Markdown report and the goals; write JSON and Markdown."""
    args = parser().parse_args(argv)
    extra_env = parse_env(args.env)
    if args.alias:
        extra_env["BONETUMOR_MODEL_ALIAS"] = args.alias
    elif "BONETUMOR_MODEL_ALIAS" not in extra_env and (registered := registered_alias(args.project)):
        # What the pipeline just registered, as `make bench-serving` passes it: on the sample the gate keeps the
        # new version as @challenger, and params' @champion may name an older version or none at all.
        extra_env["BONETUMOR_MODEL_ALIAS"], line = registered
        print(line, flush=True)
    alias = extra_env.get("BONETUMOR_MODEL_ALIAS")
    tiles = read_tiles(args.images)
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine_info()}
    report["versions"] = versions()
    load = report["machine"]["load_average_start"]
    print(
        f"{report['machine']['cpu_count']} cores ({report['machine']['cpu_model'] or 'unknown CPU'}), load average "
        f"{fmt(load[0] if load else None)}; {len(tiles)} tiles from {args.images}",
        flush=True,
    )
    if not args.no_inprocess:
        report["in_process"] = in_process(args.project, alias, tiles, args)
    report["served"] = served_figures(args, tiles, extra_env)
    report["ready_s"] = report["served"]["ready_s"]
    finish(report)
    text = markdown(report)
    for path, content in ((args.json, json.dumps(report, indent=2, default=str) + "\n"), (args.markdown, text)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    print("\n" + text)
    for note in report["notes"]:
        print(f"note: {note}")
    counts = Counter(g["status"] for g in report["goals"])
    failed = "".join(f"\n  FAIL: {g['goal']}" for g in report["goals"] if g["status"] == "FAIL")
    print(f"goals: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP (not measured){failed}")
    print(f"wrote {args.json} and {args.markdown}")
    levels = report["served"]["levels"]
    errors = sum(lv["errors"] for lv in levels)
    print(f"errors: {errors} of {sum(lv['requests'] for lv in levels)} timed requests over {len(levels)} levels")
    if errors and args.fail_on_errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
