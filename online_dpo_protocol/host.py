"""Host identity: a CUDA IPC handle opens only on the host that made it; sender and server compare these."""

from __future__ import annotations

import functools
import socket
from pathlib import Path

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@functools.cache
def host_id() -> str:
    """This machine's identity as CUDA IPC sees it: the kernel's boot id (containers on one host share it;
    the host name where there is none)."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return socket.gethostname()
