"""Reliability: operations never corrupt a model; mixed precision and channels_last.

After every operation (``sparsify`` + ``step``, ``rescale``, ``rank_filters``,
``reactivate_kernels``, ``share``) the outputs are finite and the dtype, device, memory
format, train/eval mode and requires_grad flags of the model are unchanged; a model with
NaN/Inf scaling factors makes the operations raise one line naming the first bad factor
and leaves the model as it was. ``Sparsifier.step`` works under bf16 autocast and with an
fp16 ``GradScaler`` (subgradient added to the unscaled gradients), and the trainer runs a
phase with ``amp='bf16'`` and with ``channels_last=True`` on the CPU.
"""
import copy
import re

import pytest
import torch
import torch.nn.functional as F

import filtersurgery as fs
from filtersurgery import train
from filtersurgery.models.cifar_resnet import cifar_resnet
from filtersurgery.data import load_dataset
from filtersurgery.ops.checks import check_finite
from filtersurgery.ops.ranking import factor_view, useless_mask

torch.set_num_threads(1)

LAM = 1e-2  # large enough that the added subgradient is far above float32 round-off


def tiny(dtype=torch.float32, channels_last=False, training=True, seed=0):
    torch.manual_seed(seed)
    m = cifar_resnet(8, num_classes=4, in_chans=3).to(dtype)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    with torch.no_grad():  # spread the gammas so rankings and Dri have something to do
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.05, 1.5)
                mod.bias.uniform_(-0.1, 0.1)
    return m.train(training)


def batch(model, n=4, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    p = next(model.parameters())
    x = torch.randn(n, 3, size, size, generator=g).to(p.dtype)
    if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous():
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.arange(n) % 4


def snapshot(model):
    """What an operation must not change: dtypes, devices, layouts, modes, requires_grad."""
    def layout(t):
        if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
            return "channels_last"
        return "contiguous" if t.is_contiguous() else "strided"

    return {
        "tensors": {n: (t.dtype, t.device, layout(t)) for n, t in list(model.named_parameters()) + list(model.named_buffers())},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before, model):
    after = model.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


def assert_finite_outputs(model):
    net = copy.deepcopy(model)  # a train-mode forward would update the running stats
    x, _ = batch(net)
    with torch.no_grad():
        out = net(x)
    assert out.dtype == next(model.parameters()).dtype
    assert torch.isfinite(out.float()).all()


# ------------------------------------------------------------------ operations
def op_sparsify_step(model):
    before = state(model)
    sp = fs.sparsify(model, target_r=0.3, epochs=3, lam=LAM)
    assert not changed(before, model)  # tracing and target selection change nothing
    x, y = batch(model)
    loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    sp.step()
    grads = [p.grad for p in sp.factors.params]
    assert all(g is not None and torch.isfinite(g.float()).all() for g in grads)
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    model.zero_grad(set_to_none=True)
    return {"weights", "running"}  # a training step changes weights and (train mode) BN stats


def op_rescale(model):
    rep = fs.rescale(model, target_r=0.3, I=0.1, generator=torch.Generator().manual_seed(0))
    assert len(rep) > 0 and bool(torch.all(rep.new > 0))
    return {"gammas"}


def op_rank(model):
    rk = fs.rank_filters(model)
    assert len(rk) == factor_view(model).numel
    return set()


def op_reactivate(model):
    rep = fs.reactivation.reactivate_kernels(model, alpha=0.5, beta=0.5, gamma=0.5)
    assert rep.kernels > 0
    return {"convs"}


def op_share(model):
    branch = fs.sharing.share(model, 0.5, num_classes=3, example_inputs=batch(model)[0][:1])
    snap_b = snapshot(branch)
    ref = snapshot(model)
    for k, v in snap_b["tensors"].items():
        if not k.startswith("fc."):
            assert v == ref["tensors"][k], k  # same dtype / device / layout as the source
    assert snap_b["tensors"]["fc.weight"][:2] == ref["tensors"]["fc.weight"][:2]
    for n, t in snap_b["training"].items():  # pinned (shared) parts are eval, the rest as the source
        if n != "fc":  # the fresh head is a new nn.Linear (train mode; no mode-dependent behaviour)
            assert t == (ref["training"][n] and not fs.sharing.is_pinned(branch.get_submodule(n))), n
    assert_finite_outputs(branch)
    return set()


OPS = {"sparsify+step": op_sparsify_step, "rescale": op_rescale, "rank_filters": op_rank,
       "reactivate_kernels": op_reactivate, "share": op_share}
CONFIGS = {"fp32-train": (torch.float32, False, True), "fp32-channels_last-eval": (torch.float32, True, False),
           "bf16-channels_last-train": (torch.bfloat16, True, True)}


def allowed_keys(kinds, model):
    keys = set()
    for n, m in model.named_modules():
        pre = f"{n}." if n else ""
        if isinstance(m, torch.nn.BatchNorm2d):
            if "gammas" in kinds or "weights" in kinds:
                keys |= {pre + "weight", pre + "bias"}
            if "running" in kinds:
                keys |= {pre + "running_mean", pre + "running_var", pre + "num_batches_tracked"}
        elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and ("convs" in kinds or "weights" in kinds):
            keys |= {pre + "weight", pre + "bias"}
    return keys


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("op", OPS)
def test_op_never_corrupts_model(op, config):
    dtype, cl, training = CONFIGS[config]
    model = tiny(dtype, cl, training)
    before_snap, before = snapshot(model), state(model)
    kinds = OPS[op](model)
    assert snapshot(model) == before_snap  # dtype, device, memory format, modes, requires_grad
    diff = changed(before, model)
    assert diff <= allowed_keys(kinds, model), sorted(diff - allowed_keys(kinds, model))[:5]
    if kinds - {"running"}:
        assert diff, f"{op} changed nothing"
    assert all(torch.isfinite(v.float()).all() for v in model.state_dict().values() if v.is_floating_point())
    assert_finite_outputs(model)


def test_reactivate_fp16_model_with_tiny_kernel_stays_finite():
    model = tiny(torch.float16, training=False)
    with torch.no_grad():
        w = model.layer1[0].conv1.weight
        w[0] *= 0.01  # a low-importance filter (C1 and C2) ...
        w[0, 0] = 2e-6  # ... holding a kernel with L1 1.8e-5 (representable in fp16)
        w[0, 1] = 0.2  # and a best kernel with L1 1.8: ratio 1e5 > fp16 max 65504
    assert fs.reactivation.reactivate_kernels(model, alpha=0.05, beta=0.1, gamma=0.1).kernels > 0
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w[0, 0].float().abs().sum(), w[0, 1].float().abs().sum(), rtol=1e-2, atol=0)


def test_rescale_changes_only_useless_gammas_and_keeps_bias():
    model = tiny()
    before = state(model)
    useless = useless_mask(model, 0.3)
    fv = factor_view(model)
    g0 = fv.gammas().clone()
    fs.rescale(model, 0.3, 0.1, generator=torch.Generator().manual_seed(1))
    g1 = fv.gammas()
    assert torch.equal(g0[~useless], g1[~useless])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if not k.endswith(".weight") or "conv" in k)


# --------------------------------------------------------------- NaN / Inf gammas
def _poison(model, value=float("nan"), where=("layer1.0.bn1", 5)):
    with torch.no_grad():
        model.get_submodule(where[0]).weight[where[1]] = value
    return f"{where[0]}.weight[{where[1]}]"


NAN_OPS = {
    "rank_filters": lambda m: fs.rank_filters(m),
    "rescale": lambda m: fs.rescale(m, 0.3, 0.1),
    "sparsify": lambda m: fs.sparsify(m, 0.3),
    "useless_mask": lambda m: useless_mask(m, 0.3),
    "check_finite": lambda m: check_finite(m),
    "reactivate_kernels": lambda m: fs.reactivation.reactivate_kernels(m, 0.5, 0.5, 0.5),
    "share": lambda m: fs.sharing.share(m, 0.5),
}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("op", NAN_OPS)
def test_nonfinite_gammas_raise_one_line(op, value, request):
    model = tiny()
    where = _poison(model, value)
    before = state(model)
    try:
        NAN_OPS[op](model)
    except ValueError as e:
        msg = str(e)
    else:
        raise AssertionError(f"{op} accepted a model with a NaN/Inf scaling factor")
    assert "\n" not in msg
    assert msg.startswith("model: 1 scaling factor is NaN/Inf (first: ") and f"(first: {where})" in msg, msg
    after = model.state_dict()  # nothing was modified
    assert all(torch.equal(torch.nan_to_num(before[k]), torch.nan_to_num(after[k])) for k in before)


def test_nonfinite_count_and_conv_weights():
    model = tiny()
    _poison(model, float("nan"), ("layer1.0.bn2", 3))
    _poison(model, float("inf"), ("layer2.0.bn1", 0))
    with pytest.raises(ValueError, match=r"^model: 2 scaling factors are NaN/Inf \(first: layer1\.0\.bn2\.weight\[3\]\)"):
        fs.rank_filters(model)
    model = tiny()
    with torch.no_grad():
        model.layer1[0].conv2.weight[2, 1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^model: 1 conv weight is NaN/Inf \(first: layer1\.0\.conv2\.weight\[2, 1, 0, 2\]\)"):
        check_finite(model)
    check_finite(tiny())  # a finite model passes


def test_sparsifier_set_epoch_stops_on_diverged_gammas():
    model = tiny()
    sp = fs.sparsify(model, 0.3, epochs=4, lam=LAM)
    sp.set_epoch(1)
    where = _poison(model)
    with pytest.raises(ValueError, match="^" + re.escape(f"model: 1 scaling factor is NaN/Inf (first: {where})")):
        sp.set_epoch(2)
    assert sp.epoch == 1 and sp.history[-1]["epoch"] == 1  # the schedule did not advance on bad gammas


def test_train_sparse_stops_on_non_finite_loss():
    model = tiny()
    x, y = batch(model)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^loss: non-finite"):
        fs.sparsify(model, 0.3, epochs=1, loader=[(x, y)])


def test_sparsifier_follows_model_cast_after_construction():
    model = tiny()
    sp = fs.sparsify(model, 0.3, lam=LAM)
    model.to(torch.float64)
    x, y = batch(model)
    F.cross_entropy(model(x), y).backward()
    g0 = [p.grad.clone() for p in sp.factors.params]
    sp.step()
    assert all(p.grad.dtype == torch.float64 for p in sp.factors.params)
    assert any(not torch.equal(a, p.grad) for a, p in zip(g0, sp.factors.params))


# ------------------------------------------------------------------ mixed precision
def _expected_delta(sp):
    """``lam * scale * sign(gamma)`` on the targets, 0 elsewhere, per norm weight (scale: the factor's
    norm scale in the default per-norm units)."""
    fv = sp.factors
    masks = fv.masks_from_flat(sp.targets.to(torch.float32) * sp.scales.float())
    return [sp.config.lam * torch.sign(p.detach().float()) * m for p, m in zip(fv.params, masks)]


def test_step_under_bf16_autocast():
    model = tiny()
    sp = fs.sparsify(model, 0.3, lam=LAM)
    x, y = batch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    F.cross_entropy(out.float(), y).backward()
    g0 = [p.grad.clone() for p in sp.factors.params]
    sp.step()
    for p, g, d in zip(sp.factors.params, g0, _expected_delta(sp)):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad - g, d, atol=1e-7, rtol=0)
    assert int(sp.targets.sum()) > 0


def test_step_with_fp16_grad_scaler_after_unscale():
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.Conv2d(1, 1, 1)(torch.ones(1, 1, 1, 1))
    except (RuntimeError, ValueError, TypeError) as e:  # pragma: no cover - older torch
        pytest.skip(f"fp16 autocast / GradScaler('cpu') not supported by this torch: {e}")
    model = tiny()
    sp = fs.sparsify(model, 0.3, lam=LAM)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # no momentum / wd: the update is -lr * grad
    x, y = batch(model)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(x).float(), y)
    scaler.scale(loss).backward()
    scaled = [p.grad.clone() for p in sp.factors.params]
    scaler.unscale_(opt)
    unscaled = [p.grad.clone() for p in sp.factors.params]
    for s, u in zip(scaled, unscaled):
        torch.testing.assert_close(s / scaler.get_scale(), u)
    sp.step()  # after unscale_: the subgradient is not divided by the scale
    delta = _expected_delta(sp)
    for p, u, d in zip(sp.factors.params, unscaled, delta):
        torch.testing.assert_close(p.grad - u, d, atol=1e-6, rtol=0)
    before = [p.detach().clone() for p in sp.factors.params]
    scaler.step(opt)
    scaler.update()
    for p, b, u, d in zip(sp.factors.params, before, unscaled, delta):
        torch.testing.assert_close(p.detach(), b - 0.1 * (u + d), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ the trainer
@pytest.fixture(scope="module")
def demo():
    return load_dataset("demo", subset_test=40)


@pytest.mark.parametrize("amp,channels_last", [("bf16", False), ("none", True), ("bf16", True), ("fp16", True)])
def test_trainer_sst_phase_amp_and_channels_last(demo, tmp_path, amp, channels_last):
    cfg = train.TrainConfig(model="cifar:resnet20", data="demo", steps=2, epochs=1, subset=40, batch_size=16,
                            max_batches=2, device="cpu", amp=amp, channels_last=channels_last, progress=False)
    run = train.Run(cfg, 0, tmp_path, demo)
    run.work.mkdir(parents=True, exist_ok=True)
    assert run.amp == {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
    model = run.new_model()
    seen = []
    conv = model.layer1[0].conv1
    h = conv.register_forward_hook(lambda m, a, o: seen.append(
        (o.shape[0], o.dtype, o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous(),
         torch.is_grad_enabled())))
    before = state(model)
    try:
        out, _ = train.run_phase(run, 2, train.SST("sst", [0], 0.1, 1), model)
    finally:
        h.remove()
    # training forwards (not the trace, the validation or the BN statistics' re-estimate, which run without grad)
    batches = [s for s in seen if s[0] == cfg.batch_size and s[3]]
    assert len(batches) == 2
    refresh = [s for s in seen if s[0] == cfg.batch_size and not s[3]]
    assert len(refresh) == 2 and all(s[2] == channels_last for s in refresh)  # 32 of the 40 images, batches of 16
    assert all(s[1] == (run.amp or torch.float32) for s in batches)  # autocast was on in training
    assert all(s[2] == channels_last for s in batches)  # activations stayed channels_last
    assert out.training and next(out.parameters()).dtype == torch.float32  # master weights stay fp32
    w = out.layer1[0].conv1.weight
    assert (w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()) == channels_last
    assert changed(before, out), "nothing was trained"
    assert all(torch.isfinite(v.float()).all() for v in out.state_dict().values() if v.is_floating_point())
    assert (tmp_path / ".work" / "step2_sst.safetensors").exists()
