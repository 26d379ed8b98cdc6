"""Recorded CloudCore <-> EdgeCore frames (`shared/vectors/*.jsonl`) for tests.

The vectors live beside the repository: `<clone>/../shared/vectors`. Set
`TRIO_CLOUDHUB_VECTORS` to another directory to override. A missing directory is an error,
never a skip: tests that rely on real frames must not pass silently without them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VECTORS_DIR = Path(
    os.environ.get("TRIO_CLOUDHUB_VECTORS") or REPO_ROOT.parent / "shared" / "vectors"
)

CLOUD_TO_EDGE = "cloud->edge"
EDGE_TO_CLOUD = "edge->cloud"

Frame = tuple[str, str, str]


def load_frames(directory: Path = VECTORS_DIR) -> list[Frame]:
    """Every recorded frame as (file name, direction, data), in file and line order."""
    if not directory.is_dir():
        raise FileNotFoundError(
            f"test vectors not found at {directory} (set TRIO_CLOUDHUB_VECTORS)"
        )
    files = sorted(directory.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no *.jsonl test vectors in {directory}")
    frames: list[Frame] = []
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                frames.append((path.name, record["dir"], record["data"]))
    return frames
