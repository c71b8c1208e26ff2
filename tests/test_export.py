"""ONNX deployment: tool/export.py writes a standard ONNX file whose onnxruntime logits equal
PyTorch's, and tool/test.py, tool/demo.py and the Predictor run it like the checkpoint."""
import copy
import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import onnx
import pytest
import torch

from conftest import REPO_ROOT, assert_one_line_error, run_tool, write_config
from model import build_model
from util.config import load_config
from util.errors import CheckpointError, ConfigError
from util.errors import UserError
from util.onnx_model import OnnxNetwork, export_metadata, export_onnx, max_abs_difference
from util.predictor import Predictor

SCALES = [0.75, 1.0]


def random_model(cfg, seed):
    """An eval-mode network with random weights and random BatchNorm statistics (so they matter)."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tiny_toy, tmp_path_factory):
    """A random PSPNet-18 checkpoint, its config and its export by tool/export.py (33x33 windows)."""
    folder = tmp_path_factory.mktemp("export")
    cfg_path = write_config(folder / "cfg.yaml", tiny_toy, TEST={"model_path": str(folder / "model.pth"),
                                                               "scales": SCALES, "vis_count": 0})
    cfg = load_config(cfg_path)
    model = random_model(cfg, 0)
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               folder / "model.pth")
    # --output after an override: the overrides must not swallow the tool's own options
    out = run_tool("export.py", f"--config={cfg_path}", "TEST.vis_count", "0", "--output", str(folder / "model.onnx"))
    assert out.returncode == 0, out.stderr[-3000:]
    return {"folder": folder, "cfg": cfg_path, "model": model, "onnx": folder / "model.onnx", "log": out.stdout}


def test_export_writes_standard_onnx_with_metadata_and_checks_it(exported, tiny_toy):
    proto = onnx.load(str(exported["onnx"]))
    onnx.checker.check_model(proto)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 18)]
    assert {node.domain for node in proto.graph.node} == {""} and not proto.functions  # no custom ops
    (image,), (logits,) = proto.graph.input, proto.graph.output
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert image.name == "image" and dims == ["batch", 3, 33, 33] and logits.name == "logits"
    metadata = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert metadata["classes"] == 6 and metadata["window"] == [33, 33] and metadata["scales"] == SCALES
    assert metadata["class_names"] == (tiny_toy / "toy_names.txt").read_text().split()
    assert len(metadata["class_colors"]) == 6 and len(metadata["mean"]) == len(metadata["std"]) == 3
    assert "max abs logit difference" in exported["log"] and not list(exported["folder"].glob(".*tmp*"))
    assert f"run it with TEST.onnx_path {exported['onnx']} TEST.test_h 33 TEST.test_w 33" in exported["log"]
    network = OnnxNetwork(exported["onnx"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 33, 33, generator=torch.Generator().manual_seed(batch))
        assert max_abs_difference(exported["model"], network, x) <= 1e-4


PSA_VARIANTS = [(0, False, 2), (0, True, 1), (1, False, 1), (1, True, 2), (2, False, 2), (2, True, 2)]


@pytest.mark.parametrize("psa_type, compact, shrink_factor", PSA_VARIANTS)
def test_psanet_exports_and_onnxruntime_equals_pytorch(tiny_toy, tmp_path, psa_type, compact, shrink_factor):
    """Every PSA branch type, compact or not, with and without shrinking; also checks that exporting
    leaves psa_mask's index cache usable by eager calls (PyTorch runs after the export here)."""
    cfg = load_config(write_config(tmp_path / "cfg.yaml", tiny_toy, TRAIN={
        "arch": "psa", "psa_type": psa_type, "compact": compact, "shrink_factor": shrink_factor}))
    model = random_model(cfg, psa_type)
    path = tmp_path / "psanet.onnx"
    export_onnx(model, path, torch.randn(2, 3, 33, 33), export_metadata(cfg, list("abcdef"), None, "test"))
    network = OnnxNetwork(path)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 33, 33, generator=torch.Generator().manual_seed(batch))
        assert max_abs_difference(model, network, x) <= 1e-4
    assert max_abs_difference(random_model(cfg, 99), network, x) > 1e-3  # the check can fail


def gray(folder, name):
    return cv2.imread(str(folder / "gray" / f"{name}.png"), cv2.IMREAD_UNCHANGED)


def test_test_py_and_demo_with_the_onnx_file_equal_the_checkpoint(exported, tiny_toy):
    folder, cfg = exported["folder"], exported["cfg"]
    results = {}
    for kind, extra in (("pth", []), ("onnx", ["TEST.onnx_path", str(exported["onnx"])])):
        out = run_tool("test.py", f"--config={cfg}", "TEST.save_folder", str(folder / kind), *extra)
        assert out.returncode == 0, out.stderr[-3000:]
        results[kind] = json.loads((folder / kind / "metrics.json").read_text())
    assert "in onnxruntime" in out.stdout and results["onnx"]["onnx_path"] == str(exported["onnx"])
    assert results["onnx"]["model_path"] is None and results["onnx"]["network"].endswith("(ONNX, in onnxruntime)")
    assert results["pth"]["onnx_path"] is None and results["pth"]["network"] == results["pth"]["model_path"]
    assert round(results["onnx"]["mIoU"], 3) == round(results["pth"]["mIoU"], 3)
    names = [p.stem for p in (folder / "pth" / "gray").glob("*.png")]
    same = sum(int((gray(folder / "pth", n) == gray(folder / "onnx", n)).sum()) for n in names)
    total = sum(gray(folder / "pth", n).size for n in names)
    assert len(names) == 8 and same / total >= 0.999
    assert len(np.unique(np.concatenate([gray(folder / "pth", n).ravel() for n in names]))) >= 2  # not one class

    image = tiny_toy / "images" / "val" / f"{names[0]}.jpg"
    demo_folder = folder / "demo"  # TEST.save_folder/demo, the checkpoint demo's folder
    out = run_tool("demo.py", f"--config={cfg}", "TEST.save_folder", str(folder), "TEST.onnx_path", str(exported["onnx"]),
                   f"--image={image}")
    assert out.returncode == 0, out.stderr[-3000:]
    demo = cv2.imread(str(demo_folder / "model.onnx" / f"{names[0]}_gray.png"), cv2.IMREAD_UNCHANGED)
    assert (demo == gray(folder / "onnx", names[0])).all()
    assert not list(demo_folder.glob("*.png"))  # where the next checkpoint demo writes


def test_predictor_from_onnx_and_from_config_on_an_image(exported, tiny_toy):
    image = tiny_toy / "images" / "val" / "toy_val_00002.jpg"
    h, w = cv2.imread(str(image)).shape[:2]
    assert Predictor.from_onnx(exported["onnx"]).scales == SCALES  # settings from the file's metadata
    from_onnx = Predictor.from_onnx(exported["onnx"], scales=[1.0])  # ... unless given
    assert from_onnx.window == (33, 33) and from_onnx.classes == 6 and from_onnx.scales == [1.0]
    labels, probs = from_onnx.predict(str(image), probabilities=True)
    assert labels.shape == (h, w) and labels.dtype == np.uint8 and probs.shape == (6, h, w)
    assert np.allclose(probs.sum(0), 1, atol=1e-5) and (labels == probs.argmax(0)).all()
    checkpoint = Predictor.from_config(exported["cfg"], ["TEST.scales", "[1.0]"], device="cpu")
    torch_labels, torch_probs = checkpoint.predict(str(image), probabilities=True)
    assert np.abs(torch_probs - probs).max() < 1e-4 and (torch_labels == labels).mean() >= 0.999


def test_onnx_files_that_do_not_fit_are_refused(exported, tmp_path):
    cfg = load_config(exported["cfg"])
    for key, value, fragment in (("onnx_path", str(exported["folder"] / "model.pth"),
                                  "is a PyTorch checkpoint, not an ONNX file; evaluate it with TEST.model_path"),
                                 ("onnx_path", str(exported["cfg"]), "is not a loadable ONNX"),
                                 ("onnx_path", str(tmp_path / "none.onnx"), "TEST.onnx_path: file not found"),
                                 ("test_h", 41, "takes 33x33 windows")):
        cfg.onnx_path = str(exported["onnx"])
        setattr(cfg, key, value)
        with pytest.raises((CheckpointError, ConfigError), match=fragment):
            Predictor.from_config(cfg)
    foreign = tmp_path / "identity.onnx"
    value = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [value],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])), str(foreign))
    with pytest.raises(CheckpointError, match="not written by tool/export.py"):
        Predictor.from_onnx(foreign)


@pytest.mark.parametrize("overrides, fragments", [
    (["TRAIN.arch", "psa"], ["TEST.model_path", "does not fit the model"]),  # a checkpoint of another architecture
    (["TEST.test_h", "40"], ["TEST.test_h", "8k+1"]),
    (["TEST.model_path", "{onnx}"], ["TEST.model_path", "is not a PyTorch checkpoint", "runs through TEST.onnx_path"]),
])
def test_export_refuses_bad_input_with_one_line(exported, tmp_path, overrides, fragments):
    overrides = [value.format(onnx=exported["onnx"]) for value in overrides]
    out = run_tool("export.py", f"--config={exported['cfg']}", "--output", str(tmp_path / "x.onnx"), *overrides)
    assert_one_line_error(out, *fragments)
    assert not list(tmp_path.iterdir())


def test_a_checkpoint_given_as_the_onnx_file_is_one_line_pointing_at_model_path(exported):
    out = run_tool("test.py", f"--config={exported['cfg']}", "TEST.onnx_path", str(exported["folder"] / "model.pth"))
    assert_one_line_error(out, "TEST.onnx_path", "is a PyTorch checkpoint", "TEST.model_path")


@pytest.mark.parametrize("weights, message", [
    ("other", r"onnxruntime differs from PyTorch by .* \(more than 1e-03\)"),
    ("nan", r"the logits are not finite \(NaN or inf; a diverged checkpoint\?\)"),
])
def test_export_refuses_a_file_that_differs_from_pytorch(exported, tmp_path, monkeypatch, weights, message):
    """The exporter is replaced by a copy of another network's export, and the checkpoint is another
    network or one with NaN weights (whose difference is NaN, which no comparison exceeds): the
    onnxruntime check must fail, write nothing under --output and keep the file as .unverified.onnx."""
    from tool import export as export_tool
    cfg = load_config(exported["cfg"])
    model = random_model(cfg, 1)
    if weights == "nan":
        model = copy.deepcopy(exported["model"])  # the export's own weights, one of them NaN
        with torch.no_grad():
            model.cls[4].weight[0, 0] = float("nan")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "other.pth")
    monkeypatch.setattr(export_tool, "export_onnx", lambda model, path, *_: shutil.copy(exported["onnx"], path))
    monkeypatch.setattr(export_tool, "setup_logging", lambda *args: None)
    monkeypatch.setattr(sys, "argv", ["export.py", f"--config={exported['cfg']}", "TEST.model_path",
                                      str(tmp_path / "other.pth"), "--output", str(tmp_path / "x.onnx")])
    with pytest.raises(UserError, match="export check failed: " + message):
        export_tool.main()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.pth", "x.unverified.onnx"]


def test_a_non_square_window_is_recorded_as_height_by_width(tiny_toy, tmp_path, exported):
    """33 high, 41 wide: the file's metadata, its input and Predictor.from_config agree with the config,
    and the export predicts as the checkpoint does."""
    cfg = load_config(write_config(tmp_path / "cfg.yaml", tiny_toy, TEST={
        "test_h": 33, "test_w": 41, "scales": [1.0], "model_path": str(exported["folder"] / "model.pth")}))
    path = tmp_path / "wide.onnx"
    export_onnx(exported["model"], path, torch.randn(1, 3, 33, 41), export_metadata(cfg, list("abcdef"), None, "t"))
    proto = onnx.load(str(path))
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim][2:] == [33, 41]
    assert json.loads({p.key: p.value for p in proto.metadata_props}["window"]) == [33, 41]
    assert OnnxNetwork(path).window == (33, 41)
    image = str(tiny_toy / "images" / "val" / "toy_val_00001.jpg")
    cfg.onnx_path = str(path)
    from_onnx = Predictor.from_config(cfg).predict(image)  # refused if the window read back were 41x33
    cfg.onnx_path = ""
    assert (Predictor.from_config(cfg, device="cpu").predict(image) == from_onnx).mean() >= 0.999


def test_predictor_from_another_project_reports_a_wrong_file_in_one_line(exported, tmp_path):
    """The README's recipe: a script elsewhere adds the repository to sys.path; each mistake is a
    UserError whose message is one line naming the file or the array."""
    script = tmp_path / "segment.py"
    script.write_text(f"""import sys
sys.path.insert(0, {str(REPO_ROOT)!r})
import numpy as np
from util.errors import UserError
from util.predictor import Predictor
calls = [lambda: Predictor.from_onnx({str(exported["folder"] / "model.pth")!r}),
         lambda: Predictor.from_onnx("missing.onnx"),
         lambda: Predictor.from_onnx({str(exported["onnx"])!r}).predict("missing.jpg"),
         lambda: Predictor.from_onnx({str(exported["onnx"])!r}).predict(np.zeros((8, 8)))]
for call in calls:
    try:
        call()
    except UserError as error:
        print(repr(str(error)))
""")
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    messages = [eval(line) for line in out.stdout.splitlines()]
    assert len(messages) == 4 and all("\n" not in m for m in messages), messages
    for message, fragment in zip(messages, ["model.pth is a PyTorch checkpoint", "missing.onnx", "missing.jpg",
                                            "shape (8, 8)"]):
        assert fragment in message, message
