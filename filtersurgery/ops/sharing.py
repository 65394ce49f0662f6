"""Partial network sharing for new classes (docs/method.md §6; partial-network-sharing paper §3.3-3.4).

Class-incremental learning without forgetting: a base network is trained on the first
class set; for each later set a *branch* is cloned from it, the first ``share`` fraction
of its conv parameters (in forward order) is frozen and shared with the base, and the rest
is retrained on the new classes' data only. The updated network predicts over all classes
by the largest softmax probability of the concatenated branch outputs (paper §3.3, "by
generating prediction probabilities from each of the separately trained networks and
selecting the maximum probability").

* :func:`plan_share` decides what is shared (a :class:`SharePlan`, no model change);
* :func:`share` returns a trainable branch: a deep copy of the model whose shared part is
  frozen (``requires_grad=False``) and whose shared normalization layers are kept in eval
  mode even when the branch is put in ``train()`` (so their running statistics stay
  bit-identical); the user's model is not touched;
* :class:`BranchedNet` holds the shared trunk once and one branch per class set, computes
  the trunk once per input and combines the branches by max softmax probability
  (:func:`max_prob_combine`);
* :func:`training_cost` measures what sharing saves: training MACs per iteration (counted
  with ``torch.utils.flop_counter``; frozen layers need no weight gradient and, before the
  first trainable layer, no input gradient either), trainable parameters, time per
  iteration and peak memory.

What "the first ``share`` fraction of conv parameters in forward order" means here:
the *counted layers* are every conv (``nn.Conv1d/2d/3d``, transposed convs) and every
``nn.Linear`` except the classifier (timm's ConvNeXt MLPs are 1x1 convs written as
``Linear``), ordered by their first call in a forward pass. The shared layers are the
longest prefix of that order whose parameters are at most ``share`` of all counted
parameters (``share=0``: nothing shared, ``share=1``: everything but the classifier). The
*cut* is the first call of the first unshared counted layer (of the classifier when
``share=1``). Then

* frozen: every parameter and buffer owned directly by a module whose first call starts
  before the cut (the shared convs, their norms, and anything else computed before the cut);
* shared (computed once in a :class:`BranchedNet`): the outermost modules all of whose calls
  end before the cut;
* kept in eval mode: the shared modules and their descendants, and every frozen module that
  holds buffers (BatchNorm running statistics).
"""
from __future__ import annotations

import copy
import math
import contextlib
import os
import sys
import time
import types
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from filtersurgery.tracing import probe
from filtersurgery.tracing.scaling_map import unwrap

__all__ = [
    "SharePlan", "plan_share", "share", "share_plan", "is_pinned", "branch_state_dict", "load_branch",
    "BranchedNet", "max_prob_combine", "TrainingCost", "training_cost",
]

PLAN_ATTR = "_filtersurgery_share"  # where share() keeps the SharePlan on the branch
_PIN_ATTR = "_filtersurgery_pinned"
_COUNTED = (nn.modules.conv._ConvNd, nn.Linear)


# --------------------------------------------------------------------------- plan
@dataclass
class SharePlan:
    """What :func:`share` freezes and shares (module names are ``named_modules()`` names)."""

    share: float  # requested fraction of counted (conv) parameters
    shared_fraction: float  # achieved fraction: shared counted params / all counted params
    layers: List[str]  # counted layers (convs + non-classifier Linear) in forward order
    n_shared_layers: int  # the first n of ``layers`` are shared
    cut: str  # first unshared counted layer (the classifier when every layer is shared)
    classifier: str
    frozen: List[str]  # modules whose own parameters/buffers are frozen
    shared: List[str]  # outermost modules computed before the cut (the trunk)
    pinned: List[str]  # modules kept in eval mode
    counted_params: int
    shared_params: int

    def to_dict(self) -> Dict:
        """JSON-ready summary (long name lists left out)."""
        d = asdict(self)
        for k in ("layers", "frozen", "pinned"):
            d.pop(k)
        return d

    def __repr__(self) -> str:
        return (f"SharePlan(share={self.share}, shared {self.n_shared_layers}/{len(self.layers)} layers = "
                f"{100 * self.shared_fraction:.1f}% of conv params, cut at {self.cut!r}, classifier {self.classifier!r})")


def _example(net: nn.Module, example_inputs) -> tuple:
    if example_inputs is None:
        # the global RNG, as always: share() draws the new head right after, which must stay the same
        return (probe.example_input(net, generator=None),)
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def call_order(model: nn.Module, example_inputs=None) -> Tuple[Dict[str, List[int]], Dict[str, List[int]]]:
    """Start and end event numbers of every module call in one eval-mode forward pass.

    ``starts[name]`` / ``ends[name]`` list, per call of module ``name``, the positions of its
    forward pre-hook and forward hook in one global event sequence. Modes and values of the
    model are left as they were (no gradient, eval mode, restored afterwards). The default
    input (:func:`~filtersurgery.tracing.probe.default_input_size`) is drawn from the global RNG.
    """
    net = unwrap(model)
    inputs = _example(net, example_inputs)
    with probe.call_order(net) as order, probe.eval_mode(net), torch.no_grad():
        net(*inputs)
    return order.starts(), order.ends()


def _classifier_name(net: nn.Module, starts: Dict[str, List[int]]) -> str:
    mods = dict(net.named_modules())
    names = {id(m): n for n, m in mods.items()}
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    if isinstance(head, _COUNTED) and id(head) in names and names[id(head)] in starts:
        return names[id(head)]
    called = [n for n, m in mods.items() if isinstance(m, _COUNTED) and n in starts]
    if not called:
        raise ValueError("model: has no conv or linear layer to share (nothing ran in the forward pass)")
    return max(called, key=lambda n: starts[n][0])  # the last counted layer to run


def _own_tensors(m: nn.Module) -> List[torch.Tensor]:
    return list(m.parameters(recurse=False)) + [b for b in m.buffers(recurse=False) if b is not None]


def _check_share(share: float) -> float:
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= float(share) <= 1.0 or math.isnan(share):
        raise ValueError(f"share: must be a number in [0, 1], got {share!r}")
    return float(share)


def plan_share(model: nn.Module, share: float = 0.8, example_inputs=None) -> SharePlan:
    """Decide which part of ``model`` a branch shares (docs/method.md §6; module docstring for the rule).

    ``share``: fraction in ``[0, 1]`` of the counted (conv) parameters to share, taken as the
    longest forward-order prefix of counted layers not exceeding it. ``example_inputs``: a
    tensor or tuple for the forward pass that records the call order (default
    ``(1, *default_input_size(model))``; pass one of your data's shape when it differs).
    """
    share = _check_share(share)
    net = unwrap(model)
    if not isinstance(net, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    starts, ends = call_order(net, example_inputs)
    mods = dict(net.named_modules())
    classifier = _classifier_name(net, starts)
    layers = sorted((n for n, m in mods.items() if isinstance(m, _COUNTED) and n in starts and n != classifier
                     and not n.startswith(classifier + ".")), key=lambda n: starts[n][0])
    sizes = [sum(p.numel() for p in mods[n].parameters(recurse=False)) for n in layers]
    total = sum(sizes)
    if total == 0:
        raise ValueError("model: no conv layer (other than the classifier) ran in the forward pass; nothing to share")
    k, cum = 0, 0
    for s in sizes:
        if cum + s > share * total * (1 + 1e-9):
            break
        cum += s
        k += 1
    cut_name = layers[k] if k < len(layers) else classifier
    cut = starts[cut_name][0]
    frozen = [n for n, m in mods.items() if n in starts and starts[n][0] < cut and _own_tensors(m)
              and n != classifier]
    inside = {n for n in mods if n and n in ends and max(ends[n]) < cut}
    shared = [n for n in inside if not any(a in inside for a in _ancestors(n))]
    shared.sort(key=lambda n: starts[n][0])
    pinned = {n for n in mods if any(n == s or n.startswith(s + ".") for s in shared)}
    pinned |= {n for n in frozen if list(mods[n].buffers(recurse=False))}
    order = {n: i for i, n in enumerate(mods)}
    return SharePlan(share=share, shared_fraction=cum / total, layers=layers, n_shared_layers=k, cut=cut_name,
                     classifier=classifier, frozen=frozen, shared=shared, pinned=sorted(pinned, key=order.get),
                     counted_params=total, shared_params=cum)


def _ancestors(name: str) -> Iterator[str]:
    while "." in name:
        name = name.rpartition(".")[0]
        yield name


# --------------------------------------------------------------------------- pinning
def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` of a pinned module: stays (with its children) in eval mode."""
    self.training = False
    for c in self.children():
        c.train(False)
    return self


def _pin(m: nn.Module) -> None:
    m.train = types.MethodType(_eval_only_train, m)
    setattr(m, _PIN_ATTR, True)
    m.training = False


def is_pinned(module: nn.Module) -> bool:
    """True when ``module`` is kept in eval mode by :func:`share` / :class:`BranchedNet`."""
    return bool(module.__dict__.get(_PIN_ATTR, False))


# --------------------------------------------------------------------------- branches
def _replace_module(net: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, attr, new)


def _new_head(old: nn.Module, num_classes: int) -> nn.Module:
    w = old.weight
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    elif isinstance(old, nn.Conv2d):
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding, old.dilation,
                        bias=old.bias is not None, padding_mode=old.padding_mode)
    else:
        raise ValueError(f"num_classes: cannot resize a classifier of type {type(old).__name__} (Linear or Conv2d only)")
    return new.to(device=w.device, dtype=w.dtype)


def head_size(model: nn.Module, plan: Optional[SharePlan] = None) -> Optional[int]:
    """Number of outputs of the classifier of ``model`` (``None`` when it cannot be read)."""
    net = unwrap(model)
    plan = plan or getattr(net, PLAN_ATTR, None)
    if plan is None:
        return None
    head = net.get_submodule(plan.classifier)
    return getattr(head, "out_features", getattr(head, "out_channels", None))


def share(model: nn.Module, share: float = 0.8, num_classes: Optional[int] = None, example_inputs=None) -> nn.Module:
    """A branch of ``model`` that shares its first ``share`` of conv parameters (docs/method.md §6).

    Returns a deep copy of ``model`` (the model itself is not modified) in which the shared
    part (:func:`plan_share`) is frozen and its norms are kept in eval mode, so training the
    branch leaves the shared parameters and BatchNorm statistics bit-identical to
    ``model``'s. ``num_classes``: give the branch a fresh classifier with that many outputs
    (the new class set); ``None`` keeps the cloned one. The rest of the network is cloned
    from ``model`` (paper §3.2: cloning maximizes the transfer of learned features).
    The plan is available as :func:`share_plan(branch) <share_plan>`.
    """
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes: must be an integer >= 1, got {num_classes!r}")
    from filtersurgery.ops.checks import check_finite

    check_finite(model)
    plan = plan_share(model, share, example_inputs)
    branch = copy.deepcopy(unwrap(model))
    mods = dict(branch.named_modules())
    for n in plan.frozen:
        for p in mods[n].parameters(recurse=False):
            p.requires_grad_(False)
    for n in plan.shared:  # parameters inside shared subtrees (owned by descendants) too
        for p in mods[n].parameters():
            p.requires_grad_(False)
    for n in plan.pinned:
        _pin(mods[n])
    if num_classes is not None:
        _replace_module(branch, plan.classifier, _new_head(mods[plan.classifier], num_classes))
        if isinstance(getattr(branch, "num_classes", None), int):
            branch.num_classes = num_classes  # timm models keep it as an attribute
    setattr(branch, PLAN_ATTR, plan)
    return branch


_make_branch = share  # for functions whose ``share`` argument shadows the function


def share_plan(branch: nn.Module) -> SharePlan:
    """The :class:`SharePlan` of a branch made by :func:`share`."""
    plan = getattr(unwrap(branch), PLAN_ATTR, None)
    if plan is None:
        raise ValueError("branch: not made by filtersurgery.share() (it has no share plan)")
    return plan


def _in_shared(key: str, shared: Sequence[str]) -> bool:
    return any(key.startswith(s + ".") for s in shared)


def branch_state_dict(branch: nn.Module) -> Dict[str, torch.Tensor]:
    """The branch's own tensors: its ``state_dict`` without the shared modules' entries.

    What a branch adds to storage; load it back with :func:`load_branch`.
    """
    plan = share_plan(branch)
    return {k: v for k, v in unwrap(branch).state_dict().items() if not _in_shared(k, plan.shared)}


def load_branch(base: nn.Module, state_dict: Dict[str, torch.Tensor], share: float, num_classes: Optional[int] = None,
                example_inputs=None) -> nn.Module:
    """Rebuild a branch from ``base`` and a :func:`branch_state_dict` (strict on the branch's own keys)."""
    branch = _make_branch(base, share, num_classes, example_inputs)
    plan = share_plan(branch)
    own = set(branch_state_dict(branch))
    missing = sorted(own - set(state_dict))
    unexpected = sorted(set(state_dict) - own)  # incl. entries of modules this plan shares with the base
    if missing or unexpected:
        bad = (missing or unexpected)[0]
        raise ValueError(f"state_dict: does not match a branch with share={share} "
                         f"({'missing' if missing else 'unexpected'} key {bad!r})")
    branch.load_state_dict(state_dict, strict=False)
    return branch


# --------------------------------------------------------------------------- combination
def max_prob_combine(outputs: Sequence[torch.Tensor], class_sets: Sequence[Sequence[int]],
                     num_classes: Optional[int] = None) -> torch.Tensor:
    """Per-class log-probabilities of the updated network (paper §3.3).

    ``outputs[i]``: logits ``[B, len(class_sets[i])]`` of branch ``i``; column ``j`` is class
    ``class_sets[i][j]``. Each branch's softmax is taken separately and the results are
    scattered to their classes, so ``argmax`` of the result is the class with the largest
    softmax probability over the concatenated branch outputs. Classes no branch covers get
    ``-inf``. Returns ``[B, num_classes]`` (default ``max(class id) + 1``), float32.
    """
    if len(outputs) != len(class_sets) or not outputs:
        raise ValueError(f"outputs: need one output per class set ({len(class_sets)}), got {len(outputs)}")
    ids = [c for s in class_sets for c in s]
    n = max(ids) + 1 if num_classes is None else num_classes
    if len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= n:
        raise ValueError(f"class_sets: must be disjoint class ids in [0, {n}), got {list(map(list, class_sets))}")
    ref = outputs[0]
    out = torch.full((ref.shape[0], n), float("-inf"), device=ref.device, dtype=torch.float32)
    for o, s in zip(outputs, class_sets):
        if o.dim() != 2 or o.shape[1] != len(s):
            raise ValueError(f"outputs: a branch for {len(s)} classes must give [B, {len(s)}] logits, got {tuple(o.shape)}")
        out[:, torch.as_tensor(list(s), device=ref.device)] = F.log_softmax(o.float(), dim=1)
    return out


def _clone(tree):
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


class BranchedNet(nn.Module):
    """The updated network: one shared trunk, one branch per class set, max-probability prediction.

    ``BranchedNet(base, classes)`` holds a copy of the trained base network (branch 0, for
    the class ids ``classes``); :meth:`add_branch` adds a branch made by :func:`share` from a
    model equal to ``base`` in its shared part (checked, bit for bit). Each branch's shared
    modules are the trunk's own modules (stored once: ``sum(p.numel() for p in
    net.parameters())`` counts them once), and in :meth:`forward` the trunk runs once: the
    outputs of the shared modules recorded during the base's forward pass are replayed in
    each branch instead of recomputing them.

    ``forward(x)`` returns ``[B, num_classes]`` per-class log-probabilities
    (:func:`max_prob_combine`), so ``argmax`` is the paper's prediction and
    :func:`filtersurgery.train.evaluate` works unchanged. :meth:`branch_outputs` gives each
    branch's logits. All parameters held are frozen (``requires_grad=False``) and the shared
    trunk is kept in eval mode: train branches before adding them.
    """

    def __init__(self, base: nn.Module, classes: Sequence[int]):
        super().__init__()
        self.trunk = copy.deepcopy(unwrap(base))
        self.trunk.requires_grad_(False)
        self.branches = nn.ModuleList()
        self.class_sets: List[List[int]] = [self._check_classes(classes, "classes")]
        self.shared_names: List[List[str]] = []
        self.plans: List[SharePlan] = []

    def _check_classes(self, classes: Sequence[int], arg: str) -> List[int]:
        try:
            ids = [int(c) for c in classes]
        except (TypeError, ValueError):
            raise ValueError(f"{arg}: must be a sequence of class ids (ints >= 0), got {classes!r}") from None
        taken = {c for s in getattr(self, "class_sets", []) for c in s}
        if not ids or min(ids) < 0 or len(set(ids)) != len(ids) or taken & set(ids):
            raise ValueError(f"{arg}: must be distinct class ids >= 0 not used by another branch, got {ids}")
        return ids

    @property
    def num_classes(self) -> int:
        """Largest class id over all branches + 1 (the width of :meth:`forward`'s output)."""
        return max(c for s in self.class_sets for c in s) + 1

    def add_branch(self, branch: nn.Module, classes: Sequence[int]) -> "BranchedNet":
        """Add a trained branch (from :func:`share`) for the class ids ``classes``.

        The branch's frozen part must equal the trunk's bit for bit (else ``ValueError``).
        The branch is copied with its shared modules replaced by the trunk's own modules.
        """
        plan = share_plan(branch)
        ids = self._check_classes(classes, "classes")
        n_out = head_size(branch, plan)
        if n_out is not None and n_out != len(ids):
            raise ValueError(f"classes: the branch has {n_out} outputs but {len(ids)} class ids were given")
        src = unwrap(branch)
        t_mods, b_mods = dict(self.trunk.named_modules()), dict(src.named_modules())
        check = set(plan.frozen) | {n for n in b_mods if any(n == s or n.startswith(s + ".") for s in plan.shared)}
        for n in sorted(check):
            if n not in t_mods:
                raise ValueError(f"branch: its shared module {n!r} does not exist in the trunk (another architecture?)")
            a, b = _own_tensors(t_mods[n]), _own_tensors(b_mods[n])
            if len(a) != len(b) or any(x.shape != y.shape or not torch.equal(x.to(y.device), y) for x, y in zip(a, b)):
                raise ValueError(f"branch: its shared module {n!r} differs from the trunk's; a branch must be trained "
                                 f"with its shared part frozen, from the same base")
        memo = {id(b_mods[n]): t_mods[n] for n in plan.shared}
        new = copy.deepcopy(src, memo)
        new.requires_grad_(False)
        for n in plan.pinned:
            if any(n == s or n.startswith(s + ".") for s in plan.shared):
                _pin(t_mods[n])
        self.branches.append(new)
        self.class_sets.append(ids)
        self.shared_names.append(list(plan.shared))
        self.plans.append(plan)
        return self

    def branch_outputs(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Logits of every branch (base first), the shared trunk computed once."""
        if not self.branches:
            return [self.trunk(x)]
        names = sorted({n for s in self.shared_names for n in s})
        with _record(self.trunk, names) as cache:
            outs = [self.trunk(x)]
        for br, shared in zip(self.branches, self.shared_names):
            with _replay(self.trunk, shared, cache):
                outs.append(br(x))
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-class log-probabilities ``[N, num_classes]`` (:func:`max_prob_combine` of the branches)."""
        return max_prob_combine(self.branch_outputs(x), self.class_sets, self.num_classes)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class ids (max softmax probability over all branches)."""
        return self(x).argmax(1)


@contextmanager
def _record(net: nn.Module, names: Sequence[str]) -> Iterator[Dict[str, List]]:
    """Copies of the outputs of every call of modules ``names`` during the forward passes inside."""
    cache: Dict[str, List] = {n: [] for n in names}
    handles = [net.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: cache[n].append(_clone(o)))
               for n in names]
    try:
        yield cache
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _replay(net: nn.Module, names: Sequence[str], cache: Dict[str, List]) -> Iterator[None]:
    """Make modules ``names`` return their recorded outputs, in call order, instead of computing."""
    saved = []
    for n in names:
        m = net.get_submodule(n)
        queue = iter(cache[n])

        def forward(*args, _q=queue, _n=n, **kwargs):
            try:
                return _clone(next(_q))
            except StopIteration:
                raise RuntimeError(f"BranchedNet: shared module {_n!r} was called more often in a branch than in the "
                                   f"trunk (data-dependent control flow is not supported)") from None

        saved.append((m, "forward" in m.__dict__, m.__dict__.get("forward")))
        m.forward = forward
    try:
        yield
    finally:
        for m, had, old in reversed(saved):
            if had:
                m.forward = old
            else:
                del m.forward


# --------------------------------------------------------------------------- cost model
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
                  iters: int = 10, warmup: int = 2, measure: bool = True) -> TrainingCost:
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
    BatchNorm statistics and its modes are untouched.
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
