"""Assembly of the offline GGUF from PyPI slices: verification logic and the real file."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from agent import assemble
from agent.assemble import ModelAssemblyError, concatenate_verified, is_verified, part_paths, stamp_path


def _fake_parts(tmp_path, sizes=(1000, 2500, 7)):
    parts, blob = [], b""
    for i, n in enumerate(sizes):
        data = os.urandom(n)
        p = tmp_path / f"part{i + 1:02d}.bin"
        p.write_bytes(data)
        parts.append(p)
        blob += data
    return parts, blob


def test_concatenate_verified_writes_file_and_stamp(tmp_path):
    parts, blob = _fake_parts(tmp_path)
    sha = hashlib.sha256(blob).hexdigest()
    seen = []
    target = concatenate_verified(parts, tmp_path / "out" / "m.gguf", sha, len(blob),
                                  progress=lambda d, t: seen.append((d, t)))
    assert target.read_bytes() == blob
    assert json.loads(stamp_path(target).read_text()) == {"sha256": sha, "bytes": len(blob)}
    assert is_verified(target, sha, len(blob))
    assert seen[-1] == (len(blob), len(blob))
    # a stamp for another digest is not trusted
    assert not is_verified(target, "0" * 64, len(blob))


def test_checksum_mismatch_leaves_no_file(tmp_path):
    parts, blob = _fake_parts(tmp_path)
    target = tmp_path / "m.gguf"
    with pytest.raises(ModelAssemblyError, match="checksum mismatch"):
        concatenate_verified(parts, target, "ab" * 32, len(blob))
    assert not target.exists()
    assert not list(tmp_path.glob("m.gguf.tmp-*"))


def test_wrong_order_is_a_checksum_mismatch(tmp_path):
    parts, blob = _fake_parts(tmp_path)
    sha = hashlib.sha256(blob).hexdigest()
    with pytest.raises(ModelAssemblyError, match="checksum mismatch"):
        concatenate_verified(list(reversed(parts)), tmp_path / "m.gguf", sha, len(blob))


def test_size_mismatch(tmp_path):
    parts, blob = _fake_parts(tmp_path)
    with pytest.raises(ModelAssemblyError, match="bytes, expected"):
        concatenate_verified(parts[:2], tmp_path / "m.gguf", hashlib.sha256(blob).hexdigest(), len(blob))


def test_missing_part_package_names_pip_command():
    # part 23 does not exist on the registry: the error must name the install command
    with pytest.raises(ModelAssemblyError, match="pip install -r requirements-offline.txt"):
        part_paths(n_parts=23)


def test_installed_parts_are_found_in_order():
    paths = part_paths()
    assert [p.name for p in paths] == [f"part{n:02d}.bin" for n in range(1, 23)]
    assert sum(p.stat().st_size for p in paths) == assemble.QWEN_CODER_GGUF_BYTES


@pytest.mark.slow
def test_real_assembly_verifies(tmp_path):
    """Assemble the real 1.1 GB GGUF (or reuse the verified copy) and re-hash it from disk."""
    from core.settings import get_settings

    path = assemble.assemble_gguf(get_settings())
    assert path.stat().st_size == assemble.QWEN_CODER_GGUF_BYTES
    assert is_verified(path, assemble.QWEN_CODER_GGUF_SHA256, assemble.QWEN_CODER_GGUF_BYTES)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
        f.seek(0)
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == assemble.QWEN_CODER_GGUF_SHA256
    # second call returns at once from the stamp
    assert assemble.assemble_gguf(get_settings()) == path
