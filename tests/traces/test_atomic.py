"""Atomic output: all or nothing, with ordinary file permissions."""

import os
import stat

import pytest

from traces.atomic import atomic_output
from traces.errors import UserError


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_a_good_write_renames_with_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"all")
    finally:
        os.umask(old)
    out = tmp_path / "out.bin"
    assert out.read_bytes() == b"all" and list(tmp_path.iterdir()) == [out]
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_a_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        with atomic_output(tmp_path / "nope" / "out.bin"):
            pass
