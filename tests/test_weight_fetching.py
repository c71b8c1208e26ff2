"""Weight downloads are verified digit for digit, and tool/prepare_weights.py keeps going and keeps
what it had: a source whose file fails its hash gives way to the next one, and a save that fails
midway leaves an existing --output as it was. Files come from an http.server on 127.0.0.1."""
import errno
import hashlib

import pytest
import torch

import model.imagenet_sources as imagenet_sources
from conftest import serve_folder
from model.imagenet_sources import Source
from test_prepare_weights import imagenet_state, write_source
from tool import prepare_weights
from util.download import fetch_url, file_digest, verify_digest
from util.errors import CheckpointError


def one_digit_off(digest: str, keep: int) -> str:
    """`digest`'s first `keep` digits, the next one changed: only a full comparison tells them apart."""
    return digest[:keep - 1] + ("0" if digest[keep - 1] != "0" else "1")


@pytest.fixture
def blob(tmp_path):
    path = tmp_path / "site" / "blob.bin"
    path.parent.mkdir()
    path.write_bytes(b"weights " * 1000)
    return path


def test_a_fresh_download_must_match_all_eight_digits_of_its_name(blob, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    name = f"blob-{one_digit_off(file_digest(blob), 8)}.pth"
    blob.rename(blob.with_name(name))
    with serve_folder(blob.parent) as base, pytest.raises(CheckpointError, match="refused and deleted"):
        fetch_url(f"{base}/{name}", "TEST.model_path")
    assert list((tmp_path / "torch" / "hub" / "checkpoints").iterdir()) == []


def test_a_cached_copy_must_match_all_eight_digits_of_its_name(blob, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / f"blob-{one_digit_off(file_digest(blob), 8)}.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(blob.read_bytes())
    with pytest.raises(CheckpointError, match="refused and deleted"):
        fetch_url(f"http://127.0.0.1:9/{cached.name}", "TEST.model_path")
    assert not cached.exists()


def test_a_full_sha1_is_compared_to_its_last_digit(blob):
    sha1 = hashlib.sha1(blob.read_bytes()).hexdigest()
    verify_digest(blob, "sha1", sha1, "Encoding zip", remove=False)
    with pytest.raises(CheckpointError, match="refused"):
        verify_digest(blob, "sha1", one_digit_off(sha1, 40), "Encoding zip", remove=False)
    assert blob.exists()


def test_a_source_failing_its_hash_gives_way_to_the_next(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    state = imagenet_state(18, seed=3)
    good = write_source(state, "csail", tmp_path / "site", "good.pth")
    damaged = tmp_path / "site" / "damaged.pth"
    damaged.write_bytes(b"a truncated copy")  # refused by its hash before anything reads it
    digest = file_digest(good)[:8]
    output = tmp_path / "out" / "resnet18_v2.pth"
    with serve_folder(good.parent) as base:
        monkeypatch.setattr(imagenet_sources, "SOURCES", (
            Source("first", 18, (f"{base}/{damaged.name}",), "semseg", "sha256-prefix", digest, "", None, ""),
            Source("second", 18, (f"{base}/{good.name}",), "semseg", "sha256-prefix", digest, "", None, "")))
        prepare_weights.main(["--layers", "18", "--output", str(output)])
    written = torch.load(output, weights_only=True)
    assert all(torch.equal(written[key], state[key]) for key in state)


def test_a_save_failing_midway_leaves_the_existing_output_unchanged(tmp_path, monkeypatch):
    source = write_source(imagenet_state(18, seed=4), "csail", tmp_path / "downloads")
    output = tmp_path / "initmodel" / "resnet18_v2.pth"
    output.parent.mkdir()
    output.write_bytes(b"the weights of an earlier run")

    def disk_full_midway(obj, f, *args, **kwargs):
        handle = open(f, "wb") if not hasattr(f, "write") else f
        handle.write(b"PK\x03\x04 half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full_midway)
    with pytest.raises(CheckpointError, match="No space left"):
        prepare_weights.main(["--layers", "18", "--from-file", str(source), "--output", str(output)])
    assert output.read_bytes() == b"the weights of an earlier run"
    assert [p.name for p in output.parent.iterdir()] == [output.name]  # no temporary left
