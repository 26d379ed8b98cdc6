"""Waking on change: the inotify watch alone, then the store following the folder with it.

Real clock, real files. The store tests use a poll interval of 10 s (fallback poll with the
watch: 200 s) and wait at most 2 s, so only a notification can explain a prompt sync.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
import trio
import yaml

from tests.store.conftest import (
    Running,
    config_map,
    eventually,
    pod,
    running_store,
    write_manifest,
)
from trio_cloudhub.core.message import Message
from trio_cloudhub.store import local as local_module
from trio_cloudhub.store import watch as watch_module
from trio_cloudhub.store.local import WATCHED_POLL_MIN, LocalStore, open_local_store
from trio_cloudhub.store.manifests import changes_manifests
from trio_cloudhub.store.watch import FolderWatch, blind_spot, filesystem_type, folder_watch

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux")
Dirs = tuple[Path, Path]
SLOW_POLL = 10.0
PROMPT = 2.0  # far below the fallback poll of the watched store (200 s)


async def notified(watch: FolderWatch) -> int:
    with trio.fail_after(PROMPT):
        await watch.wait()
    return watch.drain()


@linux_only
async def test_watch_reports_changes_in_the_folder(tmp_path: Path) -> None:
    with folder_watch(tmp_path) as watch:
        assert watch is not None and watch.watching
        assert watch.drain() == 0  # nothing pending: does not block
        (tmp_path / "a.yaml").write_text("x: 1")
        assert await notified(watch) >= 2  # create, modify, close
        os.replace(tmp_path / "a.yaml", tmp_path / "b.yaml")
        assert await notified(watch) == 2  # moved from, moved to
        with trio.move_on_after(0.05):
            await watch.wait()
            raise AssertionError("no event pending after drain()")
        (tmp_path / "b.yaml").unlink()
        assert await notified(watch) >= 1
        fd = watch.fileno()
    assert watch.fileno() == -1 and not watch.watching
    with pytest.raises(OSError):
        os.fstat(fd)  # closed on exit


def open_for_writing(path: Path, text: str) -> int:
    """A file written whole but still open, as a slow writer leaves it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, text.encode())
    return fd


@linux_only
async def test_settled_once_the_writes_notified_are_complete(tmp_path: Path) -> None:
    with folder_watch(tmp_path, relevant=changes_manifests) as watch:
        assert watch is not None
        watch.begin_settling()
        fd = open_for_writing(tmp_path / "a.yaml", "x: 1")
        await notified(watch)
        assert not watch.settled  # created and written, still open
        os.close(fd)
        await notified(watch)
        assert watch.settled  # closed
        watch.begin_settling()
        (tmp_path / ".a.yaml.tmp").write_text("x: 2")
        await notified(watch)
        assert not watch.settled  # complete, but a name the store ignores
        os.replace(tmp_path / ".a.yaml.tmp", tmp_path / "a.yaml")
        await notified(watch)
        assert watch.settled  # renamed into place
        watch.begin_settling()
        os.replace(tmp_path / "a.yaml", tmp_path / "a.yaml~")
        await notified(watch)
        assert not watch.settled  # gone, perhaps for an instant (an editor's backup)
        (tmp_path / "a.yaml").write_text("x: 3")
        await notified(watch)
        assert watch.settled


@linux_only
async def test_watch_ends_with_the_folder_and_rearms_on_a_new_one(tmp_path: Path) -> None:
    folder = tmp_path / "manifests"
    folder.mkdir()
    with folder_watch(folder) as watch:
        assert watch is not None
        folder.rmdir()
        await notified(watch)
        assert not watch.watching
        assert not watch.rearm()  # nothing at the path
        folder.mkdir()
        assert watch.rearm() and watch.watching
        (folder / "a.yaml").write_text("x: 1")
        assert await notified(watch) >= 1
        # Moved away: the watch would follow the old folder, so it ends too.
        folder.rename(tmp_path / "elsewhere")
        await notified(watch)
        assert not watch.watching


def test_watch_disabled_or_unavailable_is_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with folder_watch(tmp_path, enabled=False) as watch:
        assert watch is None

    def no_inotify() -> object:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(watch_module, "_load", no_inotify)
    caplog.set_level(logging.INFO, logger="trio_cloudhub.store")
    with folder_watch(tmp_path) as watch:
        assert watch is None
    [record] = caplog.records
    assert record.levelno == logging.INFO and "polling" in record.getMessage()


# --- the store following the folder ---------------------------------------------------------


async def started(
    nursery: trio.Nursery, store: LocalStore, manifests: Path
) -> tuple[Running, trio.MemorySendChannel[Message]]:
    send, receive = trio.open_memory_channel[Message](1000)
    with trio.fail_after(5):
        await nursery.start(store.run, send.send_nowait)
    return Running(store, receive, manifests), send


async def next_message(running: Running) -> Message:
    with trio.fail_after(PROMPT):
        return await running.receive.receive()


async def prompt(running: Running) -> list[tuple[str, str]]:
    message = await next_message(running)
    return [(message.route.operation, message.route.resource)]


@linux_only
async def test_change_is_seen_at_once_not_at_the_fallback_poll(dirs: Dirs) -> None:
    data, manifests = dirs
    write_manifest(manifests, "app.yaml", config_map("cfg"), pod("web", "edge-1"))
    async with (
        open_local_store(data, manifests, poll_interval=SLOW_POLL) as store,
        trio.open_nursery() as nursery,
    ):
        assert store.watched_poll_interval == SLOW_POLL * 20
        running, _ = await started(nursery, store, manifests)
        assert len(running.initial()) == 1  # the pod; the unused config map goes nowhere
        # Written in place (no rename): create/modify/close-write.
        (manifests / "more.yaml").write_text(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: api}\nspec: {nodeName: edge-2}\n"
        )
        assert await prompt(running) == [("insert", "node/edge-2/default/pod/api")]
        (manifests / "more.yaml").unlink()
        assert await prompt(running) == [("delete", "node/edge-2/default/pod/api")]
        nursery.cancel_scope.cancel()


@pytest.fixture
def long_debounce(monkeypatch: pytest.MonkeyPatch) -> None:
    """A debounce of 60 s: only `settled` can make the store read a change promptly."""
    monkeypatch.setattr(local_module, "WATCH_DEBOUNCE", 60.0)


@linux_only
@pytest.mark.usefixtures("long_debounce")
async def test_a_complete_write_is_read_at_once_an_open_one_when_closed(dirs: Dirs) -> None:
    data, manifests = dirs
    async with running_store(data, manifests, poll_interval=SLOW_POLL) as running:
        write_manifest(manifests, "web.yaml", pod("web", "edge-1"))  # a dot file renamed
        assert await prompt(running) == [("insert", "node/edge-1/default/pod/web")]
        fd = open_for_writing(manifests / "api.yaml", yaml.safe_dump(pod("api", "edge-1")))
        with trio.move_on_after(0.5):
            message = await running.receive.receive()
            raise AssertionError(f"read while still open: {message.route}")
        os.close(fd)
        assert await prompt(running) == [("insert", "node/edge-1/default/pod/api")]


def config_map_volume_version(folder: Path, version: str, text: str) -> None:
    """What the kubelet's atomic writer does to a mounted ConfigMap: the files in a new
    `..<version>` folder, then the `..data` link switched to it by a rename."""
    (folder / f"..{version}").mkdir()
    (folder / f"..{version}" / "app.yaml").write_text(text)
    (folder / "..data_tmp").symlink_to(f"..{version}")
    os.replace(folder / "..data_tmp", folder / "..data")


@linux_only
@pytest.mark.usefixtures("long_debounce")
async def test_a_mounted_config_map_switching_its_data_link_is_read_at_once(dirs: Dirs) -> None:
    data, manifests = dirs
    config_map_volume_version(manifests, "v1", yaml.safe_dump(pod("web", "edge-1")))
    (manifests / "app.yaml").symlink_to("..data/app.yaml")
    async with running_store(data, manifests, poll_interval=SLOW_POLL) as running:
        assert len(running.initial()) == 1
        docs = [pod("web", "edge-1"), pod("api", "edge-1")]
        config_map_volume_version(manifests, "v2", yaml.safe_dump_all(docs))
        shutil.rmtree(manifests / "..v1")
        assert await prompt(running) == [("insert", "node/edge-1/default/pod/api")]


def editor_save(folder: Path, name: str, text: str, style: str) -> None:
    """How editors and tools replace a file."""
    path = folder / name
    if style == "dot-temp-rename":  # kubectl-like tools, our own test helper
        temp = folder / f".{name}.tmp"
    elif style == "suffix-temp-rename":  # a temp name the store ignores (not .yaml)
        temp = folder / f"{name}.part"
    else:  # vim: keep a backup by renaming the original, then write a new file
        os.replace(path, folder / f"{name}~")
        temp = path
    temp.write_text(text, encoding="utf-8")
    if temp != path:
        os.replace(temp, path)


@linux_only
@pytest.mark.parametrize("style", ["dot-temp-rename", "suffix-temp-rename", "backup-rename"])
async def test_editor_style_saves_are_picked_up(dirs: Dirs, style: str) -> None:
    data, manifests = dirs
    write_manifest(manifests, "app.yaml", config_map("cfg", {"k": "1"}), pod_using_cfg())
    async with (
        open_local_store(data, manifests, poll_interval=SLOW_POLL) as store,
        trio.open_nursery() as nursery,
    ):
        running, _ = await started(nursery, store, manifests)
        assert len(running.initial()) == 2
        for generation in ("2", "3"):
            docs = [config_map("cfg", {"k": generation}), pod_using_cfg()]
            editor_save(manifests, "app.yaml", yaml.safe_dump_all(docs), style)
            if style == "backup-rename":
                # The file is missing for an instant: the debounce normally hides that, but a
                # scan in that instant (a very busy machine) withdraws and re-inserts.
                while (message := await next_message(running)).content.get("data") != {
                    "k": generation
                }:
                    assert message.route.operation in ("delete", "insert")
            else:
                assert await prompt(running) == [("update", "node/edge-1/default/configmap/cfg")]
        if style != "backup-rename":
            await running.quiet(5)  # one sync per save, nothing twice
        nursery.cancel_scope.cancel()


def pod_using_cfg() -> dict[str, object]:
    return pod("web", "edge-1", env_from=[{"configMapRef": {"name": "cfg"}}])


async def test_fallback_polling_without_the_watch(dirs: Dirs) -> None:
    data, manifests = dirs
    async with (
        open_local_store(data, manifests, poll_interval=0.01, watch=False) as store,
        trio.open_nursery() as nursery,
    ):
        running, _ = await started(nursery, store, manifests)
        write_manifest(manifests, "web.yaml", pod("web", "edge-1"))
        assert await prompt(running) == [("insert", "node/edge-1/default/pod/web")]
        nursery.cancel_scope.cancel()


async def test_store_polls_when_inotify_is_unavailable(
    dirs: Dirs, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_inotify() -> object:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(watch_module, "_load", no_inotify)
    caplog.set_level(logging.INFO, logger="trio_cloudhub.store")
    data, manifests = dirs
    async with (
        open_local_store(data, manifests, poll_interval=0.01) as store,
        trio.open_nursery() as nursery,
    ):
        running, _ = await started(nursery, store, manifests)
        write_manifest(manifests, "web.yaml", pod("web", "edge-1"))
        assert await prompt(running) == [("insert", "node/edge-1/default/pod/web")]
        nursery.cancel_scope.cancel()
    assert sum("polling" in r.getMessage() for r in caplog.records) == 1


@linux_only
async def test_folder_removed_and_recreated_is_followed_again(
    dirs: Dirs, caplog: pytest.LogCaptureFixture
) -> None:
    data, manifests = dirs
    write_manifest(manifests, "web.yaml", pod("web", "edge-1"))
    # A short poll interval: it is what the store uses while the folder is not watched.
    async with (
        open_local_store(data, manifests, poll_interval=0.01) as store,
        trio.open_nursery() as nursery,
    ):
        assert store.watched_poll_interval == WATCHED_POLL_MIN
        running, _ = await started(nursery, store, manifests)
        assert len(running.initial()) == 1
        shutil.rmtree(manifests)
        await eventually(
            lambda: any("cannot list manifests" in r.getMessage() for r in caplog.records)
        )
        await running.quiet()  # the folder failing withdraws nothing
        manifests.mkdir()
        write_manifest(manifests, "web.yaml", pod("web", "edge-1"), pod("api", "edge-1"))
        assert await prompt(running) == [("insert", "node/edge-1/default/pod/api")]
        # Watched again: a change is seen well before the fallback poll (5 s).
        write_manifest(manifests, "web.yaml", pod("web", "edge-1"))
        assert await prompt(running) == [("delete", "node/edge-1/default/pod/api")]
        nursery.cancel_scope.cancel()


# --- no fallback poll while inotify sees everything (issue 13) -------------------------------


@linux_only
async def test_a_watched_local_folder_is_never_polled(
    dirs: Dirs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing but a notification makes the store look at the folder again."""
    monkeypatch.setattr(local_module, "WATCHED_POLL_MIN", 0.05)
    scans: list[float] = []
    list_folder = local_module._list_folder

    def counting(folder: Path, fs_type: str) -> tuple[dict[str, object], str]:
        scans.append(0.0)  # in the worker thread: just count
        return list_folder(folder, fs_type)  # type: ignore[return-value]

    monkeypatch.setattr(local_module, "_list_folder", counting)
    data, manifests = dirs
    write_manifest(manifests, "web.yaml", pod("web", "edge-1"))
    async with (
        open_local_store(data, manifests, poll_interval=0.01) as store,
        trio.open_nursery() as nursery,
    ):
        running, _ = await started(nursery, store, manifests)
        assert len(running.initial()) == 1
        assert store.fallback_poll_reason == ""
        await trio.sleep(1.0)  # 20 fallback polls, had there been any
        assert len(scans) == 1  # the initial sync's
        write_manifest(manifests, "api.yaml", pod("api", "edge-1"))
        assert await prompt(running) == [("insert", "node/edge-1/default/pod/api")]
        assert len(scans) == 2
        nursery.cancel_scope.cancel()


@linux_only
async def test_a_symlink_to_a_file_elsewhere_turns_the_fallback_poll_on(
    dirs: Dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Editing the target of such a link is no event in the folder: polled, and said so."""
    monkeypatch.setattr(local_module, "WATCHED_POLL_MIN", 0.2)
    caplog.set_level(logging.INFO, logger="trio_cloudhub.store")
    data, manifests = dirs
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_manifest(elsewhere, "app.yaml", pod("web", "edge-1"))
    async with (
        open_local_store(data, manifests, poll_interval=0.01) as store,
        trio.open_nursery() as nursery,
    ):
        running, _ = await started(nursery, store, manifests)
        assert store.fallback_poll_reason == ""
        (manifests / "app.yaml").symlink_to(elsewhere / "app.yaml")
        assert await prompt(running) == [("insert", "node/edge-1/default/pod/web")]
        assert "symlink" in store.fallback_poll_reason
        assert any("also polling" in r.getMessage() for r in caplog.records)
        # Edited in place where inotify on the folder cannot see it: the poll finds it.
        text = (elsewhere / "app.yaml").read_text()
        (elsewhere / "app.yaml").write_text(text.replace("edge-1", "edge-2"))
        with trio.fail_after(PROMPT):
            got = {(await next_message(running)).route.resource for _ in range(2)}
        assert got == {"node/edge-1/default/pod/web", "node/edge-2/default/pod/web"}
        (manifests / "app.yaml").unlink()
        await prompt(running)
        await eventually(lambda: store.fallback_poll_reason == "")
        nursery.cancel_scope.cancel()


@linux_only
async def test_an_overflowing_event_queue_still_wakes_and_keeps_the_watch(
    tmp_path: Path,
) -> None:
    with folder_watch(tmp_path) as watch:
        assert watch is not None
        overflow_the_queue(tmp_path)
        assert await notified(watch) > 0  # the queue overflowed: IN_Q_OVERFLOW comes too
        assert watch.watching
        while watch.drain():  # what a drain left (it reads a bounded amount)
            pass
        (tmp_path / "new.yaml").write_text("x")
        assert await notified(watch) > 0


def overflow_the_queue(folder: Path) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    for index in range(limit // 2 + 10):  # two events each: IN_CREATE, IN_CLOSE_WRITE
        (folder / f".junk-{index}").write_bytes(b"")


def test_what_inotify_cannot_see(tmp_path: Path) -> None:
    mountinfo = (
        "22 27 0:21 / / rw,relatime - ext4 /dev/vda1 rw\n"
        "40 22 0:40 / /srv/shared rw,relatime - nfs4 server:/export rw\n"
        "41 22 0:41 / /srv/fuse rw - fuse.sshfs host:/x rw\n"
    )
    assert filesystem_type(Path("/srv/shared/manifests"), mountinfo) == "nfs4"
    assert filesystem_type(Path("/srv/fuse/m"), mountinfo) == "fuse.sshfs"
    assert filesystem_type(Path("/srv/sharedx"), mountinfo) == "ext4"
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a.yaml").write_text("")
    assert blind_spot(folder, ["a.yaml"], "ext4") == ""
    assert "nfs4 file system" in blind_spot(folder, ["a.yaml"], "nfs4")
    assert "fuse.sshfs" in blind_spot(folder, ["a.yaml"], "fuse.sshfs")
    # A mounted ConfigMap: the files link to ..data/ inside the folder: seen.
    (folder / "..2024").mkdir()
    (folder / "..2024" / "b.yaml").write_text("")
    (folder / "..data").symlink_to("..2024")
    (folder / "b.yaml").symlink_to("..data/b.yaml")
    assert blind_spot(folder, ["a.yaml", "b.yaml"], "ext4") == ""
    (tmp_path / "c.yaml").write_text("")
    (folder / "c.yaml").symlink_to(tmp_path / "c.yaml")
    assert "c.yaml is a symlink" in blind_spot(folder, ["c.yaml"], "ext4")
    (tmp_path / "link").symlink_to(folder)
    assert "goes through a symlink" in blind_spot(tmp_path / "link", ["a.yaml"], "ext4")
