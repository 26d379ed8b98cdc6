"""Prometheus text expositions of several processes as one, each series labelled with its
process (`worker="<n>"`): the supervisor of `serve --workers N` answers its metrics port so.

A family's HELP/TYPE lines come once and all its samples follow them, as the text format
requires; sums over workers are the scraper's (`sum without (worker) (...)`).
"""

from __future__ import annotations

from collections.abc import Sequence


def merge_expositions(texts: Sequence[str], workers: Sequence[str], label: str = "worker") -> str:
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for text, worker in zip(texts, workers, strict=True):
        family = ""
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    known = headers.setdefault(family, [])
                    samples.setdefault(family, [])
                    if line not in known:
                        known.append(line)
                continue
            samples.setdefault(family, []).append(labelled(line, label, worker))
    out: list[str] = []
    for family, lines in samples.items():
        out.extend(headers.get(family, []))
        out.extend(lines)
    return "\n".join(out) + ("\n" if out else "")


def labelled(sample: str, label: str, value: str) -> str:
    """`name{a="b"} 1` -> `name{worker="0",a="b"} 1`; `name 1` -> `name{worker="0"} 1`."""
    brace = sample.find("{")
    space = sample.find(" ")
    pair = f'{label}="{value}"'
    if brace != -1 and (space == -1 or brace < space):
        rest = sample[brace + 1 :]
        return f"{sample[:brace]}{{{pair}{'' if rest.startswith('}') else ','}{rest}"
    if space == -1:
        return sample
    return f"{sample[:space]}{{{pair}}}{sample[space:]}"
