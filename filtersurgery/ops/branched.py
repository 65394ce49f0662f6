"""``BranchedNet``: a base network and the branches :func:`~filtersurgery.ops.sharing.share` cut from it, run
as one model that computes the shared layers once per batch and combines the branches' predictions over all
classes (docs/method.md §6)."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Dict, Iterator, List, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_map

from filtersurgery.ops.sharing import SharePlan, _own_tensors, _pin, head_size, max_prob_combine, share_plan
from filtersurgery.tracing.scaling_map import unwrap

__all__ = ["BranchedNet"]


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
