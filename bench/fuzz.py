"""Fuzz every parser with many inputs and report, per target, what was tried and found.

    python -m bench.fuzz                                  # every target, 60 s each
    python -m bench.fuzz --targets codec,quic --count 1000000
    python -m bench.fuzz --engine atheris --seconds 300   # coverage-guided, if atheris installs

The targets are `trio_cloudhub.testing.fuzz.TARGETS` (the same properties the hypothesis tests
check in CI: a valid result or a typed error, the same messages however reads are cut, output
well-formed). Engines:

- `mutate` (default): seeds (valid inputs of each format) mutated by bit flips, interesting
  bytes, dictionary tokens, deletions, duplications, splices and truncations; an input whose
  outcome (result or typed error, by kind) was not seen before joins the corpus, so the run
  drifts into new parts of the format. Async targets run in batches inside one trio.run.
- `atheris`: libFuzzer's coverage-guided search over the instrumented package, one child
  process per target (atheris is optional: `pip install atheris`).

Each target stops after `--count` inputs or `--seconds`, whichever comes first, and prints one
JSON line: inputs tried, seconds, inputs per second, distinct outcomes, corpus size, slowest
input, the process's RSS before and after (bounded memory), and findings: unexpected
exceptions or property violations by type and message, each with a count and the first
input (hex, cut) -- also saved whole under `--out` -- and inputs slower than `--slow` seconds.
Exit status 1 when something was found.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from bench.run import machine
from trio_cloudhub.testing import fuzz

BATCH = 256  # async inputs per trio.run
MAX_CORPUS = 2000
HEX_CUT = 240


class Hang(Exception):
    """A synchronous input that ran past the hard time limit (SIGALRM)."""


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def signature(result: str) -> str:
    """An outcome by kind: numbers and quoted parts dropped, so positions do not count."""
    return re.sub(r"\d+|'[^']*'|\"[^\"]*\"", "#", result)[:60]


class Report:
    def __init__(self, name: str, engine: str, out: Path, slow: float) -> None:
        self.name = name
        self.engine = engine
        self.out = out
        self.slow = slow
        self.inputs = 0
        self.outcomes: Counter[str] = Counter()
        self.findings: dict[str, dict[str, Any]] = {}
        self.slowest = 0.0
        self.started = time.perf_counter()
        self.rss_before = rss_mb()

    def record(self, data: bytes, result: str | BaseException, elapsed: float) -> bool:
        """Count one input; True when its outcome is new."""
        self.inputs += 1
        self.slowest = max(self.slowest, elapsed)
        if elapsed > self.slow:
            self._find(f"slow: over {self.slow:g} s", data, elapsed)
        if isinstance(result, BaseException):
            kind = "property" if isinstance(result, fuzz.PropertyViolation) else "exception"
            self._find(f"{kind}: {type(result).__name__}: {str(result)[:120]}", data, elapsed)
            return False
        key = signature(result)
        new = key not in self.outcomes
        self.outcomes[key] += 1
        return new

    def _find(self, key: str, data: bytes, elapsed: float) -> None:
        entry = self.findings.get(key)
        if entry is None:
            self.out.mkdir(parents=True, exist_ok=True)
            path = self.out / f"{self.name}-{len(self.findings)}.bin"
            path.write_bytes(data)
            entry = self.findings[key] = {
                "what": key,
                "count": 0,
                "first_input_hex": data[:HEX_CUT].hex(),
                "first_input_bytes": len(data),
                "saved": str(path),
                "seconds": round(elapsed, 3),
            }
        entry["count"] += 1

    def figures(self, corpus: int) -> dict[str, Any]:
        seconds = time.perf_counter() - self.started
        return {
            "scenario": "fuzz",
            "target": self.name,
            "engine": self.engine,
            "inputs": self.inputs,
            "seconds": round(seconds, 1),
            "inputs_per_s": round(self.inputs / seconds) if seconds else 0,
            "distinct_outcomes": len(self.outcomes),
            "corpus": corpus,
            "slowest_input_ms": round(self.slowest * 1000, 1),
            "rss_mb_before": self.rss_before,
            "rss_mb_after": rss_mb(),
            "findings": list(self.findings.values()),
        }


def _alarm(signum: int, frame: Any) -> None:
    raise Hang("input ran past the hard time limit")


def _run_sync(target: fuzz.Target, data: bytes, limit: float) -> tuple[str | BaseException, float]:
    assert target.run is not None
    started = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        result: str | BaseException = target.run(data)
    except Exception as exc:  # a finding, whatever it is
        result = exc
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return result, time.perf_counter() - started


async def _run_batch(
    target: fuzz.Target, batch: list[bytes]
) -> list[tuple[str | BaseException, float]]:
    assert target.run_async is not None
    results: list[tuple[str | BaseException, float]] = []
    for data in batch:
        started = time.perf_counter()
        try:
            result: str | BaseException = await target.run_async(data)
        except Exception as exc:  # trio.TooSlowError (the target's time bound) included
            result = exc
        results.append((result, time.perf_counter() - started))
    return results


def mutate_target(
    target: fuzz.Target, count: int, seconds: float, seed: int, out: Path, slow: float
) -> dict[str, Any]:
    rng = random.Random(seed)
    seeds = target.seeds()
    corpus = list(seeds)
    report = Report(target.name, "mutate", out, slow)
    deadline = time.perf_counter() + seconds

    def inputs(n: int) -> Iterator[bytes]:
        for _ in range(n):
            base = rng.choice(corpus) if rng.random() < 0.7 else rng.choice(seeds)
            yield fuzz.mutate(base, rng, target.tokens, corpus)

    def keep(data: bytes, new: bool) -> None:
        if new and len(corpus) < MAX_CORPUS:
            corpus.append(data)

    for data in seeds:  # the seeds themselves first: each must pass
        result, elapsed = (
            _run_sync(target, data, 10 * slow)
            if target.run is not None
            else trio.run(_run_batch, target, [data])[0]
        )
        report.record(data, result, elapsed)
    while report.inputs < count and time.perf_counter() < deadline:
        if target.run is not None:
            for data in inputs(min(1000, count - report.inputs)):
                result, elapsed = _run_sync(target, data, 10 * slow)
                keep(data, report.record(data, result, elapsed))
        else:
            batch = list(inputs(min(BATCH, count - report.inputs)))
            for data, (result, elapsed) in zip(
                batch, trio.run(_run_batch, target, batch), strict=True
            ):
                keep(data, report.record(data, result, elapsed))
    return report.figures(len(corpus))


# --- atheris (optional) -------------------------------------------------------------------------


def atheris_target(
    name: str, count: int, seconds: float, seed: int, out: Path, slow: float
) -> dict[str, Any]:
    """Run the target under atheris in a child process (libFuzzer exits the process)."""
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as work:
        stats = Path(work) / "stats.json"
        command = [
            sys.executable,
            "-m",
            "bench.fuzz",
            "--atheris-child",
            name,
            "--count",
            str(count),
            "--seconds",
            str(seconds),
            "--seed",
            str(seed),
            "--out",
            str(out),
            "--slow",
            str(slow),
            "--stats",
            str(stats),
        ]
        child = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 600)
        if not stats.exists():
            tail = (child.stderr or child.stdout)[-2000:]
            return {"scenario": "fuzz", "target": name, "engine": "atheris", "error": tail}
        figures: dict[str, Any] = json.loads(stats.read_text())
        figures["libfuzzer_exit"] = child.returncode
        # libFuzzer's own count (our stats file is written every 0.5 s) and coverage line.
        executed = re.search(r"stat::number_executed_units:\s*(\d+)", child.stderr)
        if executed:
            figures["inputs"] = int(executed.group(1))
        status = [line for line in child.stderr.splitlines() if re.match(r"#\d+\s", line)]
        figures["libfuzzer_last_status"] = status[-1] if status else ""
        if not executed and status:
            figures["inputs"] = int(status[-1][1:].split()[0])
        return figures


def atheris_child(name: str, args: argparse.Namespace) -> None:
    import atheris  # type: ignore[import-not-found,unused-ignore]

    target = fuzz.TARGETS[name]
    report = Report(name, "atheris", args.out, args.slow)
    corpus_dir = Path(tempfile.mkdtemp(prefix=f"corpus-{name}-"))
    for index, data in enumerate(target.seeds()):
        (corpus_dir / f"seed-{index}").write_bytes(data)
    last_write = [0.0]

    def write_stats(force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - last_write[0] > 0.5:
            last_write[0] = now
            Path(args.stats).write_text(json.dumps(report.figures(0)))

    def one_input(data: bytes) -> None:
        if target.run is not None:
            result, elapsed = _run_sync(target, data, 10 * args.slow)
        else:
            result, elapsed = trio.run(_run_batch, target, [data])[0]
        report.record(data, result, elapsed)
        write_stats(report.inputs >= args.count)

    atheris.Setup(
        [
            sys.argv[0],
            str(corpus_dir),
            f"-runs={args.count}",
            f"-max_total_time={int(args.seconds)}",
            f"-seed={args.seed}",
            "-max_len=131072",
            "-print_final_stats=1",
        ],
        one_input,
    )
    atheris.Fuzz()


def instrumented_imports() -> None:
    """Re-import the package under atheris' coverage instrumentation (child only)."""
    import importlib

    import atheris  # type: ignore[import-not-found,unused-ignore]

    global fuzz
    for module in [name for name in sys.modules if name.startswith("trio_cloudhub")]:
        del sys.modules[module]
    with atheris.instrument_imports(include=["trio_cloudhub"]):
        fuzz = importlib.import_module("trio_cloudhub.testing.fuzz")


# --- command line -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--targets", default="all", help=f"comma list of: {', '.join(fuzz.TARGETS)}"
    )
    parser.add_argument("--count", type=int, default=10_000_000, help="inputs per target (max)")
    parser.add_argument("--seconds", type=float, default=60.0, help="time per target (max)")
    parser.add_argument("--engine", choices=("mutate", "atheris"), default="mutate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--slow", type=float, default=1.0, help="an input slower than this is a finding"
    )
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "cloudhub-fuzz")
    parser.add_argument("--atheris-child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--stats", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)  # refusals are logged per input
    warnings.simplefilter("ignore")  # cryptography warns about junk it still parses
    signal.signal(signal.SIGALRM, _alarm)
    if args.atheris_child:
        instrumented_imports()
        atheris_child(args.atheris_child, args)
        return
    names = list(fuzz.TARGETS) if args.targets == "all" else args.targets.split(",")
    found = False
    for name in names:
        if args.engine == "atheris":
            figures = atheris_target(name, args.count, args.seconds, args.seed, args.out, args.slow)
        else:
            target = fuzz.TARGETS[name]
            figures = mutate_target(
                target, args.count, args.seconds, args.seed, args.out, args.slow
            )
        figures["machine"] = machine()
        found = found or bool(figures.get("findings")) or "error" in figures
        print(json.dumps(figures), flush=True)
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
