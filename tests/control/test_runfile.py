"""The run directory the engine record lives in: made private, and refused where another user could write it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sidecar.control.runfile import private_run_dir
from sidecar.settings import SettingsError


def test_a_new_run_directory_is_this_users_alone(tmp_path: Path) -> None:
    run = tmp_path / "a" / "run"
    private_run_dir(run)
    found = run.stat()
    assert stat.S_ISDIR(found.st_mode) and stat.S_IMODE(found.st_mode) == 0o700
    assert found.st_uid == os.geteuid()
    private_run_dir(run)  # as it is the next time


def test_one_only_this_user_writes_is_taken_as_it_is(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    run.chmod(0o755)
    private_run_dir(run)
    assert stat.S_IMODE(run.stat().st_mode) == 0o755


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777])
def test_one_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(mode)
    with pytest.raises(SettingsError, match=f"can be written by other users \\(mode {mode:o}\\)"):
        private_run_dir(run)


def test_a_link_or_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "file").write_text("")
    for name in ("link", "file"):
        with pytest.raises(SettingsError, match="is not a directory"):
            private_run_dir(tmp_path / name)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_another_users_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    os.chown(run, 65534, 65534)  # nobody's
    with pytest.raises(SettingsError, match="belongs to another user \\(uid 65534\\)"):
        private_run_dir(run)
