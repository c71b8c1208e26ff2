"""Static int8 quantization of an exported network with onnxruntime's own tools, checked by its predictions.

quantize_int8 turns the float32 file of util/onnx_model.py into a QDQ int8 file: quant_pre_process
(shape inference and graph clean-up), then quantize_static calibrated on windows cut from images
exactly as util/inference.py cuts them at each test scale (the ranges an int8 network must hold
are those of the windows it will see; flips are left out, a mirror has the same statistics).

The choices, measured on this project's CPUs (docs/deploy.md has the numbers):
- QDQ format, uint8 activations and int8 weights (U8S8), per-channel weights: onnxruntime's
  fastest integer kernels on x86-64. PSPNet-50 at 473 on an AVX2 machine: U8S8 2.0x float32's
  speed, int8 activations (S8S8) 1.45x.
- reduce_range (7-bit weights) where the CPU lacks VNNI: AVX2's u8 x s8 multiply adds pairs into
  16 bits and can saturate with full 8-bit weights; VNNI accumulates in 32 bits and needs no margin.
- MinMax calibration: the quantizer adds a ReduceMin and a ReduceMax per tensor, so each window
  leaves a few numbers per tensor, and hundreds of images fit in memory. (Its
  CalibMaxIntermediateOutputs is not used: onnxruntime 1.32 drops the batches it clears.)
- The classifier (the last convolution) and the final resize stay in float: they are a sliver of
  the time, and quantizing the class scores themselves flips the closest calls between classes.

The check compares predictions, not logits: check_agreement runs the float32 and the int8 file
through the same multi-scale sliding window (util/predictor.py) on held-out images and counts the
pixels whose class agrees, and scores both against the labels when there are any.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx

from util.dataset import SemSegDataset, check_files_exist, read_list_file
from util.errors import DataError
from util.image_io import IMAGE_SUFFIXES, read_image_rgb
from util.inference import image_windows, resize_image, to_network_input
from util.metrics import ConfusionMatrix
from util.onnx_model import session_options
from util.predictor import Predictor

logger = logging.getLogger(__name__)
DEFAULT_CALIBRATION_IMAGES = 300  # OpenVINO's default calibration subset
DEFAULT_CHECK_IMAGES = 100
MIN_AGREEMENT = 0.98  # share of held-out pixels whose int8 class must equal the float32 network's


def cpu_has_vnni() -> bool:
    """Whether the CPU multiplies 8-bit integers into 32-bit sums (AVX-512 VNNI or AVX-VNNI)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False  # not Linux: assume the saturating path and keep the margin
    return "avx512_vnni" in flags or "avx_vnni" in flags


def evenly_spaced(items: Sequence[Any], count: int) -> list[Any]:
    """`count` items spread over the whole sequence (all of them if it is shorter): a list sorted by
    scene or city still gives a sample of every part."""
    if count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def list_split(path: Path) -> str:
    """'test' for a list of images alone, 'val' for `image label` lines (by the first line that has any)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "val"  # read_list_file reports the unreadable file
    first = next((line.split() for line in lines if line.split()), [])
    return "test" if len(first) == 1 else "val"


def list_images(source: Path, data_root: str, option: str, allow_unsafe_paths: bool = False) -> list[str]:
    """The image paths of a list file (paths relative to data_root, `image [label]` per line, read by
    the rules of DATA.allow_unsafe_paths as training reads it) or of a folder (images directly inside,
    sorted). Each mistake is one DataError naming `option`."""
    if source.is_dir():
        images = sorted(str(p) for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"{option} {source}: the folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return images
    if not source.is_file():
        raise DataError(f"{option} {source}: not found (give a list file or a folder of images)")
    try:
        entries = read_list_file(str(source), data_root, list_split(source), allow_unsafe_paths)
        check_files_exist([entry._replace(label_path=None) for entry in entries])
    except DataError as error:
        raise DataError(f"{option}: {error}") from None
    return [entry.image_path for entry in entries]


class WindowReader:
    """onnxruntime's CalibrationDataReader: one sliding window at a time, cut from each image at each
    scale as util/inference.py cuts them. Images are read one by one, as they are needed."""

    def __init__(self, images: Sequence[str], long_sizes: Sequence[int], window: tuple[int, int],
                 stride_rate: float, input_name: str):
        self.images, self.long_sizes, self.window = list(images), list(long_sizes), window
        self.stride_rate, self.input_name = stride_rate, input_name
        self.windows = 0
        self._feed = self._windows()

    def _windows(self) -> Iterator[np.ndarray]:
        for done, path in enumerate(self.images, start=1):
            image = read_image_rgb(path)
            for long_size in self.long_sizes:
                tensor = to_network_input(resize_image(image, long_size), "cpu")
                for window in image_windows(tensor, *self.window, self.stride_rate):
                    self.windows += 1
                    yield window[None].numpy()
            if done % 50 == 0 or done == len(self.images):
                logger.info("calibration: %d/%d images, %d windows", done, len(self.images), self.windows)

    def get_next(self) -> dict[str, np.ndarray] | None:
        window = next(self._feed, None)
        return None if window is None else {self.input_name: window}


def float_nodes(model: onnx.ModelProto) -> list[str]:
    """The nodes from the graph's output back to its last convolution: the final resize of the class
    scores and the classifier that makes them."""
    producer = {output: node for node in model.graph.node for output in node.output}
    nodes, tensor = [], model.graph.output[0].name
    while tensor in producer:
        node = producer[tensor]
        nodes.append(node.name)
        if node.op_type == "Conv":
            return nodes
        tensor = node.input[0]
    return nodes


@contextlib.contextmanager
def onnxruntime_quiet() -> Iterator[None]:
    """The quantizer's advice lines silenced, and onnxruntime's own log below errors. The quantizer
    logs through the root logger itself; a filter on the root logger sees only those records, not
    the ones of named loggers (this module's progress) that propagate to its handlers."""
    import onnxruntime
    root = logging.getLogger()
    def errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    root.addFilter(errors_only)
    onnxruntime.set_default_logger_severity(3)
    try:
        yield
    finally:
        root.removeFilter(errors_only)


@contextlib.contextmanager
def calibration_follows_threads() -> Iterator[None]:
    """onnxruntime's calibrator builds its session with default options (a thread per core, spinning)
    and offers no way to pass others; calibration is the longest step, so for its duration the
    session gets util/onnx_model.py's options, with graph optimisation off as the calibrator wants."""
    import onnxruntime
    from onnxruntime.quantization.calibrate import CalibraterBase
    original = CalibraterBase.create_inference_session

    def create_inference_session(calibrator: CalibraterBase) -> None:
        options = session_options()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        calibrator.infer_session = onnxruntime.InferenceSession(
            calibrator.augmented_model_path, sess_options=options, providers=calibrator.execution_providers)

    CalibraterBase.create_inference_session = create_inference_session
    try:
        yield
    finally:
        CalibraterBase.create_inference_session = original


def quantize_int8(fp32_path: Path, int8_path: Path, reader: Any, calibration: dict[str, Any]) -> dict[str, Any]:
    """Write the static QDQ int8 version of `fp32_path` to `int8_path`, calibrated on the windows of
    `reader` (a WindowReader, or any CalibrationDataReader counting its `windows`), with the float32
    file's metadata plus `precision` and `quantization` (how, and the `calibration` source); return
    the latter."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static
    reduce_range = not cpu_has_vnni()
    fp32 = onnx.load(str(fp32_path), load_external_data=False)
    keep_float = float_nodes(fp32)
    with (tempfile.TemporaryDirectory(prefix=".quantize", dir=int8_path.parent) as folder, onnxruntime_quiet(),
          calibration_follows_threads()):
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(int8_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=keep_float, calibrate_method=CalibrationMethod.MinMax)
    quantization = {"tool": f"onnxruntime {onnxruntime.__version__} quant_pre_process + quantize_static",
                    "format": "QDQ", "activations": "uint8", "weights": "int8, per channel",
                    "reduce_range": reduce_range, "calibration": "MinMax", **calibration,
                    "calibration_windows": reader.windows, "float_nodes": keep_float}
    # The quantizer leaves a key of its own that is not JSON: the float32 file's metadata replaces it.
    recorded = {p.key: json.loads(p.value) for p in fp32.metadata_props}
    set_metadata(int8_path, {**recorded, "precision": "int8", "quantization": quantization})
    return quantization


def check_agreement(fp32: Predictor, int8: Predictor, dataset: SemSegDataset, indices: Sequence[int]
                    ) -> dict[str, Any]:
    """Share of pixels where the two predictors give the same class on the images `indices` of
    `dataset`, and the mIoU of each against the labels when the list has them."""
    same = total = 0
    labelled = dataset.split != "test"
    scores = {name: ConfusionMatrix(dataset.classes, dataset.ignore_label) for name in ("fp32", "int8")}
    for done, index in enumerate(indices, start=1):
        image, label, _ = dataset.load_raw(index)
        predictions = {"fp32": fp32.predict(image), "int8": int8.predict(image)}
        same += int((predictions["fp32"] == predictions["int8"]).sum())
        total += predictions["fp32"].size
        if labelled:
            for name, matrix in scores.items():
                matrix.update_numpy(predictions[name], label)
        if done % 20 == 0 or done == len(indices):
            logger.info("int8 check: %d/%d images, agreement so far %.4f", done, len(indices), same / total)
    result = {"images": len(indices), "pixels": total, "agreement": same / total}
    if labelled:
        result.update({f"miou_{name}": matrix.compute().miou for name, matrix in scores.items()})
    return result


def held_out(dataset: SemSegDataset, calibration: Sequence[str]) -> list[int]:
    """Indices of the dataset's images that were not used for calibration (compared as resolved paths)."""
    used = {os.path.realpath(path) for path in calibration}
    return [i for i, entry in enumerate(dataset.entries) if os.path.realpath(entry.image_path) not in used]


def set_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """Replace the metadata_props of the ONNX file at `path` by `metadata`, each value JSON-encoded."""
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {key: json.dumps(value) for key, value in metadata.items()})
    onnx.save(model, str(path))
