"""Real network faults, full size: `python -m bench.netfaults` (as root; see bench/README.md).

The scenarios of `trio_cloudhub.testing.netfaults` (network namespaces, veth pairs, nftables
drops and loss, tbf): the same ones the tests in tests/netns run at CI size. Here
`slow_link` sends 10 MiB (four secrets of 2.5 MiB of base64 text: the embedded store reads
manifest files of at most 4 MiB) over a 64 kbit/s link with CloudCore's defaults
(writeTimeout 30 s, ACK timeout 5 s): about 22 minutes. Each scenario prints one JSON line of
figures; a scenario whose invariant breaks prints its error and the run exits 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from bench.run import machine
from trio_cloudhub.testing.netfaults import SCENARIOS

FULL: dict[str, dict[str, Any]] = {
    "slow_link": {
        "rate": "64kbit",
        "secret_bytes": 5 * 512 * 1024,
        "secrets": 4,
        "write_timeout": 30.0,
        "ack_timeout": 5.0,
        "within": 3600.0,
    },
}
SMALL: dict[str, dict[str, Any]] = {
    "slow_link": {"rate": "256kbit", "secret_bytes": 512 * 1024, "within": 120.0},
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.netfaults")
    parser.add_argument("--scenario", default="all", choices=["all", *SCENARIOS])
    parser.add_argument(
        "--small", action="store_true", help="the CI sizes (slow_link: 512 KiB at 256 kbit/s)"
    )
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the hub logs and edge events")
    return parser.parse_args(argv)


async def run_one(name: str, sizes: dict[str, dict[str, Any]], keep: bool) -> bool:
    root = Path(tempfile.mkdtemp(prefix=f"netfaults-{name}-"))
    began = time.time()
    try:
        figures = await SCENARIOS[name](root / "rig", **sizes.get(name, {}))
    except Exception as exc:
        traceback.print_exc()
        failure = {"scenario": name, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(json.dumps({**failure, "logs": str(root)}), flush=True)
        return False
    figures["wall_s"] = round(time.time() - began, 1)
    if keep:
        figures["logs"] = str(root)
    else:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({**figures, "machine": machine()}), flush=True)
    return True


async def main_async(args: argparse.Namespace) -> int:
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    sizes = SMALL if args.small else FULL
    ok = True
    for _ in range(args.repeat):
        for name in names:
            ok = await run_one(name, sizes, args.keep) and ok
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    return trio.run(main_async, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
