"""Synchronised batch normalisation that also runs on CPU (gloo).

torch.nn.SyncBatchNorm only runs its forward on CUDA. CPUSyncBatchNorm gives the same maths on
any backend that supports all_gather / all_reduce (gloo on CPU): in training mode the batch
statistics are taken over the samples of all processes together, and the backward pass is the
gradient of the sum of all processes' losses, exactly as if one process had seen the whole batch.

Statistics are combined from per-process (count, mean, sum of squared deviations) with Chan's
parallel formula in float64, which stays accurate where sum / sum-of-squares in float32 would
cancel. Processes may hold different numbers of samples, including none.

`convert_sync_batchnorm(module, device)` swaps the BatchNorm2d layers for the synchronised kind
that fits the device; parameter and buffer names are unchanged, so checkpoints load either way.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.autograd import Function

_REDUCE_DIMS = (0, 2, 3)  # every dimension but the channel one of an (N, C, H, W) input


def local_moments(x: Tensor) -> tuple[int, Tensor, Tensor]:
    """Per-channel (count, mean, sum of squared deviations from the mean) of an NCHW tensor.

    Mean and deviations are float64; an empty input gives zeros, so it adds nothing when combined.
    """
    channels = x.shape[1]
    count = x.numel() // channels if channels else 0
    if count == 0:
        zeros = torch.zeros(channels, dtype=torch.float64, device=x.device)
        return 0, zeros, zeros.clone()
    var, mean = torch.var_mean(x.float(), dim=_REDUCE_DIMS, correction=0)  # bf16/fp16 means lose digits
    return count, mean.double(), var.double() * count


def combine_moments(counts: Tensor, means: Tensor, sq_devs: Tensor) -> tuple[float, Tensor, Tensor]:
    """Merge per-part moments: counts (P,), means (P, C), sq_devs (P, C) -> (count, mean, biased var).

    Chan et al.'s formula: the squared deviations of each part are shifted to the global mean
    by adding count_p * (mean_p - mean)^2.
    """
    total = float(counts.sum())
    weights = counts.to(means.dtype).unsqueeze(1)
    mean = (weights * means).sum(0) / total
    sq_dev = (sq_devs + weights * (means - mean) ** 2).sum(0)
    return total, mean, sq_dev / total


def _global_moments(x: Tensor, group) -> tuple[float, Tensor, Tensor]:
    """(count, mean, biased var) over the inputs of every process of `group`, in float64."""
    count, mean, sq_dev = local_moments(x)
    packed = torch.cat([mean.new_tensor([count]), mean, sq_dev])
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, packed, group=group)
    table = torch.stack(gathered)
    channels = mean.numel()
    return combine_moments(table[:, 0], table[:, 1:1 + channels], table[:, 1 + channels:])


def _channel_view(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


class _SyncNormalise(Function):
    """y = (x - mean) * invstd * weight + bias with mean/invstd computed over all processes.

    mean and invstd arrive as constants; backward adds their dependence on every process's
    input analytically, which needs the global sums of grad and grad * x_hat.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, total_count, group):
        x_hat = (x - _channel_view(mean)) * _channel_view(invstd)
        ctx.save_for_backward(x_hat, weight, invstd)
        ctx.total_count = total_count
        ctx.group = group
        out = x_hat
        if weight is not None:
            out = out * _channel_view(weight)
        if bias is not None:
            out = out + _channel_view(bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_hat, weight, invstd = ctx.saved_tensors
        grad_sum = grad_out.sum(_REDUCE_DIMS)
        grad_dot_xhat = (grad_out * x_hat).sum(_REDUCE_DIMS)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([grad_sum, grad_dot_xhat])
            dist.all_reduce(sums, group=ctx.group)
            mean_grad, mean_grad_xhat = (sums / ctx.total_count).chunk(2)
            scale = invstd if weight is None else invstd * weight
            grad_x = _channel_view(scale) * (
                grad_out - _channel_view(mean_grad) - x_hat * _channel_view(mean_grad_xhat))
        # Parameter gradients stay local: DDP averages them across processes like any other.
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = grad_dot_xhat
        if ctx.needs_input_grad[2]:
            grad_bias = grad_sum
        return grad_x, grad_weight, grad_bias, None, None, None, None


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span all processes of `process_group`.

    Same constructor, parameters, buffers and running-stat update as nn.BatchNorm2d (momentum or
    cumulative average when momentum is None, unbiased variance for running_var). Without an
    initialised process group, with a group of one process, or in eval mode, it is plain
    nn.BatchNorm2d. Every process must call forward (and backward) the same number of times.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group=None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group

    def _group_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or self._group_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        with torch.no_grad():
            count, mean, var = _global_moments(input.detach(), self.process_group)
            if count <= 1:
                raise ValueError(
                    f"Expected more than 1 value per channel when training, got {int(count)} "
                    f"over all processes (local input size {list(input.shape)})")
            if self.track_running_stats:
                self._update_running_stats(count, mean, var)
            invstd = torch.rsqrt(var + self.eps).to(input.dtype)
            mean = mean.to(input.dtype)
        return _SyncNormalise.apply(input, self.weight, self.bias, mean, invstd, count,
                                    self.process_group)

    def _update_running_stats(self, count: float, mean: Tensor, var: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        unbiased_var = var * (count / (count - 1))
        self.running_mean.mul_(1 - factor).add_(factor * mean.to(self.running_mean.dtype))
        self.running_var.mul_(1 - factor).add_(factor * unbiased_var.to(self.running_var.dtype))


def _to_cpu_sync(module: nn.Module, process_group) -> nn.Module:
    """Replace every nn.BatchNorm2d below (and including) `module` by CPUSyncBatchNorm, in place."""
    converted = module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CPUSyncBatchNorm):
        converted = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum,
                                     module.affine, module.track_running_stats, process_group)
        # Share the very tensors (not copies): optimizers and requires_grad flags carry over.
        if module.affine:
            converted.weight = module.weight
            converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, _to_cpu_sync(child, process_group))
    return converted


def convert_sync_batchnorm(module: nn.Module, device: torch.device | str,
                           process_group=None) -> nn.Module:
    """Make the BatchNorm2d layers of `module` synchronise across processes on `device`.

    CUDA: torch.nn.SyncBatchNorm.convert_sync_batchnorm (all _BatchNorm kinds). CPU: every
    nn.BatchNorm2d becomes CPUSyncBatchNorm. Like torch's converter this works in place on the
    children and returns the (possibly new) root, so always use the return value. Parameters
    and buffers keep their names, values, identity and requires_grad.
    """
    device_type = torch.device(device).type
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    if device_type == "cpu":
        return _to_cpu_sync(module, process_group)
    raise ValueError(f"sync batch norm supports cuda and cpu devices, got {device_type!r}")
