"""Where ImageNet weights for semseg's deep-stem ResNet can be had: one table, printed by
`python tool/prepare_weights.py --list`.

The same network (three 3x3 stem convs of 64, 64 and 128 channels, then 128 channels into layer1)
is published by several projects, each with its own key names (`layout`, see
model.imagenet_convert). `hash_kind` says how a download is verified:
- sha256-prefix: the hex suffix of the file name is the start of the file's sha256 (torch.hub's
  convention), checked by torch.hub during the download;
- sha1: the sha1 of the .pth inside Encoding's zip, as Encoding's model_store.py lists it in full
  (the zip's name carries its first 8 digits);
- none: nothing published to check against. Such a source is never tried on its own: only when
  named with --source, which is the user's explicit choice of an unverified download.
Top-1 is the ImageNet-1k validation accuracy the publisher reports (None: not published).
Recorded from the publishers' code and docs; see docs/datasets.md for where each came from.
"""
from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class Source:
    name: str  # what --source takes
    layers: int
    urls: Tuple[str, ...]  # mirrors of one file, tried in order
    layout: str  # timm (conv1.0 ... conv1.6 + bn1) or semseg (conv1, bn1, conv2, bn2, conv3, bn3)
    hash_kind: str  # sha256-prefix | sha1 | none
    digest: Optional[str]  # the full sha1, or the sha256 prefix of the name; None when none
    licence: str
    top1: Optional[float]
    found_in: str
    hub_file: Optional[Tuple[str, str]] = None  # (repo id, file) on the Hugging Face hub, fetched by huggingface_hub

    @property
    def pinned(self) -> bool:
        return self.hash_kind != "none"

    @property
    def file_name(self) -> str:
        return self.hub_file[1] if self.hub_file else self.urls[0].rsplit("/", 1)[-1]


TIMM_RELEASE = "https://github.com/rwightman/pytorch-pretrained-gluonresnet/releases/download/v0.1/"
TIMM_FOUND_IN = ("huggingface/pytorch-image-models timm/models/resnet.py (resnet<N>s.gluon_in1k) and "
                 "hfdocs/source/models/gloun-resnet.mdx (top-1)")
ENCODING_MIRRORS = ("https://s3.us-west-1.wasabisys.com/encoding/models/",
                    "https://hangzh.s3.amazonaws.com/encoding/models/")
ENCODING_FOUND_IN = "zhanghang1989/PyTorch-Encoding encoding/models/model_store.py (_model_sha1)"
CSAIL_MODELS = "http://sceneparsing.csail.mit.edu/model/pretrained_resnet/"
CSAIL_FOUND_IN = "CSAILVision/semantic-segmentation-pytorch mit_semseg/models/resnet.py (model_urls)"


def _timm(layers: int, file: str, top1: float) -> Source:
    return Source("timm-gluon", layers, (TIMM_RELEASE + file,), "timm", "sha256-prefix",
                  file.rsplit("-", 1)[1].split(".")[0], "Apache-2.0 (timm; ported from GluonCV, Apache-2.0)",
                  top1, TIMM_FOUND_IN)


def _hub(layers: int, top1: float) -> Source:
    repo = f"timm/resnet{layers}s.gluon_in1k"
    return Source("timm-hub", layers, (f"https://huggingface.co/{repo}/resolve/main/model.safetensors",), "timm",
                  "none", None, "Apache-2.0 (model card)", top1, TIMM_FOUND_IN + "; huggingface.co/" + repo,
                  hub_file=(repo, "model.safetensors"))


def _encoding(layers: int, sha1: str) -> Source:
    file = f"resnet{layers}s-{sha1[:8]}.zip"
    return Source("encoding", layers, tuple(mirror + file for mirror in ENCODING_MIRRORS), "timm", "sha1", sha1,
                  "MIT (PyTorch-Encoding)", None, ENCODING_FOUND_IN)


def _csail(layers: int) -> Source:
    return Source("csail", layers, (f"{CSAIL_MODELS}resnet{layers}-imagenet.pth",), "semseg", "none", None,
                  "BSD-3-Clause (semantic-segmentation-pytorch)", None, CSAIL_FOUND_IN)


# In the order prepare_weights tries them: verified sources first.
SOURCES: Tuple[Source, ...] = (
    _timm(50, "gluon_resnet50_v1s-1762acc0.pth", 78.70),
    _timm(101, "gluon_resnet101_v1s-60fe0cc1.pth", 80.29),
    _timm(152, "gluon_resnet152_v1s-dcc41b81.pth", 81.02),
    _encoding(50, "a75c83cfc89a56a4e8ba71b14f1ec67e923787b3"),
    _encoding(101, "03a0f310d6447880f1b22a83bd7d1aa7fc702c6e"),
    _encoding(152, "36670e8bc2428ecd5b7db1578538e2dd23872813"),
    _hub(50, 78.70),
    _hub(101, 80.29),
    _hub(152, 81.02),
    _csail(18),
    _csail(50),
    _csail(101),
)
SOURCE_NAMES = tuple(dict.fromkeys(source.name for source in SOURCES))
SEMSEG_TOP1 = {50: 76.63, 101: 78.25, 152: 78.59}  # semseg's FAQ, for its Drive files


def sources_for(layers: int, name: Optional[str] = None) -> Tuple[Source, ...]:
    """The sources of that depth: the named one, else every verified one, in table order."""
    return tuple(source for source in SOURCES if source.layers == layers
                 and (source.name == name if name else source.pinned))


def source_of_file(file_name: str) -> Optional[Source]:
    """The source whose published file has this name (a mirror keeps the name), else None."""
    return next((source for source in SOURCES if not source.hub_file and source.file_name == file_name), None)


def describe_sources() -> str:
    """The table as text, one source a block."""
    lines = []
    for s in SOURCES:
        hub = f" (huggingface_hub: {s.hub_file[0]}, {s.hub_file[1]})" if s.hub_file else ""
        where = "\n      ".join(s.urls) + hub
        check = {"sha256-prefix": f"sha256 starts with {s.digest}", "sha1": f"sha1 of the .pth inside: {s.digest}",
                 "none": "no published hash: used only with --source " + s.name}[s.hash_kind]
        top1 = f"{s.top1:.2f}" if s.top1 is not None else "not published"
        lines += [f"{s.name} ResNet-{s.layers} ({s.layout} layout), top-1 {top1}, licence {s.licence}",
                  f"      {where}", f"      check: {check}", f"      recorded from {s.found_in}"]
    return "\n".join(lines)


def source_depths() -> Tuple[int, ...]:
    """The ResNet depths some source publishes, ascending: what `--layers` takes."""
    return tuple(sorted({source.layers for source in SOURCES}))


def fetch_command(layers: int) -> Optional[str]:
    """The prepare_weights command that fetches ResNet-<layers>, naming the source when none of that
    depth publishes a hash (ResNet-18: CSAIL's only); None when no source has that depth."""
    of_depth = [source for source in SOURCES if source.layers == layers]
    if not of_depth:
        return None
    pick = "" if any(source.pinned for source in of_depth) else f" --source {of_depth[0].name}"
    return f"python tool/prepare_weights.py --layers {layers}{pick}"
