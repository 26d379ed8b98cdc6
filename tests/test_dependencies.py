"""pyproject.toml lists what the code imports, and nothing else.

- every distribution in `dependencies` and in the extras the package's own code needs
  (`kube`, `quic`, `testing`) is imported somewhere in `trio_cloudhub/`;
- every one in `dev` is imported by the package, the tests or the benchmarks, or is a tool
  named in `TOOLS` (with why);
- every third-party module the package imports comes from a declared distribution.

Distribution names map to import names through the installed metadata
(`importlib.metadata.packages_distributions`), except where `IMPORT_NAMES` says (a
namespace package shared by several distributions).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_EXTRAS = ("kube", "quic", "testing")  # needed by trio_cloudhub/ itself
# Listed but never imported: what each is for.
TOOLS = {
    "ruff": "linter, run by CI",
    "mypy": "type checker, run by CI",
    "types-PyYAML": "stubs read by mypy",
    "pytest-trio": "pytest plugin (trio_mode), loaded by pytest's entry points",
}
# Distributions whose importable name the top-level package does not tell.
IMPORT_NAMES = {"protobuf": {"google.protobuf"}}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return normalize(match.group(0))


def pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements(group: str) -> set[str]:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    listed = project["dependencies"] if group == "" else project["optional-dependencies"][group]
    return {requirement_name(item) for item in listed}


def imported_modules(folders: Iterable[Path]) -> set[str]:
    """Dotted names of every absolute import in the .py files under `folders`."""
    found: set[str] = set()
    for folder in folders:
        for path in folder.rglob("*.py"):
            if ".venv" in path.parts:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    found.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    found.add(node.module)
    return found


def import_names() -> dict[str, set[str]]:
    """distribution (normalized) -> the module names it provides."""
    names: dict[str, set[str]] = {}
    for module, distributions in importlib.metadata.packages_distributions().items():
        for distribution in distributions:
            names.setdefault(normalize(distribution), set()).add(module)
    for distribution, modules in IMPORT_NAMES.items():
        names[normalize(distribution)] = set(modules)
    return names


def provides(modules: set[str], imported: set[str]) -> bool:
    return any(
        name == module or name.startswith(module + ".") for name in imported for module in modules
    )


def unused(
    distributions: Iterable[str], imported: set[str], names: Mapping[str, set[str]]
) -> dict[str, str]:
    """distribution -> why it counts as unused (imported by nothing, or not installed)."""
    problems: dict[str, str] = {}
    for distribution in sorted(distributions):
        modules = names.get(distribution)
        if not modules:
            problems[distribution] = "not installed here: cannot tell its import names"
        elif not provides(modules, imported):
            problems[distribution] = f"imported by nothing (provides {sorted(modules)})"
    return problems


def test_every_runtime_dependency_and_package_extra_is_imported_by_the_package() -> None:
    imported = imported_modules([ROOT / "trio_cloudhub"])
    listed = requirements("").union(*(requirements(extra) for extra in PACKAGE_EXTRAS))
    assert unused(listed, imported, import_names()) == {}


def test_every_dev_dependency_is_imported_or_a_named_tool() -> None:
    imported = imported_modules([ROOT / "trio_cloudhub", ROOT / "tests", ROOT / "bench"])
    tools = {normalize(name) for name in TOOLS}
    assert tools <= requirements("dev"), "TOOLS names something dev no longer lists"
    assert unused(requirements("dev") - tools, imported, import_names()) == {}


def test_every_third_party_import_of_the_package_is_declared() -> None:
    declared = requirements("").union(*(requirements(extra) for extra in PACKAGE_EXTRAS))
    by_module = {
        module: {normalize(d) for d in distributions}
        for module, distributions in importlib.metadata.packages_distributions().items()
    }
    undeclared: dict[str, set[str]] = {}
    for name in imported_modules([ROOT / "trio_cloudhub"]):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top in ("trio_cloudhub", "__future__"):
            continue
        providers = by_module.get(top, set())
        if not providers & declared:
            undeclared[name] = providers
    assert undeclared == {}


def test_the_check_finds_a_dependency_nothing_imports() -> None:
    names = {"hypercorn": {"hypercorn"}, "h11": {"h11"}, "protobuf": {"google.protobuf"}}
    imported = {"h11", "google.auth.transport", "trio"}
    assert unused(["hypercorn", "h11", "protobuf", "gone"], imported, names) == {
        "hypercorn": "imported by nothing (provides ['hypercorn'])",
        "protobuf": "imported by nothing (provides ['google.protobuf'])",
        "gone": "not installed here: cannot tell its import names",
    }
    assert unused(["protobuf"], {"google.protobuf.message"}, names) == {}


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("PyYAML>=6.0", "pyyaml"),
        ("trio>=0.30,<0.36", "trio"),
        ("prometheus_client", "prometheus-client"),
    ],
)
def test_requirement_names(text: str, name: str) -> None:
    assert requirement_name(text) == name
