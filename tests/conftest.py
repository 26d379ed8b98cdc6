"""Plugins for the whole suite: `pytester` runs pytest inside tests (the pytest plugin's)."""

pytest_plugins = ["pytester"]
