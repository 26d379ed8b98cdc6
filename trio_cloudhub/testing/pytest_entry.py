"""The package's `pytest11` entry point: loads the trio-cloudhub fixtures only when asked.

Installing trio-cloudhub (a server) must not change anyone's test runs, so the entry point
only adds the ini option `trio_cloudhub` (default false); with `trio_cloudhub = true` it
loads `trio_cloudhub.testing.pytest_plugin`. `-p trio_cloudhub.testing.pytest_plugin` and
`pytest_plugins = [...]` load it without the option; `-p no:trio_cloudhub` turns this
entry point off. Imports nothing heavy: it runs in every pytest process of the environment.
"""

from __future__ import annotations

import pytest

PLUGIN = "trio_cloudhub.testing.pytest_plugin"
INI = "trio_cloudhub"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        INI,
        type="bool",
        default=False,
        help="load the trio-cloudhub fixtures (cloudhub, cloudhub_edge, cloudhub_kube)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getini(INI):
        config.pluginmanager.import_plugin(PLUGIN)
