"""The Kubernetes fan-out bench (issue 4, item 7) in its small form: the real hub on the fake API
server, pods and config maps for a few edges, and every edge and every ObjectSync gets all."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[2]


async def test_small_kube_fanout_delivers_and_records_everything() -> None:
    command = [sys.executable, "-m", "bench.kube_fanout", "--nodes", "5", "--pods", "50"]
    command += ["--timeout", "30"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    with trio.fail_after(90):
        result = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False, cwd=REPO, env=env
        )
    stderr = result.stderr.decode(errors="replace")
    lines = result.stdout.decode().strip().splitlines()
    assert lines, f"no output; stderr:\n{stderr[-4000:]}"
    figures = json.loads(lines[-1])
    assert figures["complete"], figures
    assert figures["missing"] == 0 and figures["unacked"] == 0, figures
    assert figures["messages"] >= 100, figures  # 50 pods + 50 config maps
    assert figures["all_acked_s"] is not None, figures
    assert figures["objectsyncs_written_s"] is not None, figures
    assert figures["api_requests_phase"].get("create objectsyncs") == 100, figures
    assert figures["hub_sigterm_exit_code"] == 0, figures
    assert result.returncode == 0, stderr[-4000:]
