"""The soak of issue 3 in its small form: the real hub restarted by SIGTERM and SIGKILL while
random changes are written and edges drop, and no edge ends up off its desired state."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[2]


async def test_small_soak_loses_nothing() -> None:
    command = [sys.executable, "-m", "bench.soak", "--edges", "5", "--changes", "300"]
    command += ["--restarts", "2", "--seed", "7", "--converge-timeout", "60"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    with trio.fail_after(240):
        result = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False, cwd=REPO, env=env
        )
    stderr = result.stderr.decode(errors="replace")
    lines = result.stdout.decode().strip().splitlines()
    assert lines, f"no output; stderr:\n{stderr[-4000:]}"
    figures = json.loads(lines[-1])
    assert figures["lost"] == 0, figures
    assert figures["converged"], figures
    assert figures["restarts"] == {"sigterm": 1, "sigkill": 1}, figures
    assert figures["sigterm_exit_codes"] == [0], figures
    assert figures["hub_starts"] >= 3, figures  # the first start and one per restart
    assert figures["disconnects"] > 0, figures
    assert figures["latency_samples"] > 0, figures
    assert result.returncode == 0, stderr[-4000:]
