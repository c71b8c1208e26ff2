"""tool/export.py --int8 (util/quantize.py): the int8 file of a small trained network passes its own
prediction check, records how it was made and checked, and runs through tool/test.py, tool/demo.py
(image and video) and the Predictor; a network whose int8 predictions agree too little with float32
is refused with nothing left behind; each mistake in the calibration source is one line.

To stay quick, the float32 export is made once in-process and tool/export.py's main runs with its
exporter replaced by a copy of that file (test_export.py covers the exporter itself)."""
import json
import shutil
import sys

import cv2
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from conftest import run_tool, write_config
from model import build_model
from util.config import load_config
from util.dataset import dataset_from_config
from util.errors import DataError, UserError
from util.inference import to_network_input
from util.onnx_model import export_metadata, export_onnx
from util.palette import read_colors
from util.predictor import Predictor
from util.quantize import evenly_spaced, float_nodes, list_images, quantize_int8
from util.video import VideoReader, segment_video

CROP = 33


def fitted_model(cfg, steps: int = 40):
    """A layers-18 PSPNet fitted for a few dozen steps on the tiny toy images: confident enough that 8-bit
    rounding flips few pixels (a random network's class scores are near ties everywhere)."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    dataset = dataset_from_config(cfg, cfg.train_list, "train")
    samples = [dataset.load_raw(i)[:2] for i in range(len(dataset))]
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        crops, targets = [], []
        for image, label in (samples[i] for i in rng.choice(len(samples), 4)):
            y, x = rng.integers(0, image.shape[0] - CROP + 1), rng.integers(0, image.shape[1] - CROP + 1)
            crops.append(to_network_input(image[y:y + CROP, x:x + CROP], "cpu"))
            targets.append(torch.from_numpy(label[y:y + CROP, x:x + CROP].astype(np.int64)))
        loss = F.cross_entropy(model(torch.stack(crops)), torch.stack(targets), ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def run_export(monkeypatch, fp32, *args):
    """tool/export.py's main with `args`, its exporter writing a copy of the float32 file `fp32`."""
    from tool import export as export_tool
    monkeypatch.setattr(export_tool, "export_onnx", lambda model, path, *_: shutil.copy(fp32, path))
    monkeypatch.setattr(export_tool, "setup_logging", lambda *_: None)
    monkeypatch.setattr(sys, "argv", ["export.py", *args])
    export_tool.main()


@pytest.fixture(scope="module")
def int8(tiny_toy, tmp_path_factory):
    """A fitted checkpoint, its float32 export and its int8 export by tool/export.py --int8."""
    folder = tmp_path_factory.mktemp("int8")
    cfg_path = write_config(folder / "cfg.yaml", tiny_toy, TEST={"model_path": str(folder / "model.pth"),
                                                               "scales": [1.0], "vis_count": 0})
    cfg = load_config(cfg_path)
    model = fitted_model(cfg)
    torch.save({"state_dict": model.state_dict()}, folder / "model.pth")
    fp32 = folder / "fp32" / "model.onnx"
    fp32.parent.mkdir()
    names = (tiny_toy / "toy_names.txt").read_text().split()
    export_onnx(model, fp32, torch.randn(2, 3, CROP, CROP), export_metadata(cfg, names, None, str(folder)))
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_export(monkeypatch, fp32, f"--config={cfg_path}", "--output", str(folder / "model.int8.onnx"), "--int8",
                   "--calibration-images", "8")
    return {"folder": folder, "cfg": cfg_path, "fp32": fp32, "onnx": folder / "model.int8.onnx"}


def test_int8_file_is_qdq_with_a_float_classifier_and_records_its_check(int8, tiny_toy):
    proto = onnx.load(str(int8["onnx"]))
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    metadata = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert metadata["precision"] == "int8" and metadata["classes"] == 6 and metadata["window"] == [CROP, CROP]
    quantization, check = metadata["quantization"], metadata["check"]
    assert quantization["format"] == "QDQ" and quantization["calibration_images"] == 8
    assert quantization["calibration_windows"] >= 8 and quantization["float_nodes"] == float_nodes(proto)
    assert check["images"] == 8 and check["list"] == str(tiny_toy / "val.txt")  # held out: val, not train
    assert check["agreement"] >= check["min_agreement"] == 0.98
    assert abs(check["miou_int8"] - check["miou_fp32"]) < 0.05
    # the classifier keeps float weights, and its scores reach the final resize without rounding
    nodes = {node.name: node for node in proto.graph.node}
    resize, classifier = (nodes[name] for name in quantization["float_nodes"])
    weights = {tensor.name: tensor for tensor in proto.graph.initializer}[classifier.input[1]]
    assert classifier.op_type == "Conv" and weights.data_type == onnx.TensorProto.FLOAT
    assert resize.op_type == "Resize" and resize.input[0] == classifier.output[0]
    assert sorted(p.name for p in int8["folder"].iterdir()) == ["cfg.yaml", "fp32", "model.int8.onnx", "model.pth"]


def test_int8_file_runs_through_test_demo_video_and_predictor(int8, tiny_toy, tmp_path):
    out = run_tool("test.py", f"--config={int8['cfg']}", "TEST.onnx_path", str(int8["onnx"]),
                   "TEST.save_folder", str(tmp_path / "test"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "int8 (static QDQ" in out.stdout and json.loads((tmp_path / "test" / "metrics.json").read_text())["mIoU"] > 0
    image = tiny_toy / "images" / "val" / "toy_val_00003.jpg"
    out = run_tool("demo.py", f"--config={int8['cfg']}", "TEST.onnx_path", str(int8["onnx"]), f"--image={image}",
                   "--output", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr[-3000:]
    demo = cv2.imread(str(tmp_path / "demo" / "toy_val_00003_gray.png"), cv2.IMREAD_UNCHANGED)
    predictor = Predictor.from_onnx(int8["onnx"])
    assert predictor.network.precision.startswith("int8") and (predictor.predict(str(image)) == demo).all()
    fp32 = Predictor.from_onnx(int8["fp32"]).predict(str(image))
    assert (fp32 == demo).mean() >= 0.95

    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for _ in range(2):
        writer.write(cv2.resize(cv2.imread(str(image)), (64, 48)))
    writer.release()
    colors = read_colors(str(tiny_toy / "toy_colors.txt"), 6)
    overlay, _ = segment_video(predictor, VideoReader(clip), tmp_path / "video", colors, save_labels=True)
    assert overlay.is_file() and len(list((tmp_path / "video" / "clip_frames").iterdir())) == 2


def two_conv_onnx(path):
    """input -> Conv -> Relu -> Conv -> output, 3 -> 4 -> 2 channels: the first conv gets quantized."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w1", (4, 3, 3, 3)), ("w2", (2, 4, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "two_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_calibration_session_follows_the_thread_plan(tmp_path, monkeypatch):
    """onnxruntime's calibrator would take a thread per core and spin; it gets PyTorch's thread count."""
    import onnxruntime
    opened = []
    real_session = onnxruntime.InferenceSession

    def recording_session(path, sess_options=None, *args, **kwargs):
        opened.append((sess_options.intra_op_num_threads,
                       sess_options.get_session_config_entry("session.intra_op.allow_spinning")))
        return real_session(path, sess_options, *args, **kwargs)

    class Reader:
        windows = 2
        feed = iter([{"x": np.random.default_rng(i).standard_normal((1, 3, 8, 8)).astype(np.float32)}
                     for i in range(2)])

        def get_next(self):
            return next(self.feed, None)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording_session)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        quantization = quantize_int8(two_conv_onnx(tmp_path / "fp32.onnx"), tmp_path / "int8.onnx", Reader(), {})
    finally:
        torch.set_num_threads(threads)
    assert quantization["float_nodes"] == ["conv2"] and opened and set(opened) == {(1, "0")}, opened
    assert any(node.op_type == "QuantizeLinear" for node in onnx.load(str(tmp_path / "int8.onnx")).graph.node)


def test_int8_below_the_agreement_threshold_is_refused_and_nothing_is_left(int8, tmp_path, monkeypatch):
    """A demand of full agreement: 8-bit rounding always flips some of a small network's pixels."""
    output = tmp_path / "out" / "x.int8.onnx"
    output.parent.mkdir()
    with pytest.raises(UserError, match=r"int8 check failed: .*% of the pixels of 8 held-out images agree with "
                                        r"float32, below --min-agreement 1.0; .*x.int8.onnx was not written"):
        run_export(monkeypatch, int8["fp32"], f"--config={int8['cfg']}", "--output", str(output), "--int8",
                   "--calibration-images", "4", "--min-agreement", "1.0")
    assert not any(output.parent.iterdir())


def unreadable_folder(folder):
    folder.mkdir()
    (folder / "broken.jpg").write_text("not an image")
    return folder


@pytest.mark.parametrize("case, fragments", [
    ("missing", ["--calibration", "nothing.txt: not found"]),
    ("empty", ["--calibration", "empty.txt: contains no samples"]),
    ("no images", ["--calibration", "holds no images"]),
    ("listed missing", ["--calibration", "1 listed files not found", "gone.jpg"]),
    ("unreadable", ["broken.jpg", "cannot be decoded"]),
])
def test_calibration_mistakes_are_one_line_and_leave_nothing(case, fragments, int8, tmp_path, monkeypatch):
    source = {"missing": lambda: tmp_path / "nothing.txt",
              "empty": lambda: (tmp_path / "empty.txt").write_text("\n") and tmp_path / "empty.txt",
              "no images": lambda: (tmp_path / "folder").mkdir() or tmp_path / "folder",
              "listed missing": lambda: (tmp_path / "l.txt").write_text("images/gone.jpg\n") and tmp_path / "l.txt",
              "unreadable": lambda: unreadable_folder(tmp_path / "broken")}[case]()
    output = tmp_path / "out" / "x.int8.onnx"
    output.parent.mkdir()
    with pytest.raises(DataError) as raised:
        run_export(monkeypatch, int8["fp32"], f"--config={int8['cfg']}", "--output", str(output), "--int8",
                   "--calibration", str(source))
    message = str(raised.value)
    assert "\n" not in message and all(fragment in message for fragment in fragments), message
    assert not any(output.parent.iterdir())


def test_calibration_images_are_spread_over_the_source(tiny_toy):
    assert evenly_spaced(list(range(10)), 4) == [0, 2, 5, 7] and evenly_spaced([1, 2], 5) == [1, 2]
    folder = list_images(tiny_toy / "images" / "val", str(tiny_toy), "--calibration")
    listed = list_images(tiny_toy / "val.txt", str(tiny_toy), "--calibration")
    assert len(folder) == len(listed) == 8 and sorted(folder) == sorted(listed)


def test_calibration_lists_follow_data_allow_unsafe_paths_as_training_does(tiny_toy, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("".join(f"{tiny_toy / line}\n" for line in (tiny_toy / "val.txt").read_text().split()[::2]))
    with pytest.raises(DataError, match="--calibration: .*DATA.allow_unsafe_paths True"):
        list_images(outside, str(tmp_path), "--calibration")
    assert len(list_images(outside, str(tmp_path), "--calibration", allow_unsafe_paths=True)) == 8
