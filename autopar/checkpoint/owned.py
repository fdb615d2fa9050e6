"""What a checkpoint may touch: only folders and files autopar itself wrote.

Why this exists: a save swaps a new folder in for the old one and deletes the old one, and
clean-up deletes leftovers of killed saves. Both delete whole trees, so both must first know the
tree is theirs. A folder is autopar's when it holds the marker file ``MARKER``, which rank 0
writes into the staging folder before anything else and which therefore travels into every
committed checkpoint and every moved-aside ``.old-`` folder (checkpoints written before the marker
existed are recognised by their ``index.json`` format). Overwriting is refused, before anything
is written, when the target is a regular file, a symbolic link, the working directory or one of
its parents, or a folder holding anything autopar did not write there.

Names read from ``index.json`` are data, not paths: each must be a plain file name that resolves
inside the checkpoint folder, so a crafted index cannot make a load read ``../`` or ``/etc``.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
from typing import Any

from .storage import FORMAT, INDEX, CheckpointError

MARKER = ".autopar-checkpoint"
OWN_FILES = re.compile(r"(index\.json|\.autopar-checkpoint|extra\.pt|rank-\d+\.safetensors|rng-\d+\.pt)")


def write_marker(folder: str) -> None:
    with open(os.path.join(folder, MARKER), "w") as f:
        f.write(FORMAT + "\n")


def is_ours(folder: str) -> bool:
    """Whether ``folder`` is a checkpoint, or a checkpoint's staging folder, that autopar wrote."""
    if os.path.islink(folder) or not os.path.isdir(folder):
        return False
    if os.path.isfile(os.path.join(folder, MARKER)):
        return True
    try:
        with open(os.path.join(folder, INDEX)) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_target(path: str) -> None:
    """Raise ``CheckpointError`` unless saving to ``path`` can only replace an earlier autopar
    checkpoint (or create a new folder, or fill an empty one)."""
    refuse = f"refusing to save a checkpoint to {path}"
    if os.path.islink(path):
        raise CheckpointError(f"{refuse}: it is a symbolic link; save to the folder it points to")
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{refuse}: it is a file, not a checkpoint folder")
    target, cwd = os.path.realpath(path), os.path.realpath(os.getcwd())
    if cwd == target or cwd.startswith(target.rstrip(os.sep) + os.sep):
        raise CheckpointError(f"{refuse}: it is the working directory or contains it; save to a subfolder "
                              "such as ckpt/")
    if not os.path.isdir(path):
        return
    entries = sorted(os.listdir(path))
    if not entries:
        return
    if not is_ours(path):
        raise CheckpointError(f"{refuse}: the folder exists and is not an autopar checkpoint (it holds "
                              f"{_some(entries)}); save to a new or empty folder")
    foreign = [e for e in entries if not OWN_FILES.fullmatch(e) or os.path.isdir(os.path.join(path, e))]
    if foreign:
        raise CheckpointError(f"{refuse}: the checkpoint folder also holds {_some(foreign)}, which autopar did "
                              "not write and would delete; move it out or save elsewhere")


def _some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def remove_stale(final: str) -> None:
    """Leftovers of saves that were killed, recognised by the marker; called by rank 0 before a new
    save starts. A moved-aside ``.old-`` checkpoint is kept while it is the only complete one."""
    final = final.rstrip(os.sep)
    stale = glob.glob(glob.escape(final) + ".tmp-*")
    if os.path.exists(os.path.join(final, INDEX)):
        stale += glob.glob(glob.escape(final) + ".old-*")
    for path in stale:
        if is_ours(path):
            shutil.rmtree(path)


def inside(root: str, name: object) -> str:
    """The path of the file ``name`` (read from the index) in ``root``; ``CheckpointError`` unless
    it is a plain file name that stays inside ``root``."""
    if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name \
            or (os.altsep is not None and os.altsep in name):
        raise CheckpointError(f"{os.path.join(root, INDEX)} names the file {name!r}, which is not a plain file "
                              "name inside the checkpoint folder")
    path = os.path.join(root, name)
    real_root = os.path.realpath(root)
    if os.path.dirname(os.path.realpath(path)) != real_root:
        raise CheckpointError(f"{os.path.join(root, INDEX)} names the file {name!r}, which resolves outside the "
                              f"checkpoint folder ({os.path.realpath(path)})")
    return path


def resolve(path: str) -> str:
    """``path`` itself, or the complete previous checkpoint a save killed mid-swap left beside it."""
    path = path.rstrip(os.sep)
    if os.path.exists(os.path.join(path, INDEX)):
        return path
    old = sorted(p for p in glob.glob(glob.escape(path) + ".old-*")
                 if is_ours(p) and os.path.exists(os.path.join(p, INDEX)))
    if not os.path.exists(path) and old:
        return old[-1]
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint at {path}: the directory does not exist")
    raise CheckpointError(f"{path} is not a complete autopar checkpoint: {INDEX} is missing (the save "
                          "did not finish, or the directory holds something else)")


def read_index(path: str) -> dict[str, Any]:
    """The index of the checkpoint folder ``path``, with every file name in it checked by ``inside``."""
    where = os.path.join(path, INDEX)
    try:
        with open(where) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"corrupted file {where}: {e}") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise CheckpointError(f"{path}: unknown checkpoint format {found!r}, expected {FORMAT!r}")
    try:
        for name in [*index["files"], *index.get("objects", {})]:
            inside(path, name)
        for key, entry in index["tensors"].items():
            for piece in entry["pieces"]:
                if piece["file"] not in index["files"]:
                    raise CheckpointError(f"corrupted file {where}: a piece of {key} is in {piece['file']!r}, "
                                          "which the index does not list")
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"corrupted file {where}: malformed entry ({type(e).__name__}: {e})") from e
    return index
