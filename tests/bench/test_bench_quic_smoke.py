"""The hub benchmark (`bench.run`) over QUIC in its smallest form: the real `serve` with QUIC
enabled, a QUIC fleet (many edges in one trio-asyncio loop per fleet process), and the
connect, idle and fan-out scenarios complete with every edge. No timing is asserted."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

pytest.importorskip("aioquic")
pytest.importorskip("trio_asyncio")

REPO = Path(__file__).resolve().parents[2]
EDGES = 10


async def test_bench_runs_its_scenarios_over_quic() -> None:
    command = [sys.executable, "-m", "bench.run", "--edges", str(EDGES), "--idle-seconds", "1"]
    command += ["--scenario", "all", "--transport", "quic", "--fleet-procs", "2"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("BENCH_PYSPY", None)
    env.pop("BENCH_CPROFILE", None)
    with trio.fail_after(120):
        result = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False, cwd=REPO, env=env
        )
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0, stderr[-4000:]
    lines: dict[str, dict[str, Any]] = {}
    for line in result.stdout.decode().splitlines():
        figures = json.loads(line)
        lines[figures["scenario"]] = figures
    assert set(lines) == {"connect", "idle", "fanout"}, (lines, stderr[-4000:])
    assert all(figures["transport"] == "quic" for figures in lines.values()), lines
    connect, idle, fanout = lines["connect"], lines["idle"], lines["fanout"]
    assert connect["connected"] == EDGES and connect["failed"] == 0, connect
    assert idle["connected"] == EDGES and idle["initial_sync_acks"] == 2 * EDGES, idle
    assert fanout["received"] == EDGES, fanout
    assert fanout["acked_by_edges"] == EDGES, fanout
    assert fanout["acks_recorded_by_hub"] == [EDGES], fanout  # one round
