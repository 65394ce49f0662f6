"""Warm-start operations: Shrink & Perturb and DASH, applied to a trained model before it
is trained on new data.

Both are functions of a model, run once between two training steps, and change the
model's parameters in place (docs/warmstart.md has the equations, defaults and sources):

- :func:`shrink_perturb` (Ash & Adams, "On Warm-Starting Neural Network Training",
  NeurIPS 2020): every selected parameter ``theta <- shrink * theta + noise * theta_init``,
  ``theta_init`` drawn like a fresh initialization of the same network.
- :func:`dash` (Shin, Oh, Cho & Yun, "DASH: Warm-Starting Neural Network Training in
  Stationary Settings without Loss of Plasticity", NeurIPS 2024): every conv kernel /
  linear row ``w <- max(lam, cos(w, -g)) * w``, ``g`` the gradient of the loss on the new
  data.

:func:`prepare_step` is what a multi-step trainer calls at the start of step k >= 2 for
the methods ``shrink-perturb`` and ``dash``; :func:`step_options` reads their options
from a config object.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from filtersurgery.ops.checks import first_nonfinite as _first_nonfinite, nonfinite_message as _nonfinite_message
from filtersurgery.tracing.probe import eval_mode
from filtersurgery.tracing.scaling_map import ScalingMap, unwrap

__all__ = [
    "shrink_perturb",
    "ShrinkPerturbReport",
    "dash",
    "DashReport",
    "prepare_step",
    "step_options",
    "WARMSTART_METHODS",
    "DEFAULTS",
]

# the trainer methods this module serves, and the defaults of their options
WARMSTART_METHODS = ("shrink-perturb", "dash")
DEFAULTS: Dict[str, Dict[str, Any]] = {
    "shrink-perturb": {"shrink": 0.4, "noise": 0.1},
    "dash": {"lam": 0.3, "alpha": None, "granularity": "kernel"},
}
# the attribute of a trainer config that holds each option (read by step_options)
_CONFIG_FIELDS = {
    "shrink-perturb": {"shrink": "sp_shrink", "noise": "sp_noise"},
    "dash": {"lam": "dash_lam", "alpha": "dash_alpha", "granularity": "dash_granularity"},
}
_DASH_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_GRANULARITIES = ("kernel", "filter")
_BN_STATS = ("reset", "keep")


# --------------------------------------------------------------------------- checks
def _number(name: str, value, allowed: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name}: must be a number in {allowed}, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be a number in {allowed}, got {value!r}") from None
    return v


def _check_shrink(shrink) -> float:
    v = _number("shrink", shrink, "(0, 1]")
    if not 0.0 < v <= 1.0:
        raise ValueError(f"shrink: must be in (0, 1] (1 = no shrinking), got {shrink!r}")
    return v


def _check_noise(noise) -> float:
    v = _number("noise", noise, "[0, inf)")
    if not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"noise: must be a finite number >= 0 (0 = shrink only), got {noise!r}")
    return v


def _check_lam(lam) -> float:
    v = _number("lam", lam, "[0, 1]")
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"lam: must be in [0, 1] (the smallest shrink factor), got {lam!r}")
    return v


def _check_alpha(alpha) -> Optional[float]:
    if alpha is None:
        return None
    v = _number("alpha", alpha, "(0, 1] or None")
    if not 0.0 < v <= 1.0:
        raise ValueError(f"alpha: must be None (mean gradient) or in (0, 1] (EMA weight of the newest batch), got {alpha!r}")
    return v


def _check_choice(name: str, value, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}: must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _as_module(model, arg: str = "model") -> nn.Module:
    if isinstance(model, ScalingMap):
        model = model.module
    if not isinstance(model, nn.Module):
        raise ValueError(f"{arg}: expected an nn.Module, got {type(model).__name__}")
    return unwrap(model)


def _prefixes(exclude) -> Tuple[str, ...]:
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        exclude = (exclude,)
    try:
        out = tuple(exclude)
    except TypeError:
        raise ValueError(f"exclude: must be a parameter-name prefix or a list of them, got {exclude!r}") from None
    if not all(isinstance(e, str) and e for e in out):
        raise ValueError(f"exclude: must be non-empty parameter-name prefixes (e.g. 'fc'), got {exclude!r}")
    return out


def _excluded(name: str, prefixes: Tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _check_finite_named(named: List[Tuple[str, torch.Tensor]], arg: str, what: str, hint: Optional[str] = None) -> None:
    """One-line ValueError naming the count and the first NaN/Inf entry of ``named``."""
    first = _first_nonfinite(named)
    if first is None:
        return
    count = sum(int((~torch.isfinite(t)).sum()) for _, t in named)
    msg = _nonfinite_message(arg, count, what, first)
    if hint is not None:
        msg = msg.split("; ")[0] + "; " + hint
    raise ValueError(msg)


def _is_norm(m: nn.Module) -> bool:
    from filtersurgery.tracing.tracer import norm_kind  # lazily: the tracer imports torch-pruning

    return norm_kind(m) is not None


# --------------------------------------------------------------------------- Shrink & Perturb
@dataclass
class ShrinkPerturbReport:
    """What :func:`shrink_perturb` did.

    ``tensors``: names of the parameters changed (``shrink * theta + noise * theta_init``);
    ``numel``: their total size; ``noise_std``: std of the added noise ``noise *
    theta_init`` per tensor; ``no_init``: parameters with no known initialization rule
    (no ``reset_parameters`` on their module and no ``init`` model), only shrunk;
    ``bn_reset``: norm layers whose running statistics were reset; ``skipped``: frozen
    (``requires_grad=False``) or excluded parameters left alone; ``source``: where
    ``theta_init`` came from (``"reset_parameters"`` or ``"init"``).
    """

    shrink: float
    noise: float
    source: str
    tensors: List[str] = field(default_factory=list)
    numel: int = 0
    noise_std: Dict[str, float] = field(default_factory=dict)
    no_init: List[str] = field(default_factory=list)
    bn_reset: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        return (f"ShrinkPerturbReport(shrink={self.shrink:g}, noise={self.noise:g}, {len(self.tensors)} tensors / "
                f"{self.numel} values, noise from {self.source}, {len(self.no_init)} shrunk only, "
                f"{len(self.bn_reset)} BN stats reset, {len(self.skipped)} skipped)")


def _seeded(generator: Optional[torch.Generator]):
    """Context: the CPU default generator re-seeded from ``generator`` (restored afterwards)."""
    if generator is None:
        return contextlib.nullcontext()
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: must be a torch.Generator or None, got {type(generator).__name__}")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))

    @contextlib.contextmanager
    def ctx():
        with torch.random.fork_rng(devices=[]):  # only the CPU state: CUDA generators are never touched
            torch.default_generator.manual_seed(seed)
            yield

    return ctx()


def _fresh_from_reset(net: nn.Module, selected: Dict[str, nn.Parameter]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """``{name: theta_init}`` (CPU float32) from each module's ``reset_parameters`` on a CPU copy."""
    fresh: Dict[str, torch.Tensor] = {}
    for mname, m in net.named_modules():
        own = [(n, p) for n, p in m.named_parameters(recurse=False)]
        names = [f"{mname}.{n}" if mname else n for n, _ in own]
        if not any(n in selected for n in names) or not callable(getattr(m, "reset_parameters", None)):
            continue
        clone = copy.deepcopy(m).to("cpu")  # one layer at a time: no second model in memory
        clone.float()
        clone.reset_parameters()
        for (n, _), full in zip(own, names):
            if full in selected:
                fresh[full] = getattr(clone, n).detach()
    missing = [n for n in selected if n not in fresh]
    return fresh, missing


def _sp_selected(net: nn.Module, norms: bool, prefixes: Tuple[str, ...]) -> Tuple[Dict[str, nn.Parameter], List[str]]:
    """``(selected, skipped)``: the parameters Shrink & Perturb changes, and the frozen / excluded ones it leaves."""
    norm_params = set()
    if not norms:
        for mname, m in net.named_modules():
            if _is_norm(m):
                norm_params.update(f"{mname}.{n}" if mname else n for n, _ in m.named_parameters(recurse=False))
    selected: Dict[str, nn.Parameter] = {}
    skipped: List[str] = []
    for name, p in net.named_parameters():
        if not p.requires_grad or _excluded(name, prefixes) or name in norm_params:
            skipped.append(name)
        else:
            selected[name] = p
    return selected, skipped


def _fresh_from_init(init, selected: Dict[str, nn.Parameter]) -> Dict[str, torch.Tensor]:
    """``{name: theta_init}`` from ``init`` (a fresh model, or a callable returning one), matched by name."""
    init_net = init if isinstance(init, nn.Module) else None
    if init_net is None:
        if not callable(init):
            raise ValueError(f"init: must be None, an nn.Module or a callable returning one, got {type(init).__name__}")
        init_net = init()
    init_net = _as_module(init_net, "init")
    theirs = dict(init_net.named_parameters())
    fresh: Dict[str, torch.Tensor] = {}
    for name, p in selected.items():
        q = theirs.get(name)
        if q is None:
            raise ValueError(f"init: has no parameter {name!r}; pass a fresh model of the same architecture")
        if q.shape != p.shape:
            raise ValueError(f"init: parameter {name!r} has shape {tuple(q.shape)}, the model's is {tuple(p.shape)}")
        fresh[name] = q.detach()
    _check_finite_named(list(fresh.items()), "init", "weight", "pass a finite fresh initialization")
    return fresh


@torch.no_grad()
def shrink_perturb(
    model: nn.Module,
    shrink: float = 0.4,
    noise: float = 0.1,
    generator: Optional[torch.Generator] = None,
    init: Union[None, nn.Module, Callable[[], nn.Module]] = None,
    norms: bool = True,
    bn_stats: str = "reset",
    exclude: Union[str, Iterable[str]] = (),
) -> ShrinkPerturbReport:
    """Shrink & Perturb (Ash & Adams, NeurIPS 2020): ``theta <- shrink * theta + noise * theta_init``.

    Applied to every trainable parameter (conv and linear weights and biases, the
    classifier, and with ``norms=True`` the norm layers' weight/bias), as the authors'
    reference code does. ``theta_init`` is a fresh initialization of the same network:

    - ``init=None``: each module's own ``reset_parameters()`` (PyTorch's default init of
      that layer type), run on a CPU float32 copy of the layer, seeded from ``generator``
      (a ``torch.Generator``; None: torch's global CPU RNG). Parameters whose module has
      no ``reset_parameters`` (e.g. timm layer-scale gammas) are only shrunk
      (``report.no_init``).
    - ``init=`` a freshly initialized model of the same architecture (or a callable
      returning one, called under ``generator``'s seed): its parameters, matched by name.
      Use this for the model's own init scheme (e.g. the trainer's seeded ``new_model``).

    Args:
        shrink: ``lambda`` in (0, 1]; 1 with ``noise=0`` leaves the model unchanged.
        noise: ``sigma`` >= 0, the scale of the fresh initialization added.
        norms: include the norm layers' affine weight/bias (fresh init: weight 1, bias 0,
            so ``gamma <- shrink * gamma + noise``, ``beta <- shrink * beta``).
        bn_stats: ``"reset"`` (running mean 0, var 1, batch count 0: the state of a fresh
            initialization, as in the authors' code, which returns the fresh network) or
            ``"keep"``.
        exclude: parameter-name prefixes to leave alone (e.g. ``"fc"`` for the classifier);
            a norm layer under an excluded prefix also keeps its running statistics.

    Frozen parameters (``requires_grad=False``) are left alone. dtype, device, memory
    format and train/eval mode are kept. NaN/Inf weights raise a one-line ValueError before
    anything changes.
    """
    shrink, noise = _check_shrink(shrink), _check_noise(noise)
    _check_choice("bn_stats", bn_stats, _BN_STATS)
    prefixes = _prefixes(exclude)
    net = _as_module(model)

    selected, skipped = _sp_selected(net, norms, prefixes)
    _check_finite_named([(n, p.detach()) for n, p in selected.items()], "model", "weight")

    report = ShrinkPerturbReport(shrink=shrink, noise=noise, source="reset_parameters" if init is None else "init",
                                 skipped=skipped)
    fresh: Dict[str, torch.Tensor] = {}
    if noise > 0 and selected:
        with _seeded(generator):
            if init is None:
                fresh, report.no_init = _fresh_from_reset(net, selected)
            else:
                fresh = _fresh_from_init(init, selected)

    for name, p in selected.items():
        p.mul_(shrink)
        eps = fresh.get(name)
        if eps is not None:
            add = eps.to(device=p.device, dtype=p.dtype) * noise
            p.add_(add)
            report.noise_std[name] = float(add.float().std()) if add.numel() > 1 else 0.0
        report.tensors.append(name)
        report.numel += p.numel()

    if bn_stats == "reset":
        for mname, m in net.named_modules():
            if (isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.running_mean is not None
                    and not _excluded(mname, prefixes)):
                m.reset_running_stats()
                report.bn_reset.append(mname)
    return report


# --------------------------------------------------------------------------- DASH
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


# --------------------------------------------------------------------------- trainer hook
def step_options(method: str, cfg: Any = None) -> Dict[str, Any]:
    """The options of ``method`` (``DEFAULTS``), overridden by the attributes of ``cfg`` that hold them.

    ``shrink-perturb``: ``cfg.sp_shrink`` -> ``shrink``, ``cfg.sp_noise`` -> ``noise``;
    ``dash``: ``cfg.dash_lam`` -> ``lam``, ``cfg.dash_alpha`` -> ``alpha``,
    ``cfg.dash_granularity`` -> ``granularity``. A config without such a field gets the default.
    """
    _check_choice("method", method, WARMSTART_METHODS)
    opts = dict(DEFAULTS[method])
    if cfg is not None:
        for opt, attr in _CONFIG_FIELDS[method].items():
            if hasattr(cfg, attr):
                opts[opt] = getattr(cfg, attr)
    return opts


def prepare_step(
    method: str,
    model: nn.Module,
    loader: Optional[Iterable] = None,
    *,
    cfg: Any = None,
    generator: Optional[torch.Generator] = None,
    init: Union[None, nn.Module, Callable[[], nn.Module]] = None,
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    amp: Optional[torch.dtype] = None,
    **options,
) -> Union[ShrinkPerturbReport, DashReport]:
    """Apply the warm-start operation of trainer method ``method`` to the incoming model, in place.

    Called once at the start of step k >= 2, before fine-tuning on the current data part:

    - ``"shrink-perturb"``: :func:`shrink_perturb` with ``generator`` and ``init`` (a fresh,
      seeded model of the same spec; None: per-layer ``reset_parameters``).
    - ``"dash"``: :func:`dash` on ``loader`` (the current part's training data, one pass,
      no augmentation), ``transform`` (normalization) and ``amp``.

    Options come from :func:`step_options` (``DEFAULTS`` overridden by ``cfg``'s fields),
    then from ``**options`` (e.g. ``shrink=0.6``).
    """
    opts = step_options(method, cfg)
    unknown = sorted(set(options) - set(opts) - _EXTRA_OPTIONS[method])
    if unknown:
        allowed = ", ".join(sorted(set(opts) | _EXTRA_OPTIONS[method]))
        raise ValueError(f"options: {unknown[0]!r} is not an option of {method} (allowed: {allowed})")
    opts.update(options)
    if method == "shrink-perturb":
        return shrink_perturb(model, generator=generator, init=init, **opts)
    if loader is None:
        raise ValueError("loader: dash needs the current data part's training batches, got None")
    return dash(model, loader, transform=transform, amp=amp, **opts)


_EXTRA_OPTIONS = {
    "shrink-perturb": {"norms", "bn_stats", "exclude"},
    "dash": {"bias", "loss_fn", "max_batches", "exclude"},
}
