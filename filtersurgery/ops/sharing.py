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
import types
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from filtersurgery.tracing import probe
from filtersurgery.tracing.scaling_map import unwrap

__all__ = ["SharePlan", "plan_share", "share", "share_plan", "is_pinned", "branch_state_dict", "load_branch",
           "max_prob_combine", "head_size"]

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


def _call_events(model: nn.Module, example_inputs=None) -> Tuple[Dict[str, List[int]], Dict[str, List[int]]]:
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
    starts, ends = _call_events(net, example_inputs)
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
        raise ValueError("branch: not made by filtersurgery.sharing.share() (it has no share plan)")
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
