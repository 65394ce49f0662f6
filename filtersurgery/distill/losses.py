"""Distillation losses: attention transfer, KL/JS, AOD (eqs. 5-8), MSL (eq. 9), DML, LwM.

Equation numbers refer to the multistep-sparsity-training paper (docs/method.md §3, §4) unless
another paper is named. Conventions (docs/distillation.md):

- ``*_logits`` are raw logits ``(N, K)``; probabilities are ``softmax(logits / T)``.
- KL/JS terms use ``batchmean`` reduction (sum over classes, mean over the batch) and are
  multiplied by ``T**2`` (Hinton et al.), which is 1 at the default ``T = 1``.
- The *teacher* / *peer* side of a distillation term is detached: gradients flow only
  into the network being updated.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "attention_map",
    "at_loss",
    "kl_div",
    "js_div",
    "consistency_loss",
    "aod_weights",
    "aod_losses",
    "msl_loss",
    "dml_loss",
    "gradcam_map",
    "lwm_loss",
]

Feats = Union[Sequence[torch.Tensor], Mapping[str, torch.Tensor]]


def _check_T(T: float) -> float:
    if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
        raise ValueError(f"T: temperature must be a finite number > 0, got {T!r}")
    return float(T)


def _check_logits(name: str, x: torch.Tensor) -> None:
    if not torch.is_tensor(x) or x.dim() != 2:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name}: expected logits of shape (N, K), got {shape}")


def _check_pair(a: str, x: torch.Tensor, b: str, y: torch.Tensor) -> None:
    _check_logits(a, x)
    _check_logits(b, y)
    if x.shape != y.shape:
        raise ValueError(f"{b}: shape {tuple(y.shape)} does not match {a} {tuple(x.shape)}")


def _check_feature(name: str, x: torch.Tensor) -> None:
    if not torch.is_tensor(x) or x.dim() != 4:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name}: expected a feature map of shape (N, C, H, W), got {shape}")


# ---------------------------------------------------------------------------------------
# attention transfer (Zagoruyko & Komodakis 2017; docs/method.md §4)
# ---------------------------------------------------------------------------------------


def _match_spatial(a: torch.Tensor, b: torch.Tensor, resize: bool, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bring two ``(N, H, W)`` maps to one size: adaptive average pooling of the larger.

    Each dimension goes to the smaller of the two sizes (both maps are pooled when neither
    is larger in both dimensions). ``resize=False``: a size mismatch is an error.
    """
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    if not resize:
        raise ValueError(
            f"{what}: spatial sizes differ ({tuple(a.shape[-2:])} vs {tuple(b.shape[-2:])}) "
            "and resize=False"
        )
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    if a.shape[-2:] != size:
        a = F.adaptive_avg_pool2d(a.unsqueeze(1), size).squeeze(1)
    if b.shape[-2:] != size:
        b = F.adaptive_avg_pool2d(b.unsqueeze(1), size).squeeze(1)
    return a, b


def attention_map(x: torch.Tensor) -> torch.Tensor:
    """Spatial attention map ``normalize(x.pow(2).mean(1).flatten(1))`` of ``(N, C, H, W)``.

    The activation-based attention of Zagoruyko & Komodakis (their code's form, used by
    the AT term of eq. 9 / docs/method.md §4): channel mean of squared activations, flattened to
    ``(N, H*W)`` and L2-normalized per sample. Channel-free: any width gives the same size.
    """
    _check_feature("x", x)
    return F.normalize(x.pow(2).mean(1).flatten(1))


def _as_list(name: str, feats: Feats) -> Tuple[list, list]:
    if isinstance(feats, Mapping):
        return list(feats.keys()), list(feats.values())
    if torch.is_tensor(feats):
        return [0], [feats]
    if isinstance(feats, (list, tuple)):
        return list(range(len(feats))), list(feats)
    raise ValueError(f"{name}: expected a sequence or dict of feature maps, got {type(feats).__name__}")


def _pair_feats(feats_t: Feats, feats_s: Feats) -> list:
    kt, vt = _as_list("feats_t", feats_t)
    ks, vs = _as_list("feats_s", feats_s)
    if len(vt) != len(vs) or not vt:
        raise ValueError(f"feats_s: {len(vs)} blocks, feats_t has {len(vt)}; need the same number >= 1")
    if isinstance(feats_t, Mapping) and isinstance(feats_s, Mapping) and set(kt) == set(ks):
        return [(k, feats_t[k], feats_s[k]) for k in kt]  # same names: pair by name
    return [(f"block {i}", t, s) for i, (t, s) in enumerate(zip(vt, vs))]  # else by position


def at_loss(feats_t: Feats, feats_s: Feats, resize: bool = True) -> torch.Tensor:
    """Attention-transfer loss ``mean_i (a(x_T,i) - a(x_S,i)).pow(2).mean()`` (eq. 9's L_AT).

    ``feats_t`` / ``feats_s``: the teacher's / student's block outputs, as lists (paired by
    position) or dicts (paired by name when both have the same names, else by position),
    e.g. from :func:`filtersurgery.distill.capture_blocks`. Widths may differ (the map is
    channel-free); batch sizes must match. When a block's spatial sizes differ, the
    larger channel-mean map ``x.pow(2).mean(1)`` is adaptive-average-pooled to the smaller
    size before flattening and normalizing; ``resize=False`` makes that a ``ValueError``.
    The teacher side is detached: gradients flow into the student only.
    """
    pairs = _pair_feats(feats_t, feats_s)
    losses = []
    for key, t, s in pairs:
        _check_feature(f"feats_t[{key}]", t)
        _check_feature(f"feats_s[{key}]", s)
        if t.shape[0] != s.shape[0]:
            raise ValueError(f"feats_s[{key}]: batch size {s.shape[0]} != teacher's {t.shape[0]}")
        qt, qs = _match_spatial(t.detach().pow(2).mean(1), s.pow(2).mean(1), resize, f"feats_s[{key}]")
        a_t = F.normalize(qt.flatten(1))
        a_s = F.normalize(qs.flatten(1))
        losses.append((a_t - a_s).pow(2).mean())
    return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------
# divergences
# ---------------------------------------------------------------------------------------


def _kl_from_log(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(P || Q)`` from log-probabilities, batchmean."""
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def kl_div(p_teacher_logits: torch.Tensor, p_student_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """``KL(P_T || P_S) * T**2`` (eq. 9's first term; Hinton KD), batchmean.

    ``P = softmax(logits / T)``. The teacher is detached: the gradient flows into the
    student's logits only.
    """
    T = _check_T(T)
    _check_pair("p_teacher_logits", p_teacher_logits, "p_student_logits", p_student_logits)
    log_t = F.log_softmax(p_teacher_logits.detach() / T, dim=1)
    log_s = F.log_softmax(p_student_logits / T, dim=1)
    return _kl_from_log(log_t, log_s) * (T * T)


def js_div(p_logits: torch.Tensor, q_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Jensen-Shannon divergence ``JS(P || Q) * T**2`` (eq. 7's L_KD), batchmean.

    ``JS = KL(P || M) / 2 + KL(Q || M) / 2`` with ``M = (P + Q) / 2``; symmetric in value.
    ``p_logits`` belongs to the student being updated and gets the gradient; ``q_logits``
    (the peer) is detached (docs/method.md §3).
    """
    T = _check_T(T)
    _check_pair("p_logits", p_logits, "q_logits", q_logits)
    log_p = F.log_softmax(p_logits / T, dim=1)
    log_q = F.log_softmax(q_logits.detach() / T, dim=1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    return 0.5 * (_kl_from_log(log_p, log_m) + _kl_from_log(log_q, log_m)) * (T * T)


def consistency_loss(logits_flip: torch.Tensor, logits_color: torch.Tensor) -> torch.Tensor:
    """Consistency regularization ``L_CR = KL(P_F || P_C)`` (eq. 5), batchmean, T = 1.

    ``P_F`` / ``P_C``: the same student's softmax outputs on the flipped / colour-jittered
    view. Both views belong to the network being updated, so *both* sides get gradients
    (nothing is detached).
    """
    _check_pair("logits_flip", logits_flip, "logits_color", logits_color)
    return _kl_from_log(F.log_softmax(logits_flip, dim=1), F.log_softmax(logits_color, dim=1))


# ---------------------------------------------------------------------------------------
# adaptive online distillation (docs/method.md §3)
# ---------------------------------------------------------------------------------------


def aod_weights(ce1: torch.Tensor, ce2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Adaptive weights (eq. 6): ``W_KD^k = L_CE^k / (L_CE^1 + L_CE^2)``, detached.

    Returns ``(W_KD^1, W_KD^2)`` (they sum to 1) for non-negative losses; both 0.5 when
    both losses are 0.
    """
    ce1 = torch.as_tensor(ce1).detach()
    ce2 = torch.as_tensor(ce2).detach()
    ce1 = ce1 if ce1.is_floating_point() else ce1.float()
    ce2 = ce2 if ce2.is_floating_point() else ce2.float()
    if ce1.numel() != 1 or ce2.numel() != 1:
        raise ValueError("ce1, ce2: expected scalar losses")
    total = ce1 + ce2
    safe = torch.where(total > 0, total, torch.ones_like(total))  # no host sync
    half = torch.full_like(total, 0.5)
    return torch.where(total > 0, ce1 / safe, half), torch.where(total > 0, ce2 / safe, half)


def aod_losses(
    logits1_f: torch.Tensor,
    logits1_c: torch.Tensor,
    logits2_f: torch.Tensor,
    logits2_c: torch.Tensor,
    y: torch.Tensor,
    alpha: float = 0.5,
    T: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """The two students' AOD losses (eqs. 7-8), returns ``(L_1, L_2, parts)``.

    ``L_1 = W_KD^2 * L_CE^1 + W_KD^1 * L_KD^1 + alpha * L_CR^1`` and ``L_2`` symmetric, with
    ``L_CE^k`` on the flipped view ``B_F``, ``L_KD^1 = JS(P_1F || P_2F)`` (peer detached,
    temperature ``T``), ``L_CR^k = KL(P_kF || P_kC)`` (eq. 5) and the detached weights of
    eq. 6. ``L_1`` only has gradients into student 1's logits, ``L_2`` into student 2's,
    so ``(L_1 + L_2).backward()`` updates each with its own loss. ``parts`` holds the
    detached terms ``ce1 ce2 kd1 kd2 cr1 cr2 w1 w2``.
    """
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha: must be a finite number >= 0, got {alpha!r}")
    _check_pair("logits1_f", logits1_f, "logits1_c", logits1_c)
    _check_pair("logits1_f", logits1_f, "logits2_f", logits2_f)
    _check_pair("logits1_f", logits1_f, "logits2_c", logits2_c)
    ce1 = F.cross_entropy(logits1_f, y)
    ce2 = F.cross_entropy(logits2_f, y)
    w1, w2 = aod_weights(ce1, ce2)
    kd1 = js_div(logits1_f, logits2_f, T)
    kd2 = js_div(logits2_f, logits1_f, T)
    cr1 = consistency_loss(logits1_f, logits1_c)
    cr2 = consistency_loss(logits2_f, logits2_c)
    l1 = w2 * ce1 + w1 * kd1 + alpha * cr1
    l2 = w1 * ce2 + w2 * kd2 + alpha * cr2
    parts = {k: v.detach() for k, v in dict(ce1=ce1, ce2=ce2, kd1=kd1, kd2=kd2, cr1=cr1, cr2=cr2, w1=w1, w2=w2).items()}
    return l1, l2, parts


# ---------------------------------------------------------------------------------------
# multi-step loss (docs/method.md §4)
# ---------------------------------------------------------------------------------------


def msl_loss(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_feats: Feats,
    student_feats: Feats,
    at_weight: float = 1e3,
    T: float = 1.0,
    resize: bool = True,
) -> torch.Tensor:
    """Multi-step loss (eq. 9): ``KL(P_T || P_S) + at_weight * mean_i L_AT,i``.

    No cross-entropy (docs/method.md §4). ``at_weight`` (default 1e3, docs/method.md §4; the paper's eq. 9 is
    ``at_weight = 1``) scales the attention term, whose values are ~1e-3. The teacher is
    detached in both terms. The selective L1 penalty on the scaling factors is *not* part
    of this function: the Sparsifier adds its subgradient to the targets' gradients.
    """
    if not (isinstance(at_weight, (int, float)) and math.isfinite(at_weight) and at_weight >= 0):
        raise ValueError(f"at_weight: must be a finite number >= 0, got {at_weight!r}")
    return kl_div(teacher_logits, student_logits, T) + at_weight * at_loss(teacher_feats, student_feats, resize)


# ---------------------------------------------------------------------------------------
# baselines (docs/method.md §9)
# ---------------------------------------------------------------------------------------


def dml_loss(logits_i: torch.Tensor, logits_j: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Deep mutual learning (Zhang et al. 2018, their ``L_Theta_i``): ``CE_i + KL(p_j || p_i)``.

    ``logits_j`` (the peer) is detached: the gradient flows into student ``i`` only.
    """
    _check_pair("logits_i", logits_i, "logits_j", logits_j)
    return F.cross_entropy(logits_i, y) + kl_div(logits_j, logits_i)


def gradcam_map(
    features: torch.Tensor,
    logits: torch.Tensor,
    class_idx: torch.Tensor,
    create_graph: bool = False,
) -> torch.Tensor:
    """Grad-CAM map (Selvaraju et al. 2017, eqs. 1-2), L2-normalized and flattened.

    ``w_k = mean_{h,w} d logit_c / d A_k`` and ``map = relu(sum_k w_k A_k)`` for the class
    ``class_idx[n]`` of each sample; returns ``(N, H*W)`` rows of unit L2 norm (all-zero
    rows stay zero). ``features`` must be part of the graph that produced ``logits`` (for a
    frozen teacher, run its forward under ``torch.enable_grad()`` with an input that
    requires grad). ``create_graph=True`` keeps the map differentiable (incl. through the
    gradient), as LwM needs for the student; otherwise the map is detached.
    """
    _check_feature("features", features)
    _check_logits("logits", logits)
    class_idx = torch.as_tensor(class_idx, device=logits.device).long().reshape(-1)
    if class_idx.numel() != logits.shape[0]:
        raise ValueError(f"class_idx: expected {logits.shape[0]} class indices, got {class_idx.numel()}")
    if not (features.requires_grad and logits.requires_grad):
        raise ValueError(
            "features: not part of an autograd graph reaching logits (run the forward with "
            "grad enabled; for a frozen model give it an input with requires_grad=True)"
        )
    score = logits.gather(1, class_idx[:, None]).sum()
    (grads,) = torch.autograd.grad(score, features, create_graph=create_graph, retain_graph=True)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    feats = features if create_graph else features.detach()
    cam = F.relu((weights * feats).sum(1))
    return F.normalize(cam.flatten(1))


def lwm_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    y: torch.Tensor,
    student_feats,
    teacher_feats,
    beta: float = 1.0,
    gamma: float = 1.0,
    T: float = 1.0,
) -> torch.Tensor:
    """Learning without Memorizing (Dhar et al. 2019, their ``L_LwM``): ``CE + beta*KD + gamma*L_AD``.

    ``KD = KL(P_T || P_S) * T**2`` (teacher detached; docs/method.md §9). ``L_AD`` is the L1
    distance between the L2-normalized, flattened Grad-CAM maps (:func:`gradcam_map`) of
    teacher and student at the last block, both for the teacher's top class, summed over
    positions and averaged over the batch. The student's map is built with
    ``create_graph=True`` so ``L_AD`` back-propagates into the student (some public ports
    detach it, which silently zeroes the term); the teacher's map is detached.
    ``*_feats``: the last block's output tensor, or a list/dict of block outputs (the last
    one is used). Spatial sizes that differ are pooled to the smaller one, as in
    :func:`at_loss`.
    """
    for name, v in (("beta", beta), ("gamma", gamma)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name}: must be a finite number >= 0, got {v!r}")
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits)
    fs = _as_list("student_feats", student_feats)[1][-1]
    ft = _as_list("teacher_feats", teacher_feats)[1][-1]
    top = teacher_logits.detach().argmax(1)
    loss = F.cross_entropy(student_logits, y) + beta * kl_div(teacher_logits, student_logits, T)
    if gamma == 0:
        return loss
    m_t = gradcam_map(ft, teacher_logits, top, create_graph=False)
    m_s = gradcam_map(fs, student_logits, top, create_graph=True)
    if m_t.shape[1] != m_s.shape[1]:
        ht, wt = ft.shape[-2:]
        hs, ws = fs.shape[-2:]
        qt, qs = _match_spatial(m_t.view(-1, ht, wt), m_s.view(-1, hs, ws), True, "student_feats")
        m_t, m_s = F.normalize(qt.flatten(1)), F.normalize(qs.flatten(1))
    return loss + gamma * (m_t - m_s).abs().sum(1).mean()
