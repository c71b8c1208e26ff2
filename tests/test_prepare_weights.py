"""ImageNet weights from public sources (tool/prepare_weights.py): every published layout converts
to exactly semseg's keys and tensors, the converted network computes what the source layout
computes, downloads are verified by hash and cached, and every failure is one line leaving no file.

The source files are written by the tests from a seeded random deep-stem ResNet in each layout;
no real download is made (only an http.server on 127.0.0.1)."""
import functools
import hashlib
import http.server
import re
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import model.imagenet_sources as imagenet_sources
from conftest import assert_one_line_error, closed_port_url, run_tool, serve_folder
from model.imagenet_convert import convert_imagenet_weights, read_weight_file
from model.imagenet_sources import SOURCES, Source, describe_sources
from model.pspnet import PSPNet
from model.resnet import build_resnet
from model.imagenet_convert import load_backbone_weights
from tool import prepare_weights
from util.errors import CheckpointError, UserError

KEYS = Path(__file__).resolve().parent / "fixtures" / "keys"
# timm's names of the deep stem, as timm's resnet.py builds it (conv1 = Sequential(conv, bn, act, conv, bn,
# act, conv), then bn1 on its 128 channels); written out here, not read from the code under test.
SEMSEG_TO_TIMM = {"conv1": "conv1.0", "bn1": "conv1.1", "conv2": "conv1.3", "bn2": "conv1.4", "conv3": "conv1.6",
                  "bn3": "bn1"}


@functools.lru_cache(maxsize=4)
def imagenet_state(layers: int, seed: int = 0) -> dict:
    """A deep-stem ResNet's state dict with seeded random weights and BatchNorm statistics (shared
    between tests: copy a tensor before changing it)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in build_resnet(layers, deep_stem=True).state_dict().items():
        if key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=g) + 0.5
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.randint(1, 10_000, (), generator=g)
        else:
            state[key] = torch.randn(value.shape, generator=g) * 0.05
    return state


def timm_layout(state: dict) -> dict:
    """The same tensors under timm's / Encoding's names (conv1.0 ... conv1.6, bn1 after the stem)."""
    out = {}
    for key, value in state.items():
        module, _, rest = key.rpartition(".")
        out[f"{SEMSEG_TO_TIMM.get(module, module)}.{rest}"] = value
    return out


def write_source(state: dict, kind: str, folder: Path, name: str = "") -> Path:
    """`state` as a published file: timm .pth or .safetensors, Encoding .zip, or CSAIL .pth."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "csail":
        path = folder / (name or "resnet-imagenet.pth")
        torch.save(state, path)
    elif kind == "timm-safetensors":
        path = folder / (name or "model.safetensors")
        save_file({k: v.contiguous() for k, v in timm_layout(state).items()}, str(path))
    elif kind == "encoding":
        inner = folder / "resnets.pth"
        torch.save(timm_layout(state), inner)
        path = folder / (name or "resnets.zip")
        with zipfile.ZipFile(path, "w") as archive:
            archive.write(inner, inner.name)
        inner.unlink()
    else:
        path = folder / (name or "resnet_v1s.pth")
        torch.save(timm_layout(state), path)
    return path


def without_progress(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """The run's output less torch.hub's download progress bar (stderr lines `NN%|...`)."""
    kept = [line for line in out.stderr.splitlines() if not re.match(r"\s*\d+%\|", line)]
    return subprocess.CompletedProcess(out.args, out.returncode, out.stdout, "\n".join(kept))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", params=[50, 101])
def source_state(request):
    return request.param, imagenet_state(request.param)


@pytest.mark.parametrize("kind", ["timm-pth", "timm-safetensors", "encoding", "csail"])
def test_each_layout_converts_to_exactly_our_keys_and_tensors(source_state, kind, tmp_path):
    layers, state = source_state
    path = write_source(state, kind, tmp_path)
    converted = convert_imagenet_weights(read_weight_file(path), layers, path)
    reference = (KEYS / f"resnet{layers}_deepstem_imagenet.keys").read_text().splitlines()
    expected_keys = [line.split()[0] for line in reference]
    assert list(converted) == expected_keys
    for key, value in state.items():
        assert converted[key].dtype == value.dtype and torch.equal(converted[key], value), key


def _bn(source, t, name):
    return F.batch_norm(t, source[f"{name}.running_mean"], source[f"{name}.running_var"],
                        source[f"{name}.weight"], source[f"{name}.bias"], False, 0.0, 1e-5)


def _conv(source, t, name, stride=1, padding=0):
    return F.conv2d(t, source[f"{name}.weight"], stride=stride, padding=padding)


def reference_stem(source: dict, x: torch.Tensor) -> torch.Tensor:
    """The deep stem computed straight from timm-layout keys (conv1.0 ... conv1.6, bn1), without model/ code."""
    x = F.relu(_bn(source, _conv(source, x, "conv1.0", 2, 1), "conv1.1"))
    x = F.relu(_bn(source, _conv(source, x, "conv1.3", 1, 1), "conv1.4"))
    x = F.relu(_bn(source, _conv(source, x, "conv1.6", 1, 1), "bn1"))
    return F.max_pool2d(x, 3, 2, 1)


def reference_features(source: dict, x: torch.Tensor) -> torch.Tensor:
    """ResNet-50 features (stride 32) from timm-layout keys, without model/ code."""
    def bn(t, name):
        return _bn(source, t, name)

    def conv(t, name, stride=1, padding=0):
        return _conv(source, t, name, stride, padding)

    x = reference_stem(source, x)
    for stage, (blocks, stride) in enumerate(zip((3, 4, 6, 3), (1, 2, 2, 2)), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            s = stride if b == 0 else 1
            out = F.relu(bn(conv(x, f"{p}.conv1"), f"{p}.bn1"))
            out = F.relu(bn(conv(out, f"{p}.conv2", s, 1), f"{p}.bn2"))
            out = bn(conv(out, f"{p}.conv3"), f"{p}.bn3")
            shortcut = bn(conv(x, f"{p}.downsample.0", s), f"{p}.downsample.1") if b == 0 else x
            x = F.relu(out + shortcut)
    return x


def test_converted_weights_compute_the_source_layouts_features(tmp_path):
    state = imagenet_state(50, seed=3)
    path = write_source(state, "timm-pth", tmp_path)
    source = torch.load(path, weights_only=True)
    network = build_resnet(50, deep_stem=True).eval()
    network.load_state_dict(convert_imagenet_weights(read_weight_file(path), 50, path))
    x = torch.randn(1, 3, 33, 33, generator=torch.Generator().manual_seed(1))
    converted = tmp_path / "resnet50_v2.pth"
    prepare_weights.main(["--layers", "50", "--from-file", str(path), "--output", str(converted)])
    segmentation = PSPNet(layers=50, classes=2).eval()  # as tool/train.py loads initmodel/
    assert load_backbone_weights(segmentation, converted, "TRAIN.pretrained_backbone").clean()
    with torch.no_grad():
        torch.testing.assert_close(network.forward_features(x), reference_features(source, x))
        torch.testing.assert_close(segmentation.layer0(x), reference_stem(source, x))


def test_prepare_from_file_writes_semseg_layout_atomically(tmp_path, capsys):
    state = imagenet_state(50, seed=5)
    path = write_source(state, "encoding", tmp_path / "downloads")
    output = tmp_path / "initmodel" / "resnet50_v2.pth"
    prepare_weights.main(["--layers", "50", "--from-file", str(path), "--output", str(output)])
    written = torch.load(output, weights_only=True)
    assert written.keys() == state.keys() and all(torch.equal(written[k], state[k]) for k in state)
    assert [p.name for p in output.parent.iterdir()] == ["resnet50_v2.pth"]  # no temporary left
    assert f"sha256 {sha256(path)}" in capsys.readouterr().out


def _serve(tmp_path: Path, state: dict, tamper: bool = False) -> tuple[Path, str]:
    """A timm file named with its sha256 prefix (the name of the honest file when tampered)."""
    path = write_source(state, "timm-pth", tmp_path / "site")
    name = f"resnet50s_mirror-{sha256(path)[:8]}.pth"
    if tamper:
        torch.save({**timm_layout(state), "fc.bias": torch.zeros(1000)}, path)
    return path.rename(path.with_name(name)), name


def test_download_from_local_server_is_verified_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    state = imagenet_state(50, seed=6)
    served, name = _serve(tmp_path, state)
    output = tmp_path / "out" / "r50.pth"
    with serve_folder(served.parent) as base:
        prepare_weights.main(["--layers", "50", "--url", f"{base}/{name}", "--output", str(output)])
    cached = tmp_path / "torch" / "hub" / "checkpoints" / name
    assert cached.is_file() and sha256(cached) == sha256(served)
    output.unlink()
    served.unlink()  # the server has gone: the cached copy is used
    prepare_weights.main(["--layers", "50", "--url", f"http://127.0.0.1:9/{name}", "--output", str(output)])
    assert torch.equal(torch.load(output, weights_only=True)["layer4.2.conv3.weight"], state["layer4.2.conv3.weight"])


def test_tampered_download_is_refused_and_leaves_nothing(tmp_path):
    served, name = _serve(tmp_path, imagenet_state(50, seed=7), tamper=True)
    output = tmp_path / "out" / "r50.pth"
    with serve_folder(served.parent) as base:
        out = run_tool("prepare_weights.py", "--layers", "50", "--url", f"{base}/{name}", "--output", str(output),
                       env={"TORCH_HOME": str(tmp_path / "torch")})
    assert_one_line_error(without_progress(out), f"{base}/{name}", "refused and deleted", name.rsplit("-", 1)[1][:8])
    assert list((tmp_path / "torch" / "hub" / "checkpoints").iterdir()) == []
    assert list(output.parent.iterdir()) == []


def test_tampered_cached_copy_is_refused_and_deleted(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    served, name = _serve(tmp_path, imagenet_state(50, seed=8))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(served.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match="refused and deleted"):
        prepare_weights.main(["--layers", "50", "--url", f"http://127.0.0.1:9/{name}",
                              "--output", str(tmp_path / "r50.pth")])
    assert not cached.exists() and not (tmp_path / "r50.pth").exists()


def test_offline_names_every_url_tried_and_the_from_file_route(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    urls = [closed_port_url("gluon_resnet50_v1s-1762acc0.pth"), closed_port_url("a/resnet50s-a75c83cf.zip"),
            closed_port_url("b/resnet50s-a75c83cf.zip")]
    fake = (Source("timm-gluon", 50, (urls[0],), "timm", "sha256-prefix", "1762acc0", "", 78.7, ""),
            Source("encoding", 50, tuple(urls[1:]), "timm", "sha1", "a75c83cf" + "0" * 32, "", None, ""),
            Source("csail", 50, (closed_port_url("resnet50-imagenet.pth"),), "semseg", "none", None, "", None, ""))
    monkeypatch.setattr(imagenet_sources, "SOURCES", fake)
    with pytest.raises(UserError) as error:
        prepare_weights.main(["--layers", "50", "--output", str(tmp_path / "r50.pth")])
    message = str(error.value)
    assert "\n" not in message and all(url in message for url in urls) and "resnet50-imagenet.pth" not in message
    assert "python tool/prepare_weights.py --layers 50 --from-file F" in message
    assert not (tmp_path / "r50.pth").exists()


@pytest.mark.parametrize("layers,name,fragment", [(152, "csail", "source csail has no ResNet-152"),
                                                  (18, None, "no source with a published hash has ResNet-18")])
def test_no_source_for_that_depth_is_one_line(layers, name, fragment, tmp_path):
    argv = ["--layers", str(layers), "--output", str(tmp_path / "x.pth")] + (["--source", name] if name else [])
    with pytest.raises(UserError, match=fragment):
        prepare_weights.main(argv)


def test_offline_mirror_is_one_line_naming_it_and_from_file(tmp_path):
    url = closed_port_url("resnet101s-03a0f310.zip")
    out = run_tool("prepare_weights.py", "--layers", "101", "--url", url, "--output", str(tmp_path / "r.pth"),
                   env={"TORCH_HOME": str(tmp_path / "torch")})
    assert_one_line_error(out, url, "--from-file F")
    assert not (tmp_path / "r.pth").exists()


def _seven_by_seven(tmp_path):
    path = tmp_path / "tv.pth"
    torch.save(build_resnet(18, deep_stem=False).state_dict(), path)
    return path


def _segmentation(tmp_path):
    path = tmp_path / "seg.pth"
    torch.save({"layer0.0.weight": torch.ones(64, 3, 3, 3)}, path)
    return path


def _untrained_bn(tmp_path):
    state = dict(imagenet_state(50))
    state["layer2.1.bn2.running_mean"] = torch.zeros(128)
    state["layer2.1.bn2.running_var"] = torch.ones(128)
    return write_source(state, "csail", tmp_path)


def _missing_tensor(tmp_path):
    state = timm_layout(imagenet_state(50))
    del state["layer3.4.conv2.weight"]
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    return path


def _known_name_wrong_hash(tmp_path):
    return write_source(imagenet_state(50), "timm-pth", tmp_path, "gluon_resnet50_v1s-1762acc0.pth")


@pytest.mark.parametrize("make,fragments", [
    (lambda tmp: write_source(imagenet_state(18), "timm-pth", tmp), ["holds ResNet-18 (timm layout)", "--layers 50"]),
    (_seven_by_seven, ["7x7 stem", "deep 3x3 stem"]),
    (_segmentation, ["segmentation checkpoint", "TRAIN.weight"]),
    (_untrained_bn, ["layer2.1.bn2", "initial statistics"]),
    (_missing_tensor, ["from the timm layout: 1 missing (layer3.4.conv2.weight)", "likely cause"]),
    (_known_name_wrong_hash, ["refused:", "1762acc0"]),
    (lambda tmp: tmp / "absent.pth", ["absent.pth does not exist"]),
])
def test_every_file_mistake_is_one_line_and_writes_nothing(make, fragments, tmp_path):
    """In-process (the one-line printing of a UserError is util.cli.run_main's, shown by the
    command-line tests here); the user's own file is never deleted."""
    path = make(tmp_path)
    output = tmp_path / "out" / "resnet50_v2.pth"
    with pytest.raises(UserError) as error:
        prepare_weights.main(["--layers", "50", "--from-file", str(path), "--output", str(output)])
    assert "\n" not in str(error.value) and all(fragment in str(error.value) for fragment in fragments), error.value
    assert not output.exists() and (path.exists() or path.name == "absent.pth")


def test_list_prints_every_source_url_and_hash(capsys):
    prepare_weights.main(["--list"])
    printed = capsys.readouterr().out
    assert printed == describe_sources() + "\n"
    for source in SOURCES:
        assert all(url in printed for url in source.urls) and (source.digest or "no published hash") in printed


def test_csail_deep_stem_resnet18_converts(tmp_path):
    state18 = imagenet_state(18)
    path = write_source(state18, "csail", tmp_path, "resnet18-imagenet.pth")
    converted = convert_imagenet_weights(read_weight_file(path), 18, path)
    assert converted.keys() == state18.keys() and all(torch.equal(converted[k], state18[k]) for k in state18)


def hub_handler(files: dict):
    """Answers huggingface_hub's HEAD and GET of <endpoint>/<repo>/resolve/main/<file> as the hub does
    (ETag, X-Repo-Commit); 404 for anything else."""
    class Hub(http.server.BaseHTTPRequestHandler):
        def _headers(self) -> bytes | None:
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            if body is not None:
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                self.send_header("X-Repo-Commit", "0" * 40)
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return body

        def do_HEAD(self):
            self._headers()

        def do_GET(self):
            body = self._headers()
            if body is not None:
                self.wfile.write(body)

        def log_message(self, *args):
            pass
    return Hub


def test_hub_copy_is_fetched_by_huggingface_hub_and_converted(tmp_path):
    """--source timm-hub against a stand-in for the hub on 127.0.0.1 (HF_ENDPOINT)."""
    state = imagenet_state(50)
    safetensors = write_source(state, "timm-safetensors", tmp_path / "site")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), hub_handler(
        {"/timm/resnet50s.gluon_in1k/resolve/main/model.safetensors": safetensors.read_bytes()}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    output = tmp_path / "r50.pth"
    try:
        out = run_tool("prepare_weights.py", "--layers", "50", "--source", "timm-hub", "--output", str(output),
                       env={"HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
                            "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"})
    finally:
        server.shutdown()
        server.server_close()
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"sha256 {sha256(safetensors)}" in out.stdout and "top-1 78.70" in out.stdout
    written = torch.load(output, weights_only=True)
    assert written.keys() == state.keys() and all(torch.equal(written[k], state[k]) for k in state)


def test_encoding_zip_is_verified_by_the_sha1_of_the_pth_inside(tmp_path, monkeypatch, capsys):
    """The default route: the first source fails offline, the next (Encoding's zip, checked by its
    published sha1) is fetched from the local server; a zip under a known name whose .pth does not
    match is refused and deleted."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    state = imagenet_state(50)
    site = tmp_path / "site"
    honest = write_source(state, "encoding", site, "resnet50s-honest.zip")
    with zipfile.ZipFile(honest) as archive:
        sha1 = hashlib.sha1(archive.read("resnets.pth")).hexdigest()
    write_source(dict(state, **{"fc.bias": torch.ones(1000)}), "encoding", site, "resnet50s-a75c83cf.zip")
    with serve_folder(site) as base:
        with pytest.raises(CheckpointError, match="refused and deleted: the sha1 of its resnets.pth is not a75c83cf"):
            prepare_weights.main(["--layers", "50", "--url", f"{base}/resnet50s-a75c83cf.zip",
                                  "--output", str(tmp_path / "other.pth")])
        offline = closed_port_url("gluon_resnet50_v1s-1762acc0.pth")
        monkeypatch.setattr(imagenet_sources, "SOURCES", (
            Source("timm-gluon", 50, (offline,), "timm", "sha256-prefix", "1762acc0", "", 78.7, ""),
            Source("encoding", 50, (f"{base}/resnet50s-honest.zip",), "timm", "sha1", sha1, "MIT", None, "")))
        prepare_weights.main(["--layers", "50", "--output", str(tmp_path / "r50.pth")])
    written = torch.load(tmp_path / "r50.pth", weights_only=True)
    assert all(torch.equal(written[k], state[k]) for k in state)
    assert "source encoding (resnet50s-honest.zip)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "torch" / "hub" / "checkpoints").iterdir()) == ["resnet50s-honest.zip"]
    assert not (tmp_path / "other.pth").exists()


def test_mirror_without_hash_is_accepted_unverified_and_never_taken_from_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    first, second = imagenet_state(50), imagenet_state(50, seed=11)
    output = tmp_path / "r50.pth"
    for site, state in enumerate((first, second)):  # two servers, the same file name, other contents
        served = write_source(state, "csail", tmp_path / f"site{site}", "resnet50-imagenet.pth")
        with serve_folder(served.parent) as base:
            prepare_weights.main(["--layers", "50", "--url", f"{base}/resnet50-imagenet.pth", "--output", str(output)])
        assert "is not verified" in capsys.readouterr().out
        assert torch.equal(torch.load(output, weights_only=True)["fc.bias"], state["fc.bias"])
