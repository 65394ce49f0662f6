"""Shrink & Perturb (Ash & Adams, "On Warm-Starting Neural Network Training", NeurIPS 2020), applied to a
trained model before it is trained on new data: every selected parameter
``theta <- shrink * theta + noise * theta_init``, ``theta_init`` drawn like a fresh initialization of the
same network (docs/warmstart.md). The checks it shares with DASH are ``ops/warmstart.py``'s."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from filtersurgery.ops.warmstart import (_BN_STATS, _as_module, _check_choice, _check_finite_named, _check_noise,
                                         _check_shrink, _excluded, _prefixes)
from filtersurgery.tracing.norm_kinds import is_norm

__all__ = ["shrink_perturb", "ShrinkPerturbReport"]


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
            if is_norm(m):
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


