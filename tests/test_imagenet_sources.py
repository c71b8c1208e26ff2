"""model/imagenet_sources.py against its publishers: every source's URLs and hash equal the values
in tests/fixtures/upstream/imagenet_sources.json, copied by hand from each publisher's own code
(the file names which), so a changed digit in the table fails here rather than refusing, or
worse accepting, a download."""
import json
import re
from pathlib import Path

from conftest import REPO_ROOT
from model.imagenet_sources import SOURCES

UPSTREAM = json.loads((Path(__file__).resolve().parent / "fixtures" / "upstream" / "imagenet_sources.json")
                      .read_text(encoding="utf-8"))["sources"]


def test_every_source_has_its_publishers_urls_and_hash():
    table = {f"{s.name} ResNet-{s.layers}": s for s in SOURCES}
    assert sorted(table) == sorted(UPSTREAM)
    for key, published in UPSTREAM.items():
        source = table[key]
        assert list(source.urls) == published["urls"], key
        assert source.digest == published["digest"], key
        assert source.pinned == (published["digest"] is not None), key
        assert published["from"], key  # where the values were read


def test_hashes_in_file_names_agree_with_the_published_ones():
    """torch.hub's convention (timm) and Encoding's zip names both carry the hash's first 8 digits."""
    for source in SOURCES:
        if source.pinned:
            assert all(f"-{source.digest[:8]}." in url for url in source.urls), source


def test_fetching_needs_no_timm_and_the_docs_say_how_to_add_it_without_touching_torch():
    """`pip install timm` would replace the CPU torch: nothing here imports it, and the docs say so."""
    for path in sorted(REPO_ROOT.glob("*/*.py")):
        assert not re.search(r"^\s*(import|from) timm\b", path.read_text(encoding="utf-8"), re.M), path
    guide = (REPO_ROOT / "docs" / "datasets.md").read_text(encoding="utf-8")
    assert "**No timm needed.**" in guide and "pip install --no-deps timm" in guide
    assert "--no-deps torchvision" in guide and "download.pytorch.org/whl/cpu" in guide
    assert "It needs no timm" in (REPO_ROOT / "README.md").read_text(encoding="utf-8")
