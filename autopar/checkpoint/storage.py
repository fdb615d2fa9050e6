"""The on-disk format: one safetensors file per writing rank, one JSON index, atomic commit.

Why not ``torch.distributed.checkpoint``: DCP reshards DTensor/ShardedTensor layouts, i.e.
rectangular chunks. A depth-sharded weight is a padded *flat* range of a block and a ZeRO shard
a flat range across several tensors, which DCP cannot describe; and resharding a plain (non
DTensor) state dict with DCP would load whole tensors on every rank. So: safetensors for the
bytes (mmap, ``get_slice`` partial reads, a validated header) plus an index that says, for every
stored tensor, its full shape and dtype and which region each piece holds (``regions.Region``).

Layout of a checkpoint directory::

    index.json              written last, by rank 0: the completion marker
    rank-00003.safetensors  the pieces rank 3 wrote (1D, keys "0", "1", ...)
    rng-00003.pt            rank 3's RNG states
    extra.pt                the caller's ``extra`` dict
    .autopar-checkpoint     the ownership marker (``owned``): this folder is autopar's to replace

Integrity: the index records each safetensors file's size (a truncated file is named as such)
and a CRC32 of every ``CRC_CHUNK`` elements of every piece, so a reader verifies exactly the
chunks it reads and never has to read a whole file to detect corruption. The small pickled files
(RNG, ``extra``) are listed under ``objects`` with their size and CRC32 of the whole file.

Atomicity: all ranks write into ``<dir>.tmp-<id>``; rank 0 writes ``index.json`` there last and
swaps the directory into place (``<dir>`` -> ``<dir>.old-<id>``, tmp -> ``<dir>``, old removed).
A kill at any point leaves either the previous checkpoint at ``<dir>``, or, inside the instant
between the two renames, a complete one at ``<dir>.old-<id>``, which ``owned.resolve`` falls
back to. Which folders a save may replace or clean up, and how the index is validated: ``owned``.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import zlib
from contextlib import ExitStack
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "autopar-checkpoint-1"
INDEX = "index.json"
CRC_CHUNK = 1 << 20  # elements per checksum


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: missing, incomplete, corrupted or of another model."""


def _crc(flat: torch.Tensor) -> int:
    return zlib.crc32(flat.contiguous().view(torch.uint8).numpy())


def chunk_crcs(flat: torch.Tensor) -> list[int]:
    return [_crc(flat[i:i + CRC_CHUNK]) for i in range(0, flat.numel(), CRC_CHUNK)]


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_pieces(path: str, pieces: list[torch.Tensor]) -> tuple[int, list[list[int]]]:
    """Write 1D CPU tensors as keys "0", "1", ...; returns the file size and each piece's CRCs."""
    save_file({str(i): t for i, t in enumerate(pieces)}, path)
    _fsync(path)
    return os.path.getsize(path), [chunk_crcs(t) for t in pieces]


def save_object(obj: Any, path: str) -> tuple[int, int]:
    """``torch.save`` ``obj`` to ``path``; returns the file's size and CRC32 for the index."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return len(data), zlib.crc32(data)


def load_object(path: str, expected: tuple[int, int] | None) -> Any:
    """The object at ``path``, after checking its size and CRC32 against the index (``expected``;
    None for checkpoints written before objects had checksums)."""
    if not os.path.exists(path):
        raise CheckpointError(f"missing file {path}")
    with open(path, "rb") as f:
        data = f.read()
    if expected is not None and (len(data), zlib.crc32(data)) != tuple(expected):
        raise CheckpointError(f"corrupted file {path}: {len(data)} bytes with CRC32 {zlib.crc32(data):08x}, the "
                              f"index says {expected[0]} bytes with CRC32 {expected[1]:08x}")
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"corrupted file {path}: {e}") from e


# --- commit ------------------------------------------------------------------------------------
def staging_dir(final: str, tag: str) -> str:
    return f"{final.rstrip(os.sep)}.tmp-{tag}"


def write_index(tmp: str, index: dict[str, Any]) -> None:
    path = os.path.join(tmp, INDEX)
    with open(path, "w") as f:
        json.dump(index, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync(tmp)


def commit(tmp: str, final: str, tag: str) -> None:
    final = final.rstrip(os.sep)
    old = f"{final}.old-{tag}"
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync(os.path.dirname(os.path.abspath(final)))
    shutil.rmtree(old, ignore_errors=True)


# --- reading -----------------------------------------------------------------------------------
class PieceFiles:
    """Opens the rank files a loader needs (checking presence and size first) and reads
    verified ranges of pieces."""

    def __init__(self, root: str, files: dict[str, int]) -> None:
        self.root, self.files = root, files
        self._stack = ExitStack()
        self._open: dict[str, Any] = {}

    def __enter__(self) -> PieceFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def check(self, names: set[str]) -> None:
        """Fail early, before any tensor is touched, on missing, truncated or unreadable files."""
        for name in sorted(names):
            self._handle(name)

    def _handle(self, name: str) -> Any:
        if name not in self._open:
            path = os.path.join(self.root, name)
            if not os.path.exists(path):
                raise CheckpointError(f"missing shard {path} (listed in {INDEX})")
            size = os.path.getsize(path)
            if size != self.files[name]:
                raise CheckpointError(f"partial or damaged shard {path}: {size} bytes, the index says "
                                      f"{self.files[name]}")
            try:
                self._open[name] = self._stack.enter_context(safe_open(path, framework="pt"))
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"corrupted shard {path}: {e}") from e
        return self._open[name]

    def read(self, file: str, key: str, crcs: list[int], start: int, stop: int) -> torch.Tensor:
        """Elements ``start:stop`` of piece ``key``, after checking the CRC of every chunk read."""
        a0 = start // CRC_CHUNK * CRC_CHUNK
        try:
            data = self._handle(file).get_slice(key)
            b0 = min(-(-stop // CRC_CHUNK) * CRC_CHUNK, data.get_shape()[0])
            data = data[a0:b0]
        except SafetensorError as e:
            raise CheckpointError(f"corrupted shard {os.path.join(self.root, file)}: {e}") from e
        for i in range(0, data.numel(), CRC_CHUNK):
            if _crc(data[i:i + CRC_CHUNK]) != crcs[(a0 + i) // CRC_CHUNK]:
                raise CheckpointError(f"corrupted shard {os.path.join(self.root, file)}: checksum mismatch "
                                      f"in piece {key} at elements {a0 + i}..")
        return data[start - a0:stop - a0]
