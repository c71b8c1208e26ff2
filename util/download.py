"""Weight files named by an http(s) URL: downloaded once into torch.hub's cache, checked by hash.

A URL is fetched with torch.hub.download_url_to_file (progress bar, a temporary name until
complete) into <torch.hub.get_dir()>/checkpoints/<file name>, the folder torch.hub itself uses
(TORCH_HOME moves it), and later runs reuse that copy. The hash is the torch.hub convention: a
file named `name-<hex>.ext` must have a sha256 starting with <hex> (at least 8 digits). torch.hub
checks it during the download and we check it again on every reuse, so a damaged or tampered copy
is refused and deleted, never loaded: one line, no file left behind.
"""
from __future__ import annotations

import hashlib
import logging
import re
import socket
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urlparse

import torch.hub

from util.errors import CheckpointError

logger = logging.getLogger(__name__)

URL_SCHEMES = ("http", "https")
NAMED_HASH = re.compile(r"-([0-9a-f]{8,64})$")  # stem ending: resnet50-1762acc0 -> 1762acc0
READ_CHUNK = 1 << 20


class DownloadError(CheckpointError):
    """A URL that could not be fetched (offline, refused, not found): worth trying another one."""

    def __init__(self, config_key: str, url: str, reason: str):
        self.url, self.reason = url, reason
        super().__init__(f"{config_key}: cannot download {url} ({reason}); check the network, or download the "
                         f"file yourself and give its local path")


def is_url(value: str | Path) -> bool:
    return isinstance(value, str) and urlparse(value).scheme in URL_SCHEMES


def url_file_name(url: str) -> str:
    return unquote(Path(urlparse(url).path).name)


def named_hash(file_name: str) -> str | None:
    """The sha256 prefix a torch.hub-style name carries (`name-<hex>.ext`), else None."""
    found = NAMED_HASH.search(Path(file_name).stem)
    return found.group(1) if found else None


def cache_folder() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def file_digest(path: str | Path, kind: str = "sha256") -> str:
    digest = hashlib.new(kind)
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_url(url: str, config_key: str, sha256_prefix: str | None = None, hash_in_name: bool = True) -> Path:
    """The local copy of `url` in torch.hub's cache, downloaded when absent.

    sha256_prefix: the hash the content must start with. hash_in_name: else the one in the file
    name, and a name without one is refused before anything is downloaded. With neither, nothing
    is checked here (the caller verifies the file its own way, or accepts it unverified).
    """
    name = url_file_name(url)
    expected = sha256_prefix or (named_hash(name) if hash_in_name else None)
    if expected is None and hash_in_name:
        suffix = Path(name).suffix or ".pth"
        raise CheckpointError(f"{config_key}: {url} carries no hash in its file name, so its content cannot be "
                              f"verified; name it <name>-<first 8+ hex digits of its sha256>{suffix} "
                              f"(tool/publish_model.py does) or download it yourself and give the local path")
    path = cache_folder() / name
    if path.is_file():
        logger.info("%s: using the cached copy %s of %s", config_key, path, url)
        if expected is not None:  # a fresh download was checked by torch.hub; a cached copy may have changed since
            verify_digest(path, "sha256", expected, f"{config_key}: {url}", remove=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("%s: downloading %s to %s", config_key, url, path)
        try:
            torch.hub.download_url_to_file(url, str(path), hash_prefix=expected, progress=True)
        except RuntimeError as error:
            if "invalid hash value" not in str(error):
                raise
            raise CheckpointError(f"{config_key}: {url} was refused and deleted: its sha256 does not start with "
                                  f"{expected}, the hash its name promises (a damaged or tampered copy)") from None
        except (URLError, socket.timeout, ConnectionError, OSError) as error:
            raise DownloadError(config_key, url, _reason(error)) from None
    return path


def verify_digest(path: Path, kind: str, expected: str, what: str, remove: bool) -> None:
    """Raise (after deleting `path` when `remove`: a download, never the user's own file) unless
    the file's `kind` digest starts with `expected`."""
    digest = file_digest(path, kind)
    if not digest.startswith(expected):
        fate = "refused and deleted" if remove else "refused"
        if remove:
            path.unlink(missing_ok=True)
        raise CheckpointError(f"{what}: {path} was {fate}: its {kind} {digest[:16]}... does not start with "
                              f"{expected}, the published hash (a damaged or tampered copy)")


def _reason(error: BaseException) -> str:
    if isinstance(error, HTTPError):
        return str(error)
    reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or error
    return str(reason).strip().splitlines()[0] if str(reason).strip() else type(error).__name__
