"""Give freed heap memory back to the system after a burst of connects or disconnects.

A TLS handshake allocates much more than the connection keeps (OpenSSL's handshake
buffers, certificate parsing, the key exchange); glibc keeps the freed pages of a burst of
handshakes in its arenas, where RSS counts them. `malloc_trim(0)` returns the free pages
of every arena. glibc only: elsewhere (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger("trio_cloudhub.hub")
# Sessions started or ended since the last trim that make one worth its cost (a walk of the
# heap), done once none started or ended for BURST_QUIET seconds, or after TRIM_ANYWAY of them
# however they keep coming (an edge fleet in a reconnect loop).
TRIM_AFTER_CHURN = 256
BURST_QUIET = 1.0
TRIM_ANYWAY = 16 * TRIM_AFTER_CHURN


def _find_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    found: Callable[[int], int] = trim
    return found


_MALLOC_TRIM = _find_malloc_trim()


def release_free_memory() -> bool:
    """Return the free pages of the heap to the system; False where that is not possible."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
