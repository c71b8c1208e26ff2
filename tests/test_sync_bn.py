"""CPUSyncBatchNorm across 2 gloo processes against one nn.BatchNorm2d on the whole batch."""
import copy
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from lib.sync_bn import CPUSyncBatchNorm, combine_moments, convert_sync_batchnorm, local_moments

CHANNELS = 3
STEPS = 2
# name -> (samples per rank, momentum, affine)
SCENARIOS = {
    "equal": ((2, 2), 0.1, True),
    "unequal": ((3, 1), 0.1, True),
    "one_rank_empty": ((4, 0), 0.1, True),
    "cumulative_momentum": ((2, 3), None, True),
    "no_affine": ((1, 2), 0.1, False),
}


def make_case(name: str) -> dict:
    """Identical data on every process: full batches, upstream gradients and initial BN state."""
    sizes, momentum, affine = SCENARIOS[name]
    gen = torch.Generator().manual_seed(len(name))
    total = sum(sizes)
    offset = torch.tensor([5.0, -2.0, 0.5]).view(1, CHANNELS, 1, 1)
    xs = [torch.randn(total, CHANNELS, 4, 5, generator=gen) * (step + 2) + offset
          for step in range(STEPS)]
    grads = [torch.randn(total, CHANNELS, 4, 5, generator=gen) for _ in range(STEPS)]
    bn = nn.BatchNorm2d(CHANNELS, momentum=momentum, affine=affine)
    with torch.no_grad():
        if affine:
            bn.weight.copy_(torch.rand(CHANNELS, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(CHANNELS, generator=gen))
        bn.running_mean.copy_(torch.randn(CHANNELS, generator=gen))
        bn.running_var.copy_(torch.rand(CHANNELS, generator=gen) + 0.5)
    return {"sizes": sizes, "xs": xs, "grads": grads, "bn": bn}


def run_steps(bn: nn.Module, xs, grads) -> list[dict]:
    """Forward/backward with loss sum(y * grad); record what each step produced."""
    records = []
    for x, grad in zip(xs, grads):
        x = x.clone().requires_grad_(True)
        bn.zero_grad()
        out = bn(x)
        (out * grad).sum().backward()
        records.append({
            "out": out.detach(), "grad_x": x.grad,
            "grad_w": None if bn.weight is None else bn.weight.grad.clone(),
            "grad_b": None if bn.bias is None else bn.bias.grad.clone(),
            "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
            "tracked": int(bn.num_batches_tracked),
        })
    return records


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    try:
        results = {}
        for name in SCENARIOS:
            case = make_case(name)
            start = sum(case["sizes"][:rank])
            part = slice(start, start + case["sizes"][rank])
            bn = convert_sync_batchnorm(case["bn"], "cpu")
            results[name] = run_steps(bn, [x[part] for x in case["xs"]],
                                      [g[part] for g in case["grads"]])
        too_small = CPUSyncBatchNorm(CHANNELS)
        try:
            too_small(torch.randn(1 - rank, CHANNELS, 1, 1))
            results["too_small_error"] = None
        except ValueError as err:
            results["too_small_error"] = str(err)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sync_bn")
    mp.spawn(_worker, args=(2, str(tmp / "init"), str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_processes_match_one_batchnorm_on_whole_batch(per_rank_results, name):
    case = make_case(name)
    expected = run_steps(copy.deepcopy(case["bn"]), case["xs"], case["grads"])
    ranks = [results[name] for results in per_rank_results]
    for step, ref in enumerate(expected):
        got = [r[step] for r in ranks]
        torch.testing.assert_close(torch.cat([g["out"] for g in got]), ref["out"],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.cat([g["grad_x"] for g in got]), ref["grad_x"],
                                   atol=1e-5, rtol=1e-5)
        if ref["grad_w"] is not None:
            # Each process keeps its local share; DDP's all-reduce adds them up.
            torch.testing.assert_close(got[0]["grad_w"] + got[1]["grad_w"], ref["grad_w"],
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[0]["grad_b"] + got[1]["grad_b"], ref["grad_b"],
                                       atol=1e-5, rtol=1e-5)
        for g in got:
            torch.testing.assert_close(g["running_mean"], ref["running_mean"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(g["running_var"], ref["running_var"], atol=1e-5, rtol=1e-5)
            assert g["tracked"] == ref["tracked"] == step + 1


def test_single_value_over_all_processes_is_rejected(per_rank_results):
    for results in per_rank_results:
        assert "Expected more than 1 value per channel" in results["too_small_error"]
        assert "got 1 over all processes" in results["too_small_error"]


def _train_twice(bn: nn.Module, x: torch.Tensor):
    outs = [bn(x * scale) for scale in (1.0, 3.0)]
    return outs, bn.running_mean.clone(), bn.running_var.clone()


def test_without_process_group_equals_batchnorm2d_exactly():
    x = torch.randn(4, CHANNELS, 5, 5) + 2
    ref = nn.BatchNorm2d(CHANNELS, momentum=None)
    sync = CPUSyncBatchNorm(CHANNELS, momentum=None)
    ref_outs, ref_mean, ref_var = _train_twice(ref, x)
    outs, mean, var = _train_twice(sync, x)
    for out, ref_out in zip(outs, ref_outs):
        assert torch.equal(out, ref_out)
    assert torch.equal(mean, ref_mean) and torch.equal(var, ref_var)


def test_world_size_one_group_gives_plain_batch_norm(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1, timeout=timedelta(seconds=30))
    try:
        x = torch.randn(2, CHANNELS, 3, 3) * 4 - 1
        sync = CPUSyncBatchNorm(CHANNELS)
        out = sync(x)
        running_mean, running_var = torch.zeros(CHANNELS), torch.ones(CHANNELS)
        expected = F.batch_norm(x, running_mean, running_var, sync.weight, sync.bias,
                                training=True, momentum=0.1, eps=1e-5)
        assert torch.equal(out, expected)
        assert torch.equal(sync.running_mean, running_mean)
        assert torch.equal(sync.running_var, running_var)
    finally:
        dist.destroy_process_group()


def test_combine_moments_matches_whole_data_even_with_large_offset():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, CHANNELS, 16, 16, generator=gen) * 0.01 + 1e4
    parts = [x[:3], x[3:3], x[3:4], x[4:]]
    moments = [local_moments(p) for p in parts]
    count, mean, var = combine_moments(torch.tensor([float(m[0]) for m in moments]),
                                       torch.stack([m[1] for m in moments]),
                                       torch.stack([m[2] for m in moments]))
    exact_var, exact_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert count == 7 * 16 * 16
    torch.testing.assert_close(mean, exact_mean, atol=0, rtol=1e-7)
    # float32 sum-of-squares would lose everything here (var 1e-4 against mean^2 1e8).
    torch.testing.assert_close(var, exact_var, atol=0, rtol=1e-3)


def _model_with_batchnorms() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, affine=False)))
    model[1].weight.requires_grad_(False)
    with torch.no_grad():
        model[1].running_mean.fill_(0.25)
    model[1].num_batches_tracked.fill_(7)
    return model


def test_cpu_conversion_keeps_names_tensors_and_flags():
    model = _model_with_batchnorms()
    before = model.state_dict(keep_vars=True)
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    after = converted.state_dict(keep_vars=True)
    assert list(after) == list(before)
    assert all(after[key] is before[key] for key in before)
    assert isinstance(converted[1], CPUSyncBatchNorm) and isinstance(converted[3][1], CPUSyncBatchNorm)
    assert converted[1].weight.requires_grad is False and converted[1].bias.requires_grad
    assert converted[3][1].weight is None and not converted[3][1].affine
    fresh = convert_sync_batchnorm(_model_with_batchnorms(), "cpu")
    fresh.load_state_dict(_model_with_batchnorms().state_dict(), strict=True)


def test_root_batchnorm_is_converted_and_keeps_mode():
    bn = nn.BatchNorm2d(2, eps=1e-3, momentum=0.3).eval()
    converted = convert_sync_batchnorm(bn, "cpu")
    assert isinstance(converted, CPUSyncBatchNorm)
    assert (converted.eps, converted.momentum, converted.training) == (1e-3, 0.3, False)


def test_cuda_conversion_defers_to_torch_syncbatchnorm():
    model = _model_with_batchnorms()
    keys = list(model.state_dict())
    converted = convert_sync_batchnorm(model, "cuda")
    assert isinstance(converted[1], nn.SyncBatchNorm) and isinstance(converted[3][1], nn.SyncBatchNorm)
    assert list(converted.state_dict()) == keys


def test_unsupported_device_is_named():
    with pytest.raises(ValueError, match="got 'meta'"):
        convert_sync_batchnorm(_model_with_batchnorms(), "meta")


def test_moments_of_low_precision_input_are_computed_in_float32():
    x = (100.3 + torch.randn(4, 3, 8, 8)).to(torch.bfloat16)
    count, mean, _ = local_moments(x)
    assert count == 4 * 8 * 8
    torch.testing.assert_close(mean, x.double().mean(dim=(0, 2, 3)), atol=1e-3, rtol=0)
