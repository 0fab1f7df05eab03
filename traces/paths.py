"""Output paths checked before the work starts: a writable folder, the right suffix, never over an input.

Every command that writes a file calls `check_output` first, so a mistake in an output path costs a
second, not the minutes of work before the write (the write itself still goes through
`traces.atomic.atomic_output`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from traces.errors import UserError


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name the same file (the same inode when both exist, else the same resolved path)."""
    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
    except OSError:
        pass
    return pa.resolve() == pb.resolve()


def check_output(path: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str] | None] = (),
                 suffixes: tuple[str, ...] | None = None, what: str = "output") -> Path:
    """UserError unless `path` can be written as a file: its folder exists and is writable, it is not a
    folder, it ends in one of `suffixes` (when given) and it is none of `inputs` (what the command reads).
    `what` names the option in messages (e.g. "--timeline")."""
    target = Path(path)
    if not str(path).strip():
        raise UserError(f"{what} is empty; give a file name")
    if suffixes is not None and target.suffix.lower() not in suffixes:
        raise UserError(f"{what} {target} must end in {' or '.join(suffixes)}")
    if target.is_dir():
        raise UserError(f"{what} {target} is a folder; give a file name inside it")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"cannot write {what} {target}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UserError(f"cannot write {what} {target}: folder {folder} is not writable")
    for source in inputs:
        if source is not None and same_file(target, source):
            raise UserError(f"{what} {target} is also an input of this command; writing it would destroy the input: "
                            "give another file name")
    return target


def check_output_folder(path: str | os.PathLike[str], *, what: str = "--out") -> Path:
    """UserError unless `path` is a folder, or one that can be created (its parent exists and is writable)."""
    folder = Path(path)
    if folder.exists():
        if not folder.is_dir():
            raise UserError(f"{what} {folder} is a file, not a folder")
        if not os.access(folder, os.W_OK):
            raise UserError(f"{what} {folder} is not writable")
        return folder
    parent = folder.parent if str(folder.parent) else Path(".")
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"cannot create {what} {folder}: {parent} is not a writable folder")
    return folder
