"""ONNX export of a segmentation network, and an onnxruntime-backed stand-in for the network.

export_onnx writes the eval-mode network with torch.onnx's dynamo-based exporter (the TorchScript
exporter cannot export PSPNet's adaptive average pooling at sizes that do not divide evenly): a
standard opset with no custom domains, input `image` (N, 3, H, W) float32 normalised as
util/inference.py feeds the network, with a dynamic batch N, and output `logits` (N, classes, h, w).
Everything a consumer needs besides the graph (classes, window, mean/std, class names and colours,
the test settings) goes into the file's metadata_props, each value JSON-encoded; an int8 file
(util/quantize.py) adds its precision, how it was quantized and what it was checked against.

OnnxNetwork loads such a file in onnxruntime (CPU) and is called like the PyTorch network: a torch
batch in, torch logits out on the batch's device, so the sliding-window code runs it unchanged.
onnx, onnxscript and onnxruntime are imported only when used, so checkpoints work without them.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from model.weights import LEGACY_PICKLE_START, ZIP_MAGIC
from util.errors import CheckpointError, UserError
from util.transform import MEAN, STD

OPSET = 18
INPUT, OUTPUT = "image", "logits"
TOLERANCE = 1e-3  # largest max abs logit difference between onnxruntime and PyTorch that export accepts
REQUIRED_METADATA = ("classes", "window", "mean", "std", "class_names")
logger = logging.getLogger(__name__)


def export_metadata(cfg: Any, names: list[str], colors: list[list[int]] | None, source: str) -> dict[str, Any]:
    """What a consumer of the exported file needs besides the graph, from the test config."""
    return {"classes": cfg.classes, "window": [cfg.test_h, cfg.test_w], "mean": list(MEAN), "std": list(STD),
            "class_names": names, "class_colors": colors, "arch": cfg.arch, "layers": cfg.layers,
            "input": f"{INPUT}: float32 N x 3 x {cfg.test_h} x {cfg.test_w}, RGB, (pixel 0..255 - mean) / std",
            "output": f"{OUTPUT}: float32 N x {cfg.classes} x h x w class scores (softmax -> probabilities)",
            "base_size": cfg.base_size, "scales": cfg.scales, "flip": cfg.flip, "stride_rate": cfg.stride_rate,
            "source": source}


def export_onnx(model: torch.nn.Module, path: str | Path, sample: torch.Tensor, metadata: dict[str, Any]) -> None:
    """Write the eval-mode `model` as ONNX for inputs shaped like `sample` with any batch size."""
    if importlib.util.find_spec("onnxscript") is None:  # torch.onnx's dynamo exporter needs it (and onnx)
        raise UserError("ONNX export needs the onnx and onnxscript packages: pip install -r requirements.txt")
    for name in ("torch.onnx", "onnxscript", "onnx_ir"):  # their INFO lines describe graph rewrites, not progress
        logging.getLogger(name).setLevel(logging.ERROR)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not the user's business
        program = torch.onnx.export(model.eval(), (sample,), dynamo=True, opset_version=OPSET, verbose=False,
                                    input_names=[INPUT], output_names=[OUTPUT], dynamic_shapes=({0: batch},))
    program.model.metadata_props.update({key: json.dumps(value) for key, value in metadata.items()})
    program.save(str(path))


def session_options(threads: int = 0) -> Any:
    """onnxruntime session options that follow util/threads.py: as many threads as PyTorch has
    (`threads` overrides), errors-only logging, and no spinning: idle onnxruntime threads spin by
    default, taking the cores from the work between windows."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxNetwork:
    """An exported network in onnxruntime, called like the PyTorch one; `metadata` holds export_metadata."""

    def __init__(self, path: str | Path, config_key: str = "TEST.onnx_path", threads: int = 0):
        try:
            import onnxruntime
        except ImportError:
            raise UserError(f"{config_key}: running an ONNX file needs onnxruntime; "
                            f"pip install -r requirements.txt") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{config_key}: file not found: {self.path}")
        with open(self.path, "rb") as f:
            if f.read(len(ZIP_MAGIC)) in (ZIP_MAGIC, LEGACY_PICKLE_START):
                raise CheckpointError(f"{config_key}: {self.path} is a PyTorch checkpoint, not an ONNX file; evaluate "
                                      f"it with TEST.model_path {self.path}, or export it with tool/export.py")
        options = session_options(threads)
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for unreadable files
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"{config_key}: {self.path} is not a loadable ONNX model ({first})") from None
        self.metadata = read_metadata(self.session.get_modelmeta().custom_metadata_map, self.path, config_key)
        self.input_name = self.session.get_inputs()[0].name
        logger.info("onnxruntime runs %s: %s, %d thread(s)", self.path, self.precision, options.intra_op_num_threads)

    @property
    def precision(self) -> str:
        """float32, or int8 for a file quantized by tool/export.py --int8 (with how it was checked)."""
        if self.metadata.get("precision") != "int8":
            return "float32"
        check = self.metadata.get("check")
        return "int8 (static QDQ)" + (f"; {100 * check['agreement']:.2f}% of the pixels of {check['images']} held-out "
                                      f"images agreed with float32" if check else "")

    @property
    def classes(self) -> int:
        return self.metadata["classes"]

    @property
    def window(self) -> tuple[int, int]:
        return tuple(self.metadata["window"])

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        logits = self.session.run(None, {self.input_name: array})[0]
        return torch.from_numpy(logits).to(batch.device)


def read_metadata(properties: dict[str, str], path: Path, config_key: str) -> dict[str, Any]:
    """The JSON-decoded metadata of an exported file; a file not written by tool/export.py is refused."""
    missing = [key for key in REQUIRED_METADATA if key not in properties]
    if missing:
        raise CheckpointError(f"{config_key}: {path} lacks the metadata {', '.join(missing)}: "
                              f"it was not written by tool/export.py; export the checkpoint with it")
    try:
        metadata = {key: json.loads(value) for key, value in properties.items()}
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_key}: {path} has unreadable metadata ({error})") from None
    if list(metadata["mean"]) != list(MEAN) or list(metadata["std"]) != list(STD):
        raise CheckpointError(f"{config_key}: {path} expects mean {metadata['mean']} and std {metadata['std']}; "
                              f"this pipeline normalises with {list(MEAN)} and {list(STD)}")
    return metadata


@torch.no_grad()
def max_abs_difference(model: torch.nn.Module, network: OnnxNetwork, batch: torch.Tensor) -> float:
    """Largest absolute logit difference between the PyTorch model and its exported network on `batch`."""
    return (model.eval()(batch) - network(batch)).abs().max().item()
