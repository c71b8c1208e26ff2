"""CUDA code paths: psa_mask, SyncBatchNorm, AMP training, batched inference and test.py on the GPU.

Skipped without a GPU (the two-process test without two); run on a GPU machine with
`python -m pytest -m gpu`.
"""
import json
import sys

import numpy as np
import pytest
import torch

from conftest import CPU_ONLY, run_tool, write_config
from lib.psa import psa_mask, psa_mask_reference
from lib.sync_bn import convert_sync_batchnorm
from model.pspnet import PSPNet
from util.inference import multi_scale_predict, resize_image
from util.reference_inference import reference_predict

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")
NO_TF32 = {"NVIDIA_TF32_OVERRIDE": "0"}  # full float32 convolutions, to compare with CPU results


@pytest.fixture
def no_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.parametrize("psa_type", ["collect", "distribute"])
@pytest.mark.parametrize("side, mask", [((7, 9), (5, 7)), ((12, 12), (23, 23))])
def test_psa_mask_on_cuda_equals_the_loop(psa_type, side, mask):
    x = torch.randn(2, mask[0] * mask[1], *side, requires_grad=True)
    xc = x.detach().to(CUDA).requires_grad_()
    ref = psa_mask_reference(x, psa_type, *mask)
    out = psa_mask(xc, psa_type, *mask)
    assert torch.equal(out.cpu(), ref)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad.to(CUDA))
    assert torch.equal(xc.grad.cpu(), x.grad)


def test_sync_batchnorm_conversion_uses_torch_on_cuda():
    model = convert_sync_batchnorm(PSPNet(layers=18, classes=3), CUDA)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in model.modules())


def test_batched_inference_on_cuda_matches_reference(no_tf32):
    torch.manual_seed(0)
    model = PSPNet(layers=18, classes=5).eval()
    image = (np.random.default_rng(0).random((70, 45, 3)) * 255).astype(np.float32)
    ref = reference_predict(model.double(), image, 5, 33, 33, 70, [0.75, 1.0], 2 / 3, True)
    ours = multi_scale_predict(model.float().to(CUDA), [resize_image(image, round(s * 70)) for s in (0.75, 1.0)],
                               (70, 45), 5, 33, 33, 2 / 3, True, 4, CUDA)
    ours = ours.cpu().numpy().transpose(1, 2, 0)
    assert np.abs(ours - ref).max() < 1e-4
    assert (ours.argmax(2) == ref.argmax(2)).mean() > 0.999


@pytest.mark.parametrize("amp, channels_last", [("bf16", True), ("fp16", False)])
def test_amp_training_runs_on_cuda(tiny_toy, tmp_path, amp, channels_last):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_toy, TRAIN={"epochs": 1, "amp": amp, "train_gpu": [0],
                                                             "channels_last": channels_last, "workers": 2})
    out = run_tool("train.py", f"--config={cfg}", cuda=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 process(es) on cuda" in out.stdout and "CUDA max allocated" in out.stdout
    assert (tmp_path / "model" / "train_epoch_1.pth").is_file()


def test_evaluation_on_cuda_gives_the_cpu_numbers(tiny_toy, tmp_path):
    """test.py on the GPU (fp32, TF32 off) scores a CPU-trained checkpoint as the CPU does."""
    cfg = write_config(tmp_path / "cfg.yaml", tiny_toy, TRAIN={"epochs": 1})
    assert run_tool("train.py", f"--config={cfg}").returncode == 0
    scores = {}
    for device, env in (("cpu", CPU_ONLY), ("cuda", NO_TF32)):
        folder = tmp_path / f"result_{device}"
        out = run_tool("test.py", f"--config={cfg}", "TEST.model_path", str(tmp_path / "model" / "train_epoch_1.pth"),
                       "TEST.save_folder", str(folder), env=env, cuda=device == "cuda")
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"process(es) on {device}" in out.stdout
        scores[device] = json.loads((folder / "metrics.json").read_text())
    for key in ("mIoU", "mAcc", "allAcc"):
        assert abs(scores["cuda"][key] - scores["cpu"][key]) < 1e-3, (key, scores)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpu_torchrun_with_sync_batchnorm_and_bf16(tiny_toy, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_toy, TRAIN={"epochs": 1, "sync_bn": True, "amp": "bf16"})
    out = run_tool("train.py", f"--config={cfg}", cuda=True,
                   launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 process(es) on cuda" in out.stdout
    assert (tmp_path / "model" / "train_epoch_1.pth").is_file()
