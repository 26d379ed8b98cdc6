"""Change notifications for one folder: Linux inotify through ctypes, nothing elsewhere.

Usage (the local store's loop; any event means "scan the folder again")::

    with folder_watch(folder) as watch:  # None: not available, poll instead
        ...
        await watch.wait()  # until events are pending
        watch.drain()       # consume them, then scan

`settled` (since `begin_settling()`) tells a caller that wants to scan as soon as a write is
complete, rather than after a fixed debounce, that a relevant name changed, no notified
write is still open (every created or modified file was closed, renamed or deleted since)
and no relevant name has gone away (an editor's save may rename the old file first).

Rules:
- the watch reports that *something* in the folder changed, never what: the caller scans
  (by stat) afterwards, so lost or coalesced events (queue overflow) cost nothing;
- events pending before `drain()` are consumed by it; anything that happens after it makes
  `wait()` return again, so a scan that follows `drain()` misses nothing;
- the folder itself going away (deleted, moved, unmounted) ends the watch: `watching` turns
  False and `rearm()` watches whatever is at the path again (the caller polls meanwhile);
- changes inotify cannot see (another host writing on a network filesystem, the target of a
  symlink outside the folder, a symlink in the folder's own path re-pointed) need the
  caller's slow fallback poll: `blind_spot` says when that is the case, and why;
- not Linux, or no inotify instance/watch left (`fs.inotify.max_user_*`): `folder_watch`
  yields None after logging the reason once at info.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import trio

log = logging.getLogger("trio_cloudhub.store")

__all__ = ["FolderWatch", "blind_spot", "filesystem_type", "folder_watch"]

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_IGNORED = 0x00008000  # the watch was removed (folder deleted, unmounted, rm_watch)
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
WRITE_STARTED = IN_CREATE | IN_MODIFY
WRITE_ENDED = IN_CLOSE_WRITE | IN_MOVED_FROM | IN_DELETE
WATCH_MASK = (
    IN_CREATE
    | IN_DELETE
    | IN_MODIFY
    | IN_CLOSE_WRITE
    | IN_MOVED_TO
    | IN_MOVED_FROM
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ATTRIB
)
# inotify_init1 flags are the open(2) ones (the defaults only keep other systems importing).
IN_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0o4000)
IN_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0o2000000)

_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)
READ_BYTES = 64 * 1024  # one event is at most 16 + NAME_MAX + 1 bytes
MAX_READS_PER_DRAIN = 64  # a bound per drain; what is left keeps the fd readable
MAX_TRACKED_NAMES = 4096  # names being written or gone; beyond, never `settled`


class _Inotify:
    """The three libc calls (loaded once); OSError with errno on failure."""

    def __init__(self) -> None:
        # The C library the interpreter already uses (no ldconfig run, unlike find_library).
        libc = ctypes.CDLL(None, use_errno=True)
        self._init1 = libc.inotify_init1
        self._init1.argtypes = [ctypes.c_int]
        self._init1.restype = ctypes.c_int
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._add.restype = ctypes.c_int
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = [ctypes.c_int, ctypes.c_int]
        self._rm.restype = ctypes.c_int

    def init(self) -> int:
        return _checked(self._init1(IN_NONBLOCK | IN_CLOEXEC))

    def add_watch(self, fd: int, path: Path, mask: int) -> int:
        return _checked(self._add(fd, os.fsencode(path), mask))

    def rm_watch(self, fd: int, wd: int) -> None:
        _checked(self._rm(fd, wd))


def _checked(result: int) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


_inotify: _Inotify | None = None


def _load() -> _Inotify:
    global _inotify
    if _inotify is None:
        try:
            _inotify = _Inotify()
        except (OSError, AttributeError) as exc:  # no libc, or a libc without inotify
            raise OSError(errno.ENOSYS, f"inotify not in libc: {exc}") from None
    return _inotify


class FolderWatch:
    """inotify on one folder (see the module docstring). Not thread-safe; one waiter."""

    def __init__(
        self,
        inotify: _Inotify,
        fd: int,
        folder: Path,
        relevant: Callable[[str], bool] = lambda _name: True,
    ) -> None:
        self.folder = folder
        self._inotify = inotify
        self._fd = fd
        self._wd: int | None = None
        self._relevant = relevant
        self._writing: set[bytes] = set()  # names created or modified, not closed yet
        self._vanished: set[bytes] = set()  # relevant names deleted or moved away
        self._unsure = False  # events lost, or too many writes open to track
        self._relevant_change = False

    @property
    def settled(self) -> bool:
        """Since `begin_settling()`: a relevant name changed, no write is open and no
        relevant name is gone (a deletion waits for the whole debounce: it may be undone)."""
        return (
            self._relevant_change and not self._writing and not self._vanished and not self._unsure
        )

    def begin_settling(self) -> None:
        self._writing.clear()
        self._vanished.clear()
        self._unsure = False
        self._relevant_change = False

    @property
    def watching(self) -> bool:
        """The folder is watched: a change of it (or in it) makes `wait()` return."""
        return self._wd is not None

    def fileno(self) -> int:
        return self._fd

    def rearm(self) -> bool:
        """Watch what is at the folder's path now; False (not watching) when that fails."""
        try:
            self._watch()
        except OSError:
            return False
        return True

    def _watch(self) -> None:
        self._forget()
        if self._fd >= 0:
            self._wd = self._inotify.add_watch(self._fd, self.folder, WATCH_MASK | IN_ONLYDIR)

    def _forget(self) -> None:
        """Remove the current watch, if any (it may be gone already)."""
        wd, self._wd = self._wd, None
        if wd is not None:
            with suppress(OSError):  # removed by the kernel already (IN_IGNORED)
                self._inotify.rm_watch(self._fd, wd)

    async def wait(self) -> None:
        """Until events are pending (they stay pending: `drain()` consumes them)."""
        await trio.lowlevel.wait_readable(self._fd)

    def drain(self) -> int:
        """Consume the pending events without blocking; how many there were."""
        count = 0
        for _ in range(MAX_READS_PER_DRAIN):
            try:
                data = os.read(self._fd, READ_BYTES)
            except BlockingIOError:
                break
            except OSError as exc:  # not expected; the caller's fallback poll still works
                log.warning("manifests folder watch: read failed: %s", exc)
                break
            count += self._take(data)
            if not data:
                break
        return count

    def _take(self, data: bytes) -> int:
        count = offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            count += 1
            self._note(wd, mask, name)
            if wd == self._wd and mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                # Gone, or moved (the watch would follow the folder elsewhere): forget it.
                self._forget()
        return count

    def _note(self, wd: int, mask: int, name: bytes) -> None:
        """Track writes in progress, for `settled`."""
        if wd != self._wd or not name:  # the folder itself, or the queue overflowed (wd -1)
            self._relevant_change = True
            self._unsure |= wd == -1  # events were lost: a write may be open
            return
        if mask & IN_ISDIR or self._unsure:  # unsure: never `settled` until the next begin
            return
        if mask & WRITE_STARTED:
            self._writing.add(name)
        elif mask & WRITE_ENDED:
            self._writing.discard(name)
        if not self._relevant(os.fsdecode(name)):
            return
        self._relevant_change = True
        # Gone, perhaps for an instant (an editor's backup rename, then the new file).
        if mask & (IN_MOVED_FROM | IN_DELETE):
            self._vanished.add(name)
        elif mask & (IN_CREATE | IN_MOVED_TO):
            self._vanished.discard(name)
        self._unsure |= len(self._writing) + len(self._vanished) > MAX_TRACKED_NAMES

    def close(self) -> None:
        fd, self._fd, self._wd = self._fd, -1, None
        if fd >= 0:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)


@contextmanager
def folder_watch(
    folder: Path,
    *,
    enabled: bool = True,
    relevant: Callable[[str], bool] = lambda _name: True,
) -> Iterator[FolderWatch | None]:
    """A watch on `folder`, closed on exit; None when disabled or unavailable (logged).

    `relevant(name)`: whether a change of that name in the folder counts for `settled`.
    """
    watch = _open(Path(folder), relevant) if enabled else None
    try:
        yield watch
    finally:
        if watch is not None:
            watch.close()


def _open(folder: Path, relevant: Callable[[str], bool]) -> FolderWatch | None:
    if not sys.platform.startswith("linux"):
        log.info("no inotify on %s: polling the manifests folder", sys.platform)
        return None
    try:
        inotify = _load()
        fd = inotify.init()
    except OSError as exc:
        log.info("inotify unavailable (%s): polling the manifests folder", exc.strerror or exc)
        return None
    watch = FolderWatch(inotify, fd, folder, relevant)
    try:
        watch._watch()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return watch  # not there yet: the caller polls and calls rearm()
        watch.close()
        log.info(
            "cannot watch %s with inotify (%s): polling the manifests folder",
            folder,
            exc.strerror or exc,
        )
        return None
    return watch


# --- what inotify on the folder cannot see ---------------------------------------------------

# File systems whose files other hosts (or the VM host) change without local inotify events.
REMOTE_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "ceph",
        "glusterfs",
        "lustre",
        "afs",
        "gpfs",
        "virtiofs",
        "vboxsf",
        "fuse",
    }
)
MOUNTINFO = Path("/proc/self/mountinfo")


def filesystem_type(folder: Path, mountinfo: str | None = None) -> str:
    """The type of the file system `folder` is on ("" when unknown), from mountinfo."""
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text()
        except OSError:
            return ""
    target = os.path.realpath(folder)
    best, found = -1, ""
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mount_point = fields[4].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > best:
            best, found = len(mount_point), line.split(" - ", 1)[1].split()[0]
    return found


def is_remote_filesystem(kind: str) -> bool:
    return kind.split(".", 1)[0] in REMOTE_FILESYSTEMS


def blind_spot(folder: Path, names: Iterable[str], fs_type: str) -> str:
    """Why inotify on `folder` may miss a change of the manifests `names` ("" when it sees
    them all): a remote file system, the folder's path going through a symlink (re-pointing
    it is not an event in the folder), or a manifest that is a symlink to a file outside the
    folder (editing the target is an event elsewhere). Symlinks inside the folder, as in a
    mounted ConfigMap (`..data`), are seen: swapping them is an event in the folder."""
    if is_remote_filesystem(fs_type):
        return f"the folder is on a {fs_type} file system"
    absolute = os.path.abspath(folder)
    real = os.path.realpath(folder)
    if real != absolute:
        return f"the folder's path goes through a symlink ({absolute} is {real})"
    for name in names:
        path = os.path.join(absolute, name)
        if os.path.islink(path):
            target = os.path.realpath(path)
            if os.path.dirname(target) != real and not target.startswith(real + os.sep):
                return f"{name} is a symlink to {target}, outside the folder"
    return ""
