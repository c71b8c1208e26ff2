"""Segment images with a trained network, from a checkpoint or an exported ONNX file.

    from util.predictor import Predictor
    predictor = Predictor.from_config("config/toy/toy_pspnet18.yaml", ["TEST.model_path", "model.pth"])
    labels = predictor.predict("photo.jpg")                     # H x W uint8 class ids
    labels, probs = predictor.predict(image, probabilities=True)  # RGB array in, (classes, H, W) float32 too
    labels = Predictor.from_onnx("model.onnx").predict("photo.jpg")

Either way the image goes through util/inference.py: multi-scale sliding window with flip, the
same code as tool/test.py (which uses this class), so a checkpoint and its export predict alike.
from_onnx takes its window, classes and test settings from the file's metadata (tool/export.py
writes them); keyword arguments override the settings.

From another project, put this repository on the path first (sys.path.insert(0, "/path/to/semseg")
or PYTHONPATH=/path/to/semseg). A wrong file or image raises a util.errors.UserError whose message
is one line naming it; catch it to report that line instead of a traceback.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from model import load_eval_model
from util.config import Config, load_config
from util.errors import ConfigError, DataError
from util.image_io import read_image_rgb
from util.inference import multi_scale_predict, resize_image
from util.onnx_model import OnnxNetwork


class Predictor:
    """A network (PyTorch module or OnnxNetwork) with the settings of multi-scale sliding-window inference."""

    def __init__(self, network: Callable[[torch.Tensor], torch.Tensor], classes: int, window: Sequence[int],
                 base_size: int, scales: Sequence[float] = (1.0,), flip: bool = True, stride_rate: float = 2 / 3,
                 batch_size: int = 0, device: torch.device | str = "cpu", channels_last: bool = False,
                 amp: str = "off"):
        self.network, self.classes, self.window = network, classes, tuple(window)
        self.base_size, self.scales, self.flip, self.stride_rate = base_size, list(scales), flip, stride_rate
        self.batch_size, self.device = batch_size, torch.device(device)
        self.channels_last, self.amp = channels_last, amp

    @classmethod
    def from_config(cls, config: Config | str | Path, overrides: list[str] | None = None,
                    device: torch.device | str | None = None) -> "Predictor":
        """The network of TEST.onnx_path when set, else of the checkpoint TEST.model_path, with the TEST
        settings of `config`: a loaded Config, or a YAML path read with `overrides` (`SECTION.key value` ...)."""
        cfg = config if isinstance(config, Config) else load_config(config, overrides)
        settings = dict(base_size=cfg.base_size, scales=cfg.scales, flip=cfg.flip, stride_rate=cfg.stride_rate,
                        batch_size=cfg.test_batch_size)
        if cfg.onnx_path:
            network = OnnxNetwork(cfg.onnx_path)
            check_onnx_fits(network, cfg)
            return cls(network, cfg.classes, network.window, device=device or "cpu", **settings)
        if not cfg.model_path:
            raise ConfigError("TEST.model_path is not set: inference needs a checkpoint, or an ONNX file in "
                              "TEST.onnx_path (tool/test.py can also re-score saved PNGs: TEST.has_prediction True)")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(load_eval_model(cfg, device), cfg.classes, (cfg.test_h, cfg.test_w), device=device,
                   channels_last=cfg.channels_last, amp=cfg.test_amp, **settings)

    @classmethod
    def from_onnx(cls, path: str | Path, **settings: Any) -> "Predictor":
        """An exported file with the test settings recorded in it; keyword arguments override them."""
        network = OnnxNetwork(path, config_key="Predictor.from_onnx")
        recorded = {key: network.metadata[key] for key in ("base_size", "scales", "flip", "stride_rate")
                    if key in network.metadata}
        return cls(network, network.classes, network.window, **{"base_size": max(network.window), **recorded,
                                                                 **settings})

    @property
    def long_sizes(self) -> list[int]:
        """The image's long side at each scale (tool/test.py resizes in its data workers)."""
        return [round(s * self.base_size) for s in self.scales]

    def scaled_probabilities(self, scaled_images: list[np.ndarray | torch.Tensor],
                             out_size: tuple[int, int]) -> torch.Tensor:
        """(classes, H, W) probabilities on the device from the image already resized to long_sizes."""
        return multi_scale_predict(self.network, scaled_images, out_size, self.classes, *self.window,
                                   self.stride_rate, self.flip, self.batch_size, self.device,
                                   channels_last=self.channels_last, amp=self.amp)

    def probabilities(self, image: np.ndarray) -> torch.Tensor:
        """(classes, H, W) probabilities on the device of one float RGB H x W x 3 image (0..255)."""
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 3 or image.shape[2] != 3:
            raise DataError(f"Predictor: expected an RGB image, an H x W x 3 array (values 0..255) or an image "
                            f"file, got an array of shape {image.shape}")
        return self.scaled_probabilities([resize_image(image, s) for s in self.long_sizes], image.shape[:2])

    def predict(self, image: np.ndarray | str | Path, probabilities: bool = False
                ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """H x W uint8 class ids of an RGB image (array or file); with probabilities, also (classes, H, W)."""
        if isinstance(image, (str, Path)):
            image = read_image_rgb(str(image))
        probs = self.probabilities(image)
        labels = probs.argmax(0).to(torch.uint8).cpu().numpy()
        return (labels, probs.cpu().numpy()) if probabilities else labels


def check_onnx_fits(network: OnnxNetwork, cfg: Config) -> None:
    """The exported file must match the config's classes and window, and runs in float32 only."""
    if network.classes != cfg.classes:
        raise ConfigError(f"TEST.onnx_path: {network.path} predicts {network.classes} classes but DATA.classes "
                          f"is {cfg.classes}")
    if network.window != (cfg.test_h, cfg.test_w):
        h, w = network.window
        raise ConfigError(f"TEST.onnx_path: {network.path} takes {h}x{w} windows but TEST.test_h x test_w is "
                          f"{cfg.test_h}x{cfg.test_w}; set TEST.test_h {h} TEST.test_w {w} or export again")
    if cfg.test_amp != "off":
        raise ConfigError(f"TEST.test_amp is {cfg.test_amp} ({cfg.source('test_amp')}); an ONNX file runs in "
                          f"float32: set it to off")
