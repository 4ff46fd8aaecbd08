"""Test helper: a real PostgreSQL server on 127.0.0.1 in a temporary folder (Debian's server binaries).

``run.sh test`` installs Debian's ``postgresql`` package; the server runs as the ``postgres``
system user when the tests run as root (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """Start with :meth:`start` (returns the SQLAlchemy URL), stop with :meth:`stop`.

    Raises (from ``start``):
        FileNotFoundError: PostgreSQL's server binaries are not installed.
        RuntimeError: the server did not start (its log is in the message).
    """

    def __init__(self):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            raise FileNotFoundError("PostgreSQL server binaries not found (apt-get install postgresql)")
        self.bindir = Path(bins[-1]).parent
        self.root = Path(tempfile.mkdtemp(prefix="dra-pg-", dir="/tmp"))
        self.port = _free_port()
        self.user = None
        if os.geteuid() == 0:
            self.user = "postgres"
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        os.chmod(self.root, 0o755)

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    def start(self) -> str:
        data, log = self.root / "data", self.root / "server.log"
        r = self._run("initdb", "-D", str(data), "-A", "trust", "-U", "dra", "-E", "UTF8", "--no-instructions")
        if r.returncode:
            raise RuntimeError(f"initdb failed: {r.stderr[-2000:]}")
        r = self._run("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                      f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "start")
        if r.returncode:
            raise RuntimeError(f"pg_ctl start failed: {r.stderr[-2000:]} {log.read_text()[-2000:] if log.exists() else ''}")
        deadline = time.time() + 30
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return f"postgresql+psycopg://dra@127.0.0.1:{self.port}/postgres"
            time.sleep(0.2)
        raise RuntimeError("PostgreSQL did not accept connections")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
