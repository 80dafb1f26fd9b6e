"""However `gpumeter up` ends, nothing it started stays behind, and a later run on the same data
directory starts cleanly. The stack's processes are found the way the stack itself finds them (the
GPUMETER_STACK marker in their environment) and, independently, by their ports and by the data
directory on their command lines."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from gpumeter.processes import marked
from tests.fixtures.processes import REPO_ROOT, StopWaiting, wait_until

STARTED = "Ctrl-C stops everything."
SMALL = ["--nodes", "2", "--speed", "600", "--start=-2h", "--partitions", "2"]


def clean_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "GPUMETER_STACK")
    }


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def ports_in(text: str) -> set[int]:
    """Every local port the stack announced: broker, database, services."""
    return {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", text)}


def transcript(data_dir: Path) -> str:
    path = data_dir / "logs" / "stack.log"
    return path.read_text(errors="replace") if path.exists() else ""


def on_command_lines(data_dir: Path) -> str:
    pgrep = subprocess.run(["pgrep", "-af", str(data_dir)], capture_output=True, text=True)
    return pgrep.stdout.strip()


def assert_nothing_left(data_dir: Path, ports: set[int]) -> None:
    """Within a minute of the ending, nothing is left. The process waited on may end first: a
    closed terminal's SIGHUP ends the shell at once, while make and the stack are still stopping
    what they started."""
    wait_until(
        lambda: not marked(str(data_dir)),
        60,
        what=f"the stack's processes to end: {marked(str(data_dir))}",
    )
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not on_command_lines(data_dir), 60, what="the stack itself to end")
    left = on_command_lines(data_dir)
    assert left == "", f"processes left behind: {left}"
    still = sorted(port for port in ports if listening(port))
    assert not still, f"ports still listening: {still}"


def wait_started(data_dir: Path, process: subprocess.Popen) -> str:
    def started() -> str:
        text = transcript(data_dir)
        if process.poll() is not None:
            raise StopWaiting(f"the stack exited with {process.returncode}:\n{text[-3000:]}")
        # started, and the watch loop has reported at least once
        return text if STARTED in text and re.search(r"\] (waiting|allocation)", text) else ""

    return wait_until(started, 120, interval_s=0.5, what="the stack to start")


def up_command(data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "gpumeter", "up", "--data-dir", str(data_dir), *SMALL]


def up(data_dir: Path, stdout: int = subprocess.DEVNULL) -> subprocess.Popen:
    """`gpumeter up` on `data_dir` with the small fleet, its output to `stdout`."""
    return subprocess.Popen(
        up_command(data_dir),
        cwd=REPO_ROOT,
        env=clean_env(),
        stdout=stdout,
        stderr=subprocess.STDOUT,
    )


def shell_pipeline(data_dir: Path, tmp_path: Path) -> subprocess.Popen:
    """`make run ... 2>&1 | tee run.log` in a process group of its own, as a terminal runs it:
    the terminal's Ctrl-C and hang-up reach make, the stack and tee at once."""
    args = " ".join(f"'{a}'" for a in ["--data-dir", str(data_dir), *SMALL])
    return subprocess.Popen(
        [
            "bash",
            "-c",
            f'make --no-print-directory run ARGS="{args}" 2>&1 | tee {tmp_path}/run.log',
        ],
        cwd=REPO_ROOT,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def end_with_group_signal(sig: int) -> Callable[[Path, Path], tuple[subprocess.Popen, int]]:
    def end(data_dir: Path, tmp_path: Path) -> tuple[subprocess.Popen, int]:
        process = shell_pipeline(data_dir, tmp_path)
        wait_started(data_dir, process)
        os.killpg(process.pid, sig)
        return process, 0

    return end


def end_with_signal_to_stack(sig: int) -> Callable[[Path, Path], tuple[subprocess.Popen, int]]:
    def end(data_dir: Path, tmp_path: Path) -> tuple[subprocess.Popen, int]:
        process = up(data_dir)
        wait_started(data_dir, process)
        process.send_signal(sig)
        return process, 0 if sig != signal.SIGKILL else -signal.SIGKILL

    return end


def end_with_broken_pipe(data_dir: Path, tmp_path: Path) -> tuple[subprocess.Popen, int]:
    process = up(data_dir, stdout=subprocess.PIPE)
    # (nobody reads it until then: the start-up lines fit in the pipe's buffer)
    wait_started(data_dir, process)
    # the reader goes away (tee killed, a pager quit): the stack's next line meets a broken pipe
    assert process.stdout is not None
    process.stdout.close()
    return process, 0


LIVE_VIEW_BREAKS = """
import sys
import gpumeter.stack as stack
calls = []
original = stack.LiveView.update
def update(self, snapshot):
    calls.append(1)
    if len(calls) == 2:
        raise RuntimeError("the live view broke")
    original(self, snapshot)
stack.LiveView.update = update
from gpumeter.cli import main
sys.exit(main(sys.argv[1:]))
"""


def end_with_live_view_exception(data_dir: Path, tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """On a terminal (a pty), the rich live view raises on its second update."""
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-c", LIVE_VIEW_BREAKS, *up_command(data_dir)[3:]],
        cwd=REPO_ROOT,
        env={**clean_env(), "TERM": "xterm", "COLUMNS": "120", "LINES": "40"},
        stdin=slave,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)

    def read_terminal() -> None:
        with open(master, "rb", buffering=0) as terminal:
            try:
                while terminal.read(65536):
                    pass
            except OSError:
                pass  # EIO once the last writer is gone

    threading.Thread(target=read_terminal, daemon=True).start()
    return process, 1


ENDINGS = {
    "ctrl-c in a terminal (make run | tee)": end_with_group_signal(signal.SIGINT),
    "terminal closed (SIGHUP to make run | tee)": end_with_group_signal(signal.SIGHUP),
    "SIGTERM to the stack": end_with_signal_to_stack(signal.SIGTERM),
    "SIGKILL of the stack": end_with_signal_to_stack(signal.SIGKILL),
    "broken pipe on stdout": end_with_broken_pipe,
    "exception in the live view": end_with_live_view_exception,
}


# The endings that leave the most behind for the next run (no orderly stop, a closed terminal).
RERUN_AFTER = ("SIGKILL of the stack", "terminal closed (SIGHUP to make run | tee)")


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_no_process_stays_behind_however_the_stack_ends(ending: str, tmp_path: Path) -> None:
    # given a running stack with its simulated fleet
    data_dir = tmp_path / "var"
    # when it ends this way
    process, expected_status = ENDINGS[ending](data_dir, tmp_path)
    process.wait(90)
    # then every process it started is gone (the stack's own included), ports closed
    assert_nothing_left(data_dir, ports_in(transcript(data_dir)))
    text = transcript(data_dir)
    # and it ended as a user expects (a shell pipeline's status is the shell's, not the stack's)
    if not ending.startswith(("ctrl-c", "terminal")):
        assert process.returncode == expected_status, text[-3000:]
    if ending.startswith("ctrl-c"):
        assert "SIGINT: stopping" in text, text[-3000:]
    if ending.startswith("terminal"):
        assert "SIGHUP: stopping" in text, text[-3000:]
    if ending == "broken pipe on stdout":
        assert "standard output closed (broken pipe); stopping" in text, text[-3000:]
    if ending == "exception in the live view":
        assert "error: RuntimeError: the live view broke" in text
    if ending != "SIGKILL of the stack":
        assert "stopped: no process left behind" in text, text[-3000:]
    if ending not in RERUN_AFTER:
        return
    # and a later run on the same data directory starts and stops cleanly
    again = subprocess.run(
        [*up_command(data_dir), "--duration", "5"],
        cwd=REPO_ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "stopped: no process left behind" in again.stdout
    assert_nothing_left(data_dir, ports_in(again.stdout))


def test_a_run_after_everything_was_killed_stops_the_leftovers_and_starts(tmp_path: Path) -> None:
    # given a stack killed together with its guardian (kill -9 of every process of the user's),
    # leaving the broker, PostgreSQL (and its postmaster.pid) and the services orphaned
    data_dir = tmp_path / "var"
    process = up(data_dir)
    wait_started(data_dir, process)
    [guardian] = [p for p in marked(str(data_dir)) if "gpumeter.guardian" in cmdline(p.pid)]
    os.kill(guardian.pid, signal.SIGKILL)
    process.kill()
    process.wait(10)
    orphans = marked(str(data_dir))
    assert any(p.name == "postgres" for p in orphans), orphans
    assert (data_dir / "pgdata" / "postmaster.pid").exists()
    # when the user runs it again on the same data directory
    again = subprocess.run(
        [*up_command(data_dir), "--duration", "10"],
        cwd=REPO_ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    # then it stops what was left, says so, runs, and leaves nothing behind itself
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert re.search(
        r"stopped \d+ processes an earlier run on this data directory left", again.stdout
    )
    assert re.search(r"\] (waiting|allocation)", again.stdout)
    assert_nothing_left(data_dir, ports_in(again.stdout))
    assert not {p.pid for p in orphans} & {p.pid for p in marked(str(data_dir))}


def test_a_second_stack_on_the_same_data_directory_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    first = up(data_dir)
    try:
        wait_started(data_dir, first)
        second = subprocess.run(
            [*up_command(data_dir), "--duration", "5"],
            cwd=REPO_ROOT,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert f"another gpumeter up (pid {first.pid}) is running on {data_dir}" in second.stdout
        # and the first one is untouched
        assert first.poll() is None
        assert any(p.name == "postgres" for p in marked(str(data_dir)))
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(90)
    assert_nothing_left(data_dir, ports_in(transcript(data_dir)))


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
