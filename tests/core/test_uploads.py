"""core.uploads: safe names, upload checks, images from files and real zip archives."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from core.imageio import InvalidImageError
from core.uploads import UploadError, check_photo_file, check_upload, images_from_uploads, safe_name


@pytest.mark.parametrize(("name", "expected"), [
    ("../../evil.png", "evil.png"),
    ("..\\..\\windows\\evil.pdf", "evil.pdf"),
    ("/etc/passwd", "passwd"),
    ("..", "upload"),
    (".hidden.pdf", "hidden.pdf"),
    ("", "upload"),
    (None, "upload"),
    ("브릭 매뉴얼.pdf", "upload.pdf"),
    ("..pdf", "pdf"),
    ("Café manual v2.pdf", "Cafe_manual_v2.pdf"),
    ("a" * 300 + ".pdf", "a" * 96 + ".pdf"),
])
def test_safe_name_never_leaves_the_folder(name, expected, tmp_path):
    got = safe_name(name)
    assert got == expected
    assert "/" not in got and "\\" not in got and not got.startswith(".")
    assert (tmp_path / got).resolve().parent == tmp_path.resolve()


def _png(color, size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_check_upload(tmp_path):
    with pytest.raises(UploadError, match="no image"):
        check_upload(None, "image")
    with pytest.raises(UploadError, match="could not be found"):
        check_upload(str(tmp_path / "missing.png"), "image")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(UploadError, match="empty"):
        check_upload({"path": str(tmp_path / "empty.png")})
    big = tmp_path / "big.bin"
    big.write_bytes(b"0" * 2 * 1024 * 1024)
    with pytest.raises(UploadError, match="upload limit of 1 MB"):
        check_upload(str(big), max_mb=1)
    assert check_upload(str(big), max_mb=3) == big


def test_check_photo_file(tmp_path):
    """The agent's photo check (chat turns and one-shot runs): missing file, upload limit in bytes."""
    with pytest.raises(InvalidImageError, match="missing.png could not be found on the server"):
        check_photo_file(tmp_path / "missing.png")
    photo = tmp_path / "part.png"
    photo.write_bytes(_png((10, 20, 30)))
    with pytest.raises(InvalidImageError, match="larger than the upload limit"):
        check_photo_file(str(photo), max_bytes=10)
    assert check_photo_file(str(photo), max_bytes=2**20) == photo
    assert check_photo_file(photo) == photo


def test_images_from_files_and_zip(tmp_path):
    (tmp_path / "a.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / "notes.png").write_text("not an image")
    archive = tmp_path / "normals.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../escape.png", _png((0, 255, 0)))  # a member name that tries to leave
        zf.writestr("sub/b.jpg", _png((0, 0, 255)))
        zf.writestr("readme.txt", "hello")
        zf.writestr("__MACOSX/._b.jpg", b"junk")
        zf.writestr("broken.png", _png((1, 2, 3))[:40])
    images, skipped = images_from_uploads([str(tmp_path / "a.png"), str(tmp_path / "notes.png"), str(archive)])
    assert len(images) == 3 and all(im.dtype == np.uint8 and im.shape == (24, 32, 3) for im in images)
    assert images[0][0, 0].tolist() == [255, 0, 0]
    assert any("notes.png" in s and "not a recognised image" in s for s in skipped)
    assert any("readme.txt: not an image file" in s for s in skipped)
    assert any("broken.png" in s for s in skipped)
    # nothing was extracted next to the archive or above it
    assert not (tmp_path / "escape.png").exists() and not (tmp_path.parent.parent / "escape.png").exists()


def test_zip_limits_and_bad_zip(tmp_path, monkeypatch):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK not really")
    with pytest.raises(UploadError, match="not a readable zip"):
        images_from_uploads([str(bad)])
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.png", b"\0" * (3 * 1024 * 1024))
    import core.uploads as uploads

    monkeypatch.setattr(uploads, "MAX_ZIP_BYTES", 1024 * 1024)
    with pytest.raises(UploadError, match="zip bomb"):
        images_from_uploads([str(bomb)])
