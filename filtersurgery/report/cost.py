"""What training a network costs, measured: MACs per iteration (frozen layers skip their weight gradients),
trainable and stored parameters, time per iteration and peak memory (``training_cost``); the partial-sharing
sweep reports it for every sharing fraction (docs/sharing.md)."""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from filtersurgery.tracing import probe
from filtersurgery.tracing.scaling_map import unwrap

__all__ = ["TrainingCost", "training_cost"]


@dataclass
class TrainingCost:
    """Cost of one training iteration (forward + backward + SGD step) of a model."""

    batch_size: int
    forward_macs: int  # per iteration
    backward_macs: int  # per iteration: input gradients + weight gradients of trainable layers
    trainable_params: int
    params: int
    sec_per_iter: Optional[float] = None  # median wall time
    peak_mem_mb: Optional[float] = None  # peak memory of one iteration (see training_cost)
    peak_mem_source: str = ""

    @property
    def train_macs(self) -> int:
        """MACs of one training iteration: forward + backward."""
        return self.forward_macs + self.backward_macs

    def __repr__(self) -> str:
        t = f", {self.sec_per_iter * 1e3:.1f} ms/iter" if self.sec_per_iter is not None else ""
        m = f", peak {self.peak_mem_mb:.0f} MB" if self.peak_mem_mb is not None else ""
        return (f"TrainingCost(batch {self.batch_size}, {self.train_macs / 1e6:.1f} MMACs/iter, "
                f"{self.trainable_params}/{self.params} params trainable{t}{m})")


def _output_width(net: nn.Module, x1: torch.Tensor) -> int:
    """Number of outputs of ``net`` for the one-image batch ``x1``, from an eval-mode forward.

    Eval mode: in train mode a BatchNorm whose input is ``1 x 1`` (the last feature map of
    a small image) cannot normalize a single value per channel. Every module's mode is
    restored afterwards.
    """
    with probe.eval_mode(net), torch.no_grad():
        return int(net(x1).shape[1])


def _count_macs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Tuple[int, int]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        out = model(x)
    fwd = int(fc.get_total_flops())
    loss = F.cross_entropy(out.float(), y)
    with FlopCounterMode(display=False) as fc:
        loss.backward()
    return fwd // 2, int(fc.get_total_flops()) // 2


@contextlib.contextmanager
def _native_stderr_silenced():
    """Send what native code writes to file descriptor 2 to /dev/null for the ``with`` block: the profiler's
    C++ logger prints ``USDT:... profiler_start``/``profiler_stop`` lines there, whatever KINETO_LOG_LEVEL says.
    Python's own ``sys.stderr`` is flushed first; where descriptor 2 cannot be duplicated nothing changes."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, AttributeError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_mb(step) -> Optional[float]:
    """Peak tensor memory (MB) of ``step()`` on CPU from the profiler's memory timeline (private API)."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no "gpuGetDeviceCount failed" noise on CPU-only hosts
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                                                record_shapes=True, with_stack=True) as prof:
            step()
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
        return max((sum(s) for s in sizes), default=0) / 2 ** 20
    except (ImportError, AttributeError, RuntimeError, TypeError, ValueError, IndexError, KeyError):
        return None


def training_cost(model: nn.Module, example_input: torch.Tensor, num_classes: Optional[int] = None,
                  iters: int = 10, warmup: int = 2, measure: bool = True, memory: bool = True) -> TrainingCost:
    """Training cost of ``model`` per iteration on a batch like ``example_input`` (docs/method.md §6).

    MACs are counted with ``torch.utils.flop_counter`` (FLOPs / 2) on one forward and one
    backward pass of a cross-entropy loss: autograd computes no weight gradient for frozen
    layers and no input gradient before the first trainable layer, and the counter sees
    exactly the convolutions and matmuls that run (the SGD update's elementwise work is not
    counted). With ``measure``: the median wall time of ``iters`` SGD iterations (momentum
    0.9, after ``warmup``) and the peak memory of one iteration: on CUDA
    ``torch.cuda.max_memory_allocated`` (everything allocated on the device), on CPU the
    peak of the profiler's memory timeline (parameters, gradients, optimizer state,
    activations; ``None`` if the profiler cannot tell). Runs on a deep copy: the model, its
    BatchNorm statistics and its modes are untouched. ``memory=False``: time only (no peak
    memory, ``peak_mem_mb`` None), for repeated timing passes.
    """
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise ValueError("example_input: must be a batch tensor [B, ...]")
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters: must be >= 1 (and warmup >= 0), got iters={iters}, warmup={warmup}")
    m = copy.deepcopy(unwrap(model))
    m.train()
    x = example_input
    n_out = num_classes or _output_width(m, x[:1])
    y = torch.randint(0, n_out, (x.shape[0],), device=x.device)
    fwd, bwd = _count_macs(m, x, y)
    params = [p for p in m.parameters() if p.requires_grad]
    cost = TrainingCost(batch_size=int(x.shape[0]), forward_macs=fwd, backward_macs=bwd,
                        trainable_params=sum(p.numel() for p in params),
                        params=sum(p.numel() for p in m.parameters()))
    if not measure:
        return cost
    opt = torch.optim.SGD(params, lr=1e-6, momentum=0.9)
    cuda = x.device.type == "cuda"

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x).float(), y).backward()
        opt.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - t0)
    cost.sec_per_iter = sorted(times)[len(times) // 2]
    if not memory:
        return cost
    if cuda:
        opt.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats(x.device)
        step()
        cost.peak_mem_mb = torch.cuda.max_memory_allocated(x.device) / 2 ** 20
        cost.peak_mem_source = "cuda max_memory_allocated"
    else:
        opt.zero_grad(set_to_none=True)
        cost.peak_mem_mb = _cpu_peak_mb(step)
        cost.peak_mem_source = "cpu profiler memory timeline" if cost.peak_mem_mb is not None else "unavailable"
    return cost
