"""The local stack's paths and process helpers, on plain values and this process."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from gpumeter import processes
from gpumeter.localstack import EmbeddedPostgres, _is_postmaster_of, _unreachable_by
from gpumeter.stack import StackOptions


def test_relative_paths_are_resolved_once_where_options_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    options = StackOptions(data_dir=Path("var"))
    assert options.data_dir == tmp_path / "var"
    assert options.catalog.is_absolute() and options.rules.is_absolute()
    # and a server told a relative data directory gets it absolute, whatever its own cwd will be
    assert EmbeddedPostgres(Path("var/pgdata")).data_dir == tmp_path / "var" / "pgdata"


def test_a_folder_others_cannot_enter_is_named() -> None:
    # (under /tmp itself: pytest's own temp root is closed to others already)
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="gpumeter-reach-"))
    try:
        base.chmod(0o755)
        closed = base / "home"
        (closed / "checkout").mkdir(parents=True)
        closed.chmod(0o700)
        other = pwd.struct_passwd(("someone", "x", 54321, 54321, "", "/", "/bin/false"))
        assert _unreachable_by(closed / "checkout" / "postgres", other) == closed
        closed.chmod(0o711)
        assert _unreachable_by(closed / "checkout" / "postgres", other) is None
    finally:
        shutil.rmtree(base)


def test_only_a_postmaster_on_this_data_directory_is_taken_for_a_stale_one(tmp_path: Path) -> None:
    assert not _is_postmaster_of(os.getpid(), tmp_path)
    assert not _is_postmaster_of(2**22 + 12345, tmp_path)  # no such process


def test_marked_processes_are_found_and_stopped(tmp_path: Path) -> None:
    marker = str(tmp_path)
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env={**os.environ, processes.STACK_ENV: marker},
        start_new_session=True,
    )
    unrelated = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        env={**os.environ, processes.STACK_ENV: marker + "-other"},
    )
    try:
        assert [p.pid for p in processes.marked(marker)] == [child.pid]
        stopped = processes.stop_marked(marker, grace_s=5.0)
        assert [p.pid for p in stopped] == [child.pid]
        assert child.wait(5) is not None
        assert processes.marked(marker) == []
        assert unrelated.poll() is None
    finally:
        for process in (child, unrelated):
            process.kill()
            process.wait(5)
