"""Test helper: a real ``chroma run`` server on 127.0.0.1 (the CLI of the installed chromadb)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChromaServer:
    """``start()`` returns the server URL (``http://127.0.0.1:<port>``); ``stop()`` ends it.

    Args:
        folder: where the server keeps its data and log.

    Raises (from ``start``):
        FileNotFoundError: the chroma CLI is not installed. RuntimeError: the server did not start.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout_s: float = 60) -> str:
        exe = shutil.which("chroma", path=str(Path(sys.executable).parent)) or shutil.which("chroma")
        if exe is None:
            raise FileNotFoundError("the chroma CLI (chromadb) is not installed")
        port = _free_port()
        self._log = open(self.folder / "chroma.log", "wb")
        self.proc = subprocess.Popen([exe, "run", "--path", str(self.folder / "data"), "--host", "127.0.0.1",
                                      "--port", str(port)], stdout=self._log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/v2/heartbeat", timeout=2) as r:
                    if r.status == 200:
                        return url
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chroma server did not start: {(self.folder / 'chroma.log').read_text()[-2000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
