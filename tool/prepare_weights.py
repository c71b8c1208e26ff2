"""Fetch ImageNet weights for semseg's deep-stem ResNet and write initmodel/resnet<layers>_v2.pth.

  python tool/prepare_weights.py --layers 50            (also 101, 152)
  python tool/prepare_weights.py --list                 (the sources, their hashes and top-1)
  python tool/prepare_weights.py --layers 50 --from-file gluon_resnet50_v1s-1762acc0.pth
  python tool/prepare_weights.py --layers 101 --url https://my.mirror/resnet101s-03a0f310.zip
  python tool/prepare_weights.py --layers 18 --source csail   (a source with no published hash)

Without --from-file or --url it tries the sources of model/imagenet_sources.py that publish a
hash, in order, and keeps the first download that matches it. Downloads go through torch.hub
into its cache (TORCH_HOME, default ~/.cache/torch/hub/checkpoints; the Hugging Face copy into
huggingface_hub's cache), so a second run does not download again. The file, in timm/Encoding or
semseg/CSAIL layout (.pth, .safetensors or Encoding's .zip), is converted to semseg's layout,
checked (model/imagenet_convert.py) and written atomically, where tool/train.py looks for it by
default. These weights are not byte-identical to semseg's Google Drive files (see FAQ.md).
"""
from __future__ import annotations

import argparse
import logging
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.imagenet_convert import convert_imagenet_weights, read_weight_file, zip_member  # noqa: E402
from model.imagenet_sources import (SOURCE_NAMES, SOURCES, Source, describe_sources, source_depths,  # noqa: E402
                                    source_of_file, sources_for)
from model.weights import REPO_ROOT, SEMSEG_IMAGENET_FILE  # noqa: E402
from util.checkpoint import atomic_save, check_writable  # noqa: E402
from util.cli import run_main, setup_logging  # noqa: E402
from util.download import (DownloadError, cache_folder, fetch_url, file_digest, named_hash, url_file_name,  # noqa: E402
                           verify_digest)
from util.errors import CheckpointError, UserError  # noqa: E402

logger = logging.getLogger("prepare_weights")
NETWORK_TIMEOUT_S = 60  # a stalled connection fails, so the next source gets its turn


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, choices=source_depths(), help="ResNet depth (TRAIN.layers)")
    parser.add_argument("--list", action="store_true", help="print the known sources and exit")
    parser.add_argument("--from-file", type=Path, metavar="F",
                        help="a file downloaded by hand (.pth, .safetensors or Encoding .zip), any known layout")
    parser.add_argument("--url", metavar="U", help="a mirror; a hex suffix in its file name is checked as a sha256 "
                        "prefix (a known source's file name: by that source's hash)")
    parser.add_argument("--source", choices=SOURCE_NAMES,
                        help="only this source; the way to use one that publishes no hash (see --list)")
    parser.add_argument("--output", type=Path, metavar="P",
                        help="where to write; default initmodel/resnet<layers>_v2.pth under the repository root")
    args = parser.parse_args(argv)
    if not args.list and args.layers is None:
        parser.error("--layers is required (or --list)")
    if sum(x is not None for x in (args.from_file, args.url, args.source)) > 1:
        parser.error("give at most one of --from-file, --url and --source")
    return args


def fetch_source(source: Source, url: str) -> Path:
    """The verified local copy of one source's file (DownloadError when it cannot be fetched)."""
    if source.hub_file is None:
        return download(url, f"--source {source.name}", source)
    from huggingface_hub import hf_hub_download  # only this source needs it
    try:
        return Path(hf_hub_download(*source.hub_file))
    except OSError as error:  # huggingface_hub's offline, HTTP and not-found errors are all OSErrors
        raise DownloadError(f"--source {source.name}", url, str(error).splitlines()[0]) from None


def download(url: str, what: str, source: Source | None) -> Path:
    """`url` through torch.hub's cache, checked by the hash its source publishes; with no known
    source, by a sha256 prefix in the file name when there is one (else not at all: logged)."""
    by_sha1 = source is not None and source.hash_kind == "sha1"
    prefix = None if by_sha1 else source.digest if source is not None else named_hash(url_file_name(url))
    if prefix is None and not by_sha1:  # nothing tells a cached copy of that name from another URL's: fetch anew
        (cache_folder() / url_file_name(url)).unlink(missing_ok=True)
    path = fetch_url(url, what, sha256_prefix=prefix, hash_in_name=False)  # torch.hub checks the sha256 prefix
    if by_sha1:
        verify_zip_member_sha1(path, source.digest, f"{what}: {url}", remove=True)
    elif prefix is None:
        logger.warning("%s %s is not verified: nothing is published to check it against; sha256 %s", what, url,
                       file_digest(path))
    return path


def verify_zip_member_sha1(path: Path, sha1: str, what: str, remove: bool) -> None:
    """Encoding publishes the sha1 of the .pth inside its zip; check that one."""
    with tempfile.TemporaryDirectory() as folder:
        member = zip_member(path, folder, what)
        try:
            verify_digest(member, "sha1", sha1, what, remove=False)
        except CheckpointError:
            if remove:
                path.unlink(missing_ok=True)
            raise CheckpointError(f"{what}: {path} was {'refused and deleted' if remove else 'refused'}: the sha1 of "
                                  f"its {member.name} is not {sha1}, the published hash") from None


def verify_known_file(path: Path) -> Source | None:
    """A file of the user's bearing a known source's name is checked against that source's hash
    (and left in place when it fails)."""
    source = source_of_file(path.name)
    if source is not None and source.hash_kind == "sha256-prefix":
        verify_digest(path, "sha256", source.digest, str(path), remove=False)
    elif source is not None and source.hash_kind == "sha1":
        verify_zip_member_sha1(path, source.digest, str(path), remove=False)
    return source


def fetch_mirror(url: str, layers: int) -> Path:
    """--url, checked as its file name's source (when known) or its name's hash suffix say."""
    try:
        return download(url, "--url", source_of_file(url_file_name(url)))
    except DownloadError as error:
        raise UserError(f"--url: cannot download {url} ({error.reason}); download it by hand and run "
                        f"python tool/prepare_weights.py --layers {layers} --from-file F") from None


def fetch_first(layers: int, name: str | None) -> tuple[Path, Source]:
    """The first source of that depth whose file can be fetched and verified."""
    candidates = sources_for(layers, name)
    if not candidates:
        which = (f"source {name} has no ResNet-{layers}" if name
                 else f"no source with a published hash has ResNet-{layers}")
        others = sorted({s.name for s in SOURCES if s.layers == layers})
        raise UserError(f"{which} (sources for it: {', '.join(others) or 'none'}; see --list); "
                        f"or run python tool/prepare_weights.py --layers {layers} --from-file F")
    failures = []
    for source in candidates:
        for url in source.urls:
            try:
                return fetch_source(source, url), source
            except DownloadError as error:
                failures.append(f"{error.url} ({error.reason})")
            except CheckpointError as error:  # a copy that fails its hash: another source may still do
                failures.append(f"{url} ({error})")
    raise UserError(f"no ImageNet weights for ResNet-{layers} could be fetched; tried {'; '.join(failures)}. "
                    f"Download one of these by hand (python tool/prepare_weights.py --list) and run "
                    f"python tool/prepare_weights.py --layers {layers} --from-file F")


def weight_file(args: argparse.Namespace) -> tuple[Path, Source | None, str]:
    """The verified source file of --from-file, --url or the table, its source and how it was found."""
    if args.from_file is not None:
        if not args.from_file.is_file():
            raise CheckpointError(f"--from-file: {args.from_file} does not exist")
        return args.from_file, verify_known_file(args.from_file), "--from-file"
    if args.url is not None:
        source = source_of_file(url_file_name(args.url))
        origin = f"{source.name} (mirror {args.url})" if source is not None else f"--url {args.url}"
        return fetch_mirror(args.url, args.layers), source, origin
    path, source = fetch_first(args.layers, args.source)
    return path, source, f"{source.name} ({source.hub_file[0] if source.hub_file else path.name})"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.list:
        print(describe_sources())
        return
    setup_logging()
    output = args.output or REPO_ROOT / SEMSEG_IMAGENET_FILE.format(layers=args.layers)
    check_writable(output.parent, "--output")
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(NETWORK_TIMEOUT_S)  # urllib, under torch.hub, takes no timeout of its own
    try:
        path, source, origin = weight_file(args)
    finally:
        socket.setdefaulttimeout(previous_timeout)
    state = convert_imagenet_weights(read_weight_file(path, origin), args.layers, path)
    atomic_save(state, output)
    top1 = f"{source.top1:.2f}" if source is not None and source.top1 is not None else "not published"
    logger.info("source %s, file %s, sha256 %s, ImageNet top-1 %s", origin, path, file_digest(path), top1)
    logger.info("wrote %s (%d tensors, ResNet-%d in semseg's layout); tool/train.py reads it as "
                "TRAIN.pretrained_backbone", output, len(state), args.layers)


if __name__ == "__main__":
    run_main(main)
