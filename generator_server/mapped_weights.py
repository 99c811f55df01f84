"""The worker's side of a reload from staged weights files: each file mapped in memory, its tensors handed to
vLLM as views of the mapping, and on a GPU the mapping page-locked once the same file is loaded again.

vLLM's ``reload_weights(weights_path=...)`` reads the files through ordinary (pageable) memory, and a copy
from pageable memory to the GPU goes through the driver's own staging buffers: 2.27 GB took 0.5-0.6 s on the
H200 host. Copies from page-locked memory go straight to the GPU (0.12-0.15 s there). Locking takes time
too (about 0.2 s for those 2.27 GB), and a locked file must stay mapped, holding its memory, until it is
found deleted, so only a file that comes back is locked: a server with a stream port writes every other
upload over the same two files (``WeightStore.promote``), and those two stay locked here, the
same pages the server writes into, until a load finds them deleted. A file seen once is mapped for its load
only. The engine uses this on a GPU only (``GenerationEngine._reload_from``).
"""

from __future__ import annotations

import collections
import json
import logging
import mmap
import os
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from generator_server.weights import TORCH_NAMES

log = logging.getLogger(__name__)

DTYPES = {code: getattr(torch, name) for code, name in TORCH_NAMES.items()}
"""safetensors dtype codes, every one the server accepts (it has checked every header before a load)."""
CUDA_HOST_REGISTER_READ_ONLY = 8
"""``cudaHostRegisterReadOnly``: the mapping is read-only, and the GPU only reads it."""
SEEN_FILES = 8
"""How many recently loaded files are remembered, to lock a file's pages when it is loaded again."""


@dataclass(eq=False)
class MappedFile:
    fd: int
    map: mmap.mmap | None
    size: int
    locked: bool = False
    """Registered with CUDA (``cudaHostRegister``): kept mapped between loads."""

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The file's tensors in the order they are stored, each a view of the mapping."""
        (header_len,) = struct.unpack("<Q", self.map[:8])
        header = json.loads(self.map[8 : 8 + header_len])
        header.pop("__metadata__", None)
        entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        with warnings.catch_warnings():  # a read-only buffer: nothing writes to these views
            warnings.simplefilter("ignore", UserWarning)
            for name, entry in entries:
                dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
                begin, end = entry["data_offsets"]
                if end == begin:
                    yield name, torch.empty(shape, dtype=dtype)
                    continue
                count = (end - begin) // dtype.itemsize
                offset = 8 + header_len + begin
                yield name, torch.frombuffer(self.map, dtype=dtype, count=count, offset=offset).view(shape)

    def close(self) -> None:
        """Let go of the file. The mapping itself goes with the last reference to it: a tensor viewing it
        holds one (``torch.frombuffer``), so nothing can read it once unmapped."""
        if self.fd < 0:
            return
        if self.locked:
            torch.cuda.cudart().cudaHostUnregister(_address(self.map))
            self.locked = False
        os.close(self.fd)
        self.fd, self.map = -1, None


@dataclass
class MappedWeights:
    """The weights files a worker loads from, mapped; locked ones (``lock``: on a GPU) kept between loads."""

    lock: bool
    _locked: list[MappedFile] = field(default_factory=list)
    _seen: collections.deque = field(default_factory=lambda: collections.deque(maxlen=SEEN_FILES))
    _lock_failed: bool = False

    def open(self, path: Path) -> MappedFile:
        """``path`` mapped: its locked mapping if it has one of the file's current size, else a new one,
        locked if this file (same inode and size) was among the last files loaded."""
        self.release_deleted()
        found = os.stat(path)
        for kept in list(self._locked):
            if os.path.samestat(os.fstat(kept.fd), found):  # (its fd is open: the inode is not reused)
                if kept.size == found.st_size:
                    return kept
                self._locked.remove(kept)  # the server resized the file: map it afresh
                kept.close()
        fd = os.open(path, os.O_RDONLY)
        try:
            # every page mapped at once: one call instead of a page fault per 4 KiB as the load reads it
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            file = MappedFile(fd, mmap.mmap(fd, found.st_size, flags, mmap.PROT_READ), found.st_size)
        except BaseException:
            os.close(fd)
            raise
        key = (found.st_dev, found.st_ino, found.st_size)
        if self.lock and not self._lock_failed and key in self._seen:
            self._try_lock(file)
        self._seen.append(key)
        return file

    def done(self, files: list[MappedFile]) -> None:
        """After a load: files not locked are let go (nothing would reuse their mappings)."""
        for file in files:
            if not file.locked:
                file.close()

    def release_deleted(self) -> None:
        """Close locked mappings of files since deleted: they would hold the file's memory."""
        for kept in [k for k in self._locked if os.fstat(k.fd).st_nlink == 0]:
            self._locked.remove(kept)
            kept.close()

    def _try_lock(self, file: MappedFile) -> None:
        try:
            error = torch.cuda.cudart().cudaHostRegister(
                _address(file.map), file.size, CUDA_HOST_REGISTER_READ_ONLY
            )
            ok = int(error) == 0
        except (AttributeError, RuntimeError, TypeError) as e:
            ok, error = False, e
        if not ok:  # e.g. a file on a disk whose pages cannot be locked: pageable copies, as before
            self._lock_failed = True
            _clear_cuda_error()
            log.warning("cannot page-lock staged weights files (%s); loading from pageable memory", error)
            return
        file.locked = True
        self._locked.append(file)


def _clear_cuda_error() -> None:
    """A failed CUDA runtime call stays the thread's last error, which torch reports at its next kernel
    launch: launch one here, where that report is expected."""
    try:
        torch.zeros(1, device="cuda").add_(1)
    except RuntimeError:
        pass


def _address(buffer: mmap.mmap) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
