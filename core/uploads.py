"""Uploaded files: safe stored names, size checks, image collection from files and zip archives.

An uploaded file's name is user input: it never becomes a path. :func:`safe_name`
keeps only the last component, restricted to ``[A-Za-z0-9._-]``; stored files live
in folders the app chooses (content hashes for images, sanitised names for PDFs).
Zip archives are read in memory member by member (no extraction to disk, so
``../`` members and symlinks cannot write anywhere), with limits on the number of
members and on the uncompressed size (zip bombs).
"""

from __future__ import annotations

import re
import unicodedata
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from core.errors import InputError
from core.imageio import InvalidImageError, load_rgb
from core.settings import get_settings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MAX_ZIP_MEMBERS = 2000
MAX_ZIP_BYTES = 512 * 1024 * 1024  # uncompressed, all members together
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class UploadError(InputError):
    """An upload that cannot be used (missing, too large, wrong kind); the message says why."""


def safe_name(name: str | None, default: str = "upload", max_len: int = 100) -> str:
    """A file name safe to create inside a folder we own.

    Takes the last component under both POSIX and Windows rules, folds accents to
    ASCII, replaces every run of characters outside ``[A-Za-z0-9._-]`` with ``_`` and
    strips leading dots (no hidden files, no ``..``). ``"../../evil.png"`` → ``"evil.png"``.

    Args:
        name: the user's file name (any string, may be None).
        default: returned when nothing usable is left.
        max_len: maximum length; the suffix is kept when shortening.
    """
    raw = PureWindowsPath(PurePosixPath(str(name or "")).name).name
    raw = unicodedata.normalize("NFKD", raw).encode("ascii", "ignore").decode("ascii")
    stem, suffix = (raw.rsplit(".", 1) + [""])[:2] if "." in raw.strip(".") else (raw, "")
    stem = _UNSAFE.sub("_", stem).strip("._- ")
    suffix = _UNSAFE.sub("", suffix)[:12]
    if not stem:  # nothing usable left of the stem (non-Latin name, dots only ...)
        stem = Path(default).stem or "upload"
    s = f"{stem}.{suffix}" if suffix else stem
    if len(s) > max_len:
        stem, suf = Path(s).stem, Path(s).suffix[:12]
        s = stem[: max_len - len(suf)] + suf
    return s


def upload_path(value) -> Path | None:
    """Path of a Gradio upload value (a str path, a ``{"path": ...}`` dict or a FileData), or None."""
    if value is None or value == "":
        return None
    if isinstance(value, (str, Path)):
        return Path(value)
    if isinstance(value, dict):
        p = value.get("path") or value.get("name")
        return Path(p) if p else None
    p = getattr(value, "path", None) or getattr(value, "name", None)
    return Path(p) if p else None


def check_upload(value, what: str = "file", max_mb: float | None = None) -> Path:
    """The uploaded file's path after existence and size checks.

    Raises:
        UploadError: nothing uploaded, file missing on the server, empty, or above
            ``max_mb`` (default ``Settings.max_upload_mb``).
    """
    p = upload_path(value)
    if p is None:
        raise UploadError(f"no {what} was uploaded")
    if not p.is_file():
        raise UploadError(f"the uploaded {what} {safe_name(p.name)} could not be found on the server")
    limit = float(max_mb if max_mb is not None else get_settings().max_upload_mb)
    size = p.stat().st_size
    if size == 0:
        raise UploadError(f"{safe_name(p.name)} is empty (0 bytes)")
    if size > limit * 1024 * 1024:
        raise UploadError(f"{safe_name(p.name)} is larger than the upload limit of {limit:g} MB (DRA_MAX_UPLOAD_MB)")
    return p


def check_photo_file(path: str | Path, max_bytes: float | None = None) -> Path:
    """The path of a photo file the agent was given, after existence and size checks.

    The one check of a chat turn's photo (:meth:`agent.memory.Conversation.start_turn`) and a
    one-shot run's (:func:`agent.ask.start_run`); decoding limits are :func:`core.imageio.load_rgb`'s.

    Args:
        path: the photo's path on the server.
        max_bytes: the upload limit in bytes (None: no limit).

    Raises:
        InvalidImageError: the file is missing, or larger than ``max_bytes``.
    """
    p = Path(path)
    if not p.is_file():
        raise InvalidImageError(f"the uploaded file {p.name} could not be found on the server")
    if max_bytes is not None and p.stat().st_size > max_bytes:
        raise InvalidImageError(f"{p.name} is larger than the upload limit of {max_bytes / 2**20:g} MB "
                                "(DRA_MAX_UPLOAD_MB)")
    return p


def images_from_uploads(values, max_images: int = 1000,
                        max_total_pixels: int | None = None) -> tuple[list[np.ndarray], list[str]]:
    """Decode every image in a list of uploads; zip archives are opened and their images used.

    Args:
        values: Gradio upload values (paths / dicts); ``.zip`` files are read member by member.
        max_images: stop with an error beyond this many images.
        max_total_pixels: stop with an error once the decoded images hold more pixels together
            (default ``Settings.max_fit_pixels``): a zip of small files can decode to gigabytes.

    Returns:
        ``(images, skipped)``: RGB uint8 arrays ``(H, W, 3)`` in upload order, and one
        message per file that was not a usable image (name and reason).

    Raises:
        UploadError: a zip that is not readable, too many members or too large
            uncompressed, more than ``max_images`` images or ``max_total_pixels`` pixels.
    """
    images: list[np.ndarray] = []
    skipped: list[str] = []
    cap = int(max_total_pixels if max_total_pixels is not None else get_settings().max_fit_pixels)
    total = [0]

    def keep(rgb: np.ndarray) -> None:
        total[0] += int(rgb.shape[0]) * int(rgb.shape[1])
        if total[0] > cap:
            images.clear()
            raise UploadError(f"the uploaded images hold more than {cap:,} decoded pixels together "
                              "(DRA_MAX_FIT_PIXELS): upload fewer or smaller images")
        images.append(rgb)
    for v in values or []:
        p = upload_path(v)
        if p is None:
            continue
        name = safe_name(p.name)
        if p.suffix.lower() == ".zip":
            try:
                zf = zipfile.ZipFile(p)
            except (zipfile.BadZipFile, OSError) as exc:
                raise UploadError(f"{name} is not a readable zip archive: {exc}") from None
            with zf:
                infos = [i for i in zf.infolist() if not i.is_dir()]
                if len(infos) > MAX_ZIP_MEMBERS:
                    raise UploadError(f"{name} has {len(infos)} files, more than the limit of {MAX_ZIP_MEMBERS}")
                if sum(i.file_size for i in infos) > MAX_ZIP_BYTES:
                    raise UploadError(f"{name} unpacks to more than {MAX_ZIP_BYTES // 2**20} MB (zip bomb guard)")
                for info in sorted(infos, key=lambda i: i.filename):
                    member = safe_name(info.filename)
                    if Path(info.filename).name.startswith(".") or "__MACOSX" in info.filename:
                        continue
                    if Path(member).suffix.lower() not in IMAGE_SUFFIXES:
                        skipped.append(f"{name}/{member}: not an image file")
                        continue
                    try:
                        rgb = load_rgb(zf.read(info))
                    except (InvalidImageError, zipfile.BadZipFile, OSError, RuntimeError) as exc:
                        skipped.append(f"{name}/{member}: {exc}")
                    else:
                        keep(rgb)
                    if len(images) > max_images:
                        raise UploadError(f"more than {max_images} images uploaded")
            continue
        try:
            rgb = load_rgb(p)
        except InvalidImageError as exc:
            skipped.append(f"{name}: {exc}")
        else:
            keep(rgb)
        if len(images) > max_images:
            raise UploadError(f"more than {max_images} images uploaded")
    return images, skipped
