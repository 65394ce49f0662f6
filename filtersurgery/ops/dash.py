"""DASH, Direction-Aware SHrinking (Shin, Oh, Cho & Yun, "DASH: Warm-Starting Neural Network Training in
Stationary Settings without Loss of Plasticity", NeurIPS 2024), applied to a trained model before it is trained
on new data: every conv kernel / linear row ``w <- max(lam, cos(w, -g)) * w``, ``g`` the gradient of the loss
on the new data (docs/warmstart.md). The checks it shares with Shrink & Perturb are ``ops/warmstart.py``'s."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from filtersurgery.ops.warmstart import (_DASH_LAYERS, _GRANULARITIES, _as_module, _check_alpha, _check_choice,
                                         _check_finite_named, _check_lam, _excluded, _prefixes)
from filtersurgery.tracing.probe import eval_mode

__all__ = ["dash", "DashReport"]


@dataclass
class DashReport:
    """What :func:`dash` did.

    ``factors[name]``: the shrink factors ``max(lam, cos)`` of weight ``name`` (CPU float32;
    shape ``(out, in)`` per kernel of a conv with ``granularity="kernel"``, ``(out,)`` per
    filter or per linear row); ``bias_factors[name]``: the single factor of a bias vector;
    ``batches`` / ``samples``: what the gradient was computed on; ``unused``: weights that
    got no gradient (not on the forward path), left unchanged. ``layers`` gives the mean
    factor per weight, ``mean_factor`` over all units, ``at_floor`` the fraction of units
    shrunk by exactly ``lam`` (cos <= lam).
    """

    lam: float
    alpha: Optional[float]
    granularity: str
    batches: int = 0
    samples: int = 0
    factors: Dict[str, torch.Tensor] = field(default_factory=dict)
    bias_factors: Dict[str, float] = field(default_factory=dict)
    unused: List[str] = field(default_factory=list)

    @property
    def layers(self) -> Dict[str, float]:
        """Mean shrink factor of each weight."""
        return {n: float(f.mean()) for n, f in self.factors.items()}

    @property
    def mean_factor(self) -> float:
        """Mean shrink factor over all units (kernels / filters / rows) of all weights."""
        if not self.factors:
            return 1.0
        return float(torch.cat([f.flatten() for f in self.factors.values()]).mean())

    @property
    def at_floor(self) -> float:
        """Fraction of units whose factor is ``lam`` (weight not aligned with -grad beyond lam)."""
        if not self.factors:
            return 0.0
        allf = torch.cat([f.flatten() for f in self.factors.values()])
        return float((allf <= self.lam).float().mean())

    def __repr__(self) -> str:
        grad = "mean gradient" if self.alpha is None else f"EMA alpha={self.alpha:g}"
        return (f"DashReport(lam={self.lam:g}, {len(self.factors)} weights per {self.granularity}, {grad} over "
                f"{self.batches} batches / {self.samples} samples, mean factor {self.mean_factor:.3f}, "
                f"at floor {100 * self.at_floor:.0f}%)")


def _unit_factors(w: torch.Tensor, g: torch.Tensor, lam: float, granularity: str) -> torch.Tensor:
    """``max(lam, cos(w_u, g_u))`` per unit ``u`` (float32): per kernel ``(out, in)`` or per row ``(out,)``."""
    wf, gf = w.detach().float(), g.float()
    if w.dim() > 2 and granularity == "kernel":
        wf, gf = wf.reshape(w.shape[0], w.shape[1], -1), gf.reshape(w.shape[0], w.shape[1], -1)
    else:
        wf, gf = wf.reshape(w.shape[0], -1), gf.reshape(w.shape[0], -1)
    cos = F.cosine_similarity(wf, gf, dim=-1)  # torch clamps each norm at eps=1e-8: a zero vector gives cos 0
    return cos.clamp(min=lam, max=1.0)


def _batch_pair(batch) -> Tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"loader: each batch must be a pair (inputs, targets), got {type(batch).__name__}")


def dash(
    model: nn.Module,
    loader: Iterable,
    loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    lam: float = 0.3,
    alpha: Optional[float] = None,
    granularity: str = "kernel",
    bias: bool = True,
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    amp: Optional[torch.dtype] = None,
    max_batches: Optional[int] = None,
    exclude: Union[str, Iterable[str]] = (),
) -> DashReport:
    """DASH, Direction-Aware SHrinking (Shin et al., NeurIPS 2024), before training on new data.

    1. ``G = -grad_theta L`` on the new data: with ``alpha=None`` the gradient of the mean
       loss over all samples of ``loader`` (each batch weighted by its size); with
       ``alpha`` in (0, 1] the authors' code's running average ``G <- (1 - alpha) G +
       alpha * (-grad L_batch)`` over the batches in loader order (from ``G = 0``).
    2. Every conv / linear weight is shrunk unit by unit: ``w_u <- max(lam, cos(w_u, G_u)) * w_u``,
       a unit being a kernel ``w[o, i]`` of a conv (``granularity="kernel"``, the authors'
       code) or a whole filter ``w[o]`` (``"filter"``), and a row ``w[o]`` of a linear layer.
       With ``bias=True`` each bias vector is shrunk by one factor ``max(lam, cos(b, G_b))``.

    Norm layers and any other parameters (layer-scale gammas, embeddings) are not touched;
    nor are frozen (``requires_grad=False``) or ``exclude``-d parameters, or weights the
    loss does not reach (``report.unused``).

    Args:
        loader: iterable of ``(inputs, targets)`` batches of the new data (one pass). Inputs
            are moved to the model's device; ``transform(inputs)`` is applied after (e.g.
            normalization of uint8 images: no augmentation).
        loss_fn: ``loss_fn(logits, targets) -> scalar`` mean loss; default cross-entropy.
        lam: the smallest factor, in [0, 1]; 1 leaves the model unchanged.
        amp: autocast dtype of the forward passes (``torch.bfloat16`` / ``torch.float16``)
            or None. Gradients are accumulated in float32.
        max_batches: use only the first N batches.

    The gradient pass runs with every module in eval mode (BN uses its running statistics
    and they do not change, as in the authors' code where DASH follows an evaluation);
    each module's train/eval flag is restored afterwards. Parameter ``.grad`` fields are not
    touched. NaN/Inf weights or gradients raise a one-line ValueError before any change.
    """
    lam, alpha = _check_lam(lam), _check_alpha(alpha)
    _check_dash_args(granularity, max_batches, loss_fn, transform, loader)
    prefixes = _prefixes(exclude)
    net = _as_module(model)
    loss_fn = loss_fn or (lambda logits, y: F.cross_entropy(logits.float(), y))
    weights, biases = _dash_params(net, bias, prefixes)
    params = {**weights, **biases}
    _check_finite_named([(n, p.detach()) for n, p in params.items()], "model", "weight")

    names, plist = list(params), list(params.values())
    report = DashReport(lam=lam, alpha=alpha, granularity=granularity)
    acc, used = _dash_gradient(net, loader, loss_fn, plist, report, transform, amp, max_batches)
    if report.batches == 0:
        raise ValueError("loader: yielded no batches; DASH needs at least one (inputs, targets) batch of the new data")
    total = _all_reduce(acc, report.samples)
    if alpha is None:
        for a in acc:
            a.div_(total)
    _check_finite_named([(n, a) for n, a, u in zip(names, acc, used) if u], "loader", "gradient value",
                        "the loss on the new data is not finite: check the data, the loss and the model")
    _dash_shrink(report, zip(names, plist, acc, used), weights)
    return report


def _check_dash_args(granularity: str, max_batches, loss_fn, transform, loader) -> None:
    """One-line ValueErrors for :func:`dash`'s arguments other than ``lam`` and ``alpha``."""
    _check_choice("granularity", granularity, _GRANULARITIES)
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches: must be None or an integer >= 1, got {max_batches!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"loss_fn: must be None (cross-entropy) or a callable (logits, targets) -> loss, got {type(loss_fn).__name__}")
    if transform is not None and not callable(transform):
        raise ValueError(f"transform: must be None or a callable, got {type(transform).__name__}")
    if loader is None or not hasattr(loader, "__iter__"):
        raise ValueError(f"loader: must be an iterable of (inputs, targets) batches, got {type(loader).__name__}")


def _dash_params(net: nn.Module, bias: bool, prefixes: Tuple[str, ...]) -> Tuple[Dict[str, nn.Parameter], Dict[str, nn.Parameter]]:
    """``(weights, biases)``: the trainable, not excluded conv / linear weights (and biases) DASH shrinks."""
    weights: Dict[str, nn.Parameter] = {}
    biases: Dict[str, nn.Parameter] = {}
    for mname, m in net.named_modules():
        if not isinstance(m, _DASH_LAYERS):
            continue
        w = getattr(m, "weight", None)
        wname = f"{mname}.weight" if mname else "weight"
        if isinstance(w, nn.Parameter) and w.requires_grad and not _excluded(wname, prefixes):
            weights[wname] = w
        b = getattr(m, "bias", None)
        bname = f"{mname}.bias" if mname else "bias"
        if bias and isinstance(b, nn.Parameter) and b.requires_grad and not _excluded(bname, prefixes):
            biases[bname] = b
    if not weights:
        raise ValueError(f"model: {type(net).__name__} has no trainable Conv1d/2d/3d or Linear weight for DASH to shrink")
    return weights, biases


def _dash_gradient(net: nn.Module, loader: Iterable, loss_fn, plist: List[nn.Parameter], report: DashReport,
                   transform, amp, max_batches) -> Tuple[List[torch.Tensor], List[bool]]:
    """``(G per parameter, float32; whether it got a gradient)``: ``-grad`` of the loss over ``loader``.

    The mean over samples (``report.alpha`` None, not yet divided by the sample count) or
    the running average of the authors' code. Every module in eval mode, flags restored.
    ``report.batches`` / ``report.samples`` count what was used.
    """
    alpha = report.alpha
    acc = [torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format) for p in plist]
    try:
        device = next(net.parameters()).device
    except StopIteration:  # pragma: no cover - there is a weight
        device = torch.device("cpu")
    used = [False] * len(plist)
    with eval_mode(net), torch.enable_grad():
        for batch in loader:
            if max_batches is not None and report.batches >= max_batches:
                break
            x, y = _batch_pair(batch)
            if isinstance(x, torch.Tensor):
                x = x.to(device, non_blocking=True)
            if isinstance(y, torch.Tensor):
                y = y.to(device, non_blocking=True)
            if transform is not None:
                x = transform(x)
            n = int(y.shape[0]) if isinstance(y, torch.Tensor) and y.dim() > 0 else int(x.shape[0])
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = net(x)
            grads = torch.autograd.grad(loss_fn(out, y), plist, allow_unused=True)
            for i, g in enumerate(grads):
                if g is None:
                    continue
                used[i] = True
                if alpha is None:
                    acc[i].add_(g.float(), alpha=-float(n))
                else:
                    acc[i].mul_(1.0 - alpha).add_(g.float(), alpha=-alpha)
            report.batches += 1
            report.samples += n
    return acc, used


@torch.no_grad()
def _dash_shrink(report: DashReport, items, weights: Dict[str, nn.Parameter]) -> None:
    """Shrink each ``(name, parameter, G, used)`` of ``items`` by its unit factors, recorded in ``report``."""
    for name, p, g, u in items:
        if not u:
            report.unused.append(name)
            continue
        if name in weights:
            f = _unit_factors(p, g, report.lam, report.granularity)
            p.mul_(f.view(*f.shape, *([1] * (p.dim() - f.dim()))).to(p.dtype))
            report.factors[name] = f.cpu()
        else:
            cos = F.cosine_similarity(p.detach().float().flatten(), g.flatten(), dim=0)
            f = cos.clamp(min=report.lam, max=1.0)
            p.mul_(f.to(p.dtype))
            report.bias_factors[name] = float(f)


def _all_reduce(acc: List[torch.Tensor], samples: int) -> float:
    """Under ``torch.distributed`` (world > 1): sum the accumulated gradients and sample counts
    over ranks, so every rank shrinks by the same factors. Returns the total sample count."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(samples)
    for a in acc:
        dist.all_reduce(a, op=dist.ReduceOp.SUM)  # EMA mode: a sum of the ranks' EMAs, same direction as their mean
    n = torch.tensor([float(samples)], device=acc[0].device)
    dist.all_reduce(n, op=dist.ReduceOp.SUM)
    return float(n)
