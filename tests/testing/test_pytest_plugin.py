"""The pytest plugin, run as a user's test suite would run it (pytester, in-process).

The README's example files are extracted from README.md and run unchanged, so the two cannot
drift apart. Each inner run starts real hubs (in-process `serve`, TLS on loopback) and
simulated edges; their waits are bounded by the helpers (`within=`) and the fixture's start.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

# Imported here, before any inner run: pytester restores `sys.modules` after each in-process
# run, and a module imported again beside its C extension's old classes breaks (cryptography).
import trio_cloudhub.hub.server
import trio_cloudhub.store.kube.store
import trio_cloudhub.testing.fake_kube
import trio_cloudhub.testing.pytest_plugin
import trio_cloudhub.testing.quic_sim  # noqa: F401

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Test edge code and manifests with pytest"
PLUGIN = "trio_cloudhub.testing.pytest_plugin"


def readme_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return text[start:end]


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", readme_section(), re.S | re.M)


def example_files() -> dict[str, str]:
    """The README's test files: python blocks whose first line is `# test_<name>.py`."""
    files = {}
    for block in code_blocks("python"):
        first = block.splitlines()[0]
        match = re.fullmatch(r"# (test_\w+)\.py", first)
        if match:
            files[match.group(1)] = block
    return files


def test_the_readme_has_the_example_files_and_the_ini_switch() -> None:
    assert set(example_files()) == {"test_edge_app", "test_edge_app_extras"}
    assert code_blocks("toml") == ["[tool.pytest.ini_options]\ntrio_cloudhub = true\n"]


def test_the_readme_example_runs_as_written(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml(code_blocks("toml")[0])
    pytester.makepyfile(**example_files())
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)


def test_the_fixtures_are_off_unless_enabled(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.trio
        async def test_hub(cloudhub):
            assert cloudhub.websocket_port
        """
    )
    off = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    off.assert_outcomes(errors=1)
    off.stdout.fnmatch_lines(["*fixture 'cloudhub' not found*"])
    on = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", PLUGIN)
    on.assert_outcomes(passed=1)
    on.stdout.fnmatch_lines(["trio-cloudhub fixtures: cloudhub, *"])


def test_a_wait_that_is_not_satisfied_fails_saying_what_the_edge_holds(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        """
        import pytest

        CM = {"apiVersion": "v1", "kind": "ConfigMap", "data": {"a": "1"},
              "metadata": {"name": "cm", "namespace": "default"}}
        POD = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "p", "namespace": "default"},
               "spec": {"nodeName": "edge-1", "containers": [{"name": "c", "image": "i",
                        "envFrom": [{"configMapRef": {"name": "cm"}}]}]}}

        @pytest.mark.trio
        async def test_wait(cloudhub, cloudhub_edge):
            edge = await cloudhub_edge("edge-1")
            await cloudhub.apply(CM, POD)
            await edge.wait_holds("default/configmap/cm")
            await edge.wait_holds(
                "default/configmap/cm", matching=lambda cm: cm["data"] == {"a": "2"}, within=0.5
            )
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", PLUGIN)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*edge-1 did not hold default/configmap/cm within 0.5 s; it holds: *default/pod/p@*"]
    )


def test_cloudhub_config_overrides_the_hubs_configuration(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture
        def cloudhub_config():
            return {"modules": {"cloudHub": {"nodeLimit": 1}}}
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.trio
        async def test_limit(cloudhub, cloudhub_edge):
            assert cloudhub.config.cloud_hub.node_limit == 1
            first = await cloudhub_edge("edge-1")
            second = await cloudhub_edge("edge-2")
            reason = await second.wait_disconnected()
            assert "node limit" in reason, reason
            assert first.connected
            assert (await cloudhub.node("edge-1"))["status"] == "Connected"
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", PLUGIN)
    result.assert_outcomes(passed=1)


def test_v1_10_and_v1_23_edges_store_by_their_lines_rules(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        from trio_cloudhub.core.message import new_message

        @pytest.mark.trio
        @pytest.mark.parametrize("line", ["v1.10", "v1.23"])
        async def test_duplicate_insert(cloudhub, cloudhub_edge, line):
            edge = await cloudhub_edge("edge-1", edgecore=line)
            assert edge.storage.line == line
            await cloudhub.apply({"apiVersion": "v1", "kind": "Node",
                                  "metadata": {"name": "edge-1"}})
            await edge.wait_holds("null/node/edge-1")
            # an insert of a key the edge holds: v1.10 answers OK and keeps the old row
            old = edge.storage.get("null/node/edge-1")
            again = new_message(source="edgecontroller", group="resource", operation="insert",
                                resource="null/node/edge-1", content={"metadata": {"name": "x"}},
                                now_ms=0)
            edge.storage.handle(again)
            kept = edge.storage.get("null/node/edge-1")
            assert (kept == old) == (line == "v1.10")
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", PLUGIN)
    result.assert_outcomes(passed=2)
