"""Hypothesis profiles for the fuzz tests: `ci` (default, bounded: the whole folder runs in
well under a minute on 2 cores), `dev` and `long` for more examples by hand:

    HYPOTHESIS_PROFILE=long .venv/bin/pytest tests/fuzz

`bench/fuzz.py` runs millions of mutated inputs against the same targets.
Deadlines are off (a loaded CI machine would make them flaky); every example has a time
bound of its own instead (`fuzz.TIME_BOUND` for async targets, `bounded()` for the others).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}
settings.register_profile("ci", max_examples=60, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("dev", max_examples=1000, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("long", max_examples=20000, **_COMMON)  # type: ignore[arg-type]
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def quiet_parsers() -> Iterator[None]:
    """Refusals are logged at INFO/WARNING per input; thousands of them only slow the run.
    cryptography warns about junk it still parses (e.g. a negative serial number)."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logging.disable(previous)
