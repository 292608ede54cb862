"""MDEQ: presets against the issue's table, parameter counts against a closed form,
f against a naive re-computation, the equilibrium against the unrolled network,
implicit gradients against backprop through it, segmentation loss against a
hand-written one, and a tiny model that learns."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deqray.core import broyden, register_solver, solvers
from deqray.models import build, make_config, presets
from deqray.models.mdeq import MDEQConfig, branch_sizes

MDEQ_PRESETS = [p for p in presets() if p.startswith("mdeq-")]


def small(name: str, **overrides) -> MDEQConfig:
    """A preset with its structure (branches, downsampling, head, task) but narrow."""
    cfg = make_config(name)
    n = len(cfg.channels)
    narrow = {"channels": [8, 16, 16, 32][:n]}
    if cfg.task == "classification":
        narrow |= {"head_channels": [2, 2, 4, 4][:n], "final_channels": 16}
    return dataclasses.replace(cfg, **{**narrow, **overrides})


def contractive(model: nn.Module, eps: float = 1.0) -> nn.Module:
    """Make f a contraction (rho(J) ~ 0.6 here) by giving its GroupNorms a large eps.

    A freshly initialised MDEQ is not contractive (rho ~ 2): the paper's models
    reach approximate equilibria only. Tests that compare against the unrolled
    network need one that provably converges; the code path is unchanged.
    """
    for m in model.deq.f.modules():
        if isinstance(m, nn.GroupNorm):
            m.eps = eps
    return model


def images(batch=2, size=(16, 16), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=g).to(dtype)


# ------------------------------------------------------------------ presets and counts

# The issue's table: branch channels / head channels / final / expansion / groups /
# pretraining layers / dropout / f_thres / b_thres / stop mode / downsampling / classes.
# fmt: off
TABLE = {
    "mdeq-cifar-tiny": ([24, 24], [8, 16], 200,
                        5, 8, 10, 0.25, 18, 20, "rel", 0, 10),
    "mdeq-cifar-large": ([32, 64, 128, 256], [14, 28, 56, 112], 1680,
                         5, 8, 10, 0.3, 18, 20, "rel", 0, 10),
    "mdeq-imagenet-small": ([32, 64, 128, 256], [24, 48, 96, 192], 2048,
                            5, 8, 5, 0.0, 26, 27, "abs", 2, 1000),
    "mdeq-imagenet-large": ([80, 160, 320, 640], [32, 64, 128, 256], 2048,
                            5, 8, 4, 0.0, 26, 27, "abs", 2, 1000),
    "mdeq-imagenet-xl": ([88, 176, 352, 704], [32, 64, 128, 256], 2048,
                         6, 8, 4, 0.0, 26, 27, "abs", 2, 1000),
}
# fmt: on
SEG_WIDTHS = {
    "small": "mdeq-imagenet-small",
    "large": "mdeq-imagenet-large",
    "xl": "mdeq-imagenet-xl",
}

# Parameter counts the paper reports for its CIFAR-10, ImageNet and Cityscapes models.
PAPER_PARAMS = {
    "mdeq-cifar-tiny": 170e3,
    "mdeq-cifar-large": 10e6,
    "mdeq-imagenet-small": 18e6,
    "mdeq-imagenet-large": 63e6,
    "mdeq-imagenet-xl": 81e6,
    "mdeq-cityscapes-small": 7.8e6,
    "mdeq-cityscapes-large": 53e6,
    "mdeq-cityscapes-xl": 70.9e6,
}


def test_presets_are_the_issue_table():
    assert set(MDEQ_PRESETS) == set(TABLE) | {f"mdeq-cityscapes-{s}" for s in SEG_WIDTHS}
    for name, row in TABLE.items():
        c = make_config(name)
        d = c.deq_config()
        got = (
            c.channels, c.head_channels, c.final_channels, c.expansion, c.num_groups,
            d.pretrain_layers, c.dropout, d.f_thres, d.b_thres, d.f_stop_mode,
            c.downsample_times, c.num_classes,
        )  # fmt: skip
        assert got == row, name
        assert c.task == "classification"
        assert d.f_solver == d.b_solver == "broyden"
        assert d.b_stop_mode == "rel"  # see mdeq.MDEQ_SOLVER
        assert c.image_size == ((224, 224) if "imagenet" in name else (32, 32))
    for size, imagenet in SEG_WIDTHS.items():
        c, ref = make_config(f"mdeq-cityscapes-{size}"), make_config(imagenet)
        assert c.task == "segmentation" and c.num_classes == 19 and c.pretrain_layers == 3
        assert (c.channels, c.expansion, c.num_groups) == (ref.channels, ref.expansion, 8)
        d = c.deq_config()
        assert (d.f_thres, d.b_thres, d.f_stop_mode, d.f_solver) == (27, 30, "abs", "broyden")
        assert c.ignore_index == 255 and d.pretrain_layers == 3


def closed_form_params(c: MDEQConfig) -> int:
    """Parameters of an MDEQ counted from its description, not from its modules."""

    def conv(i, o, k, bias=False, wn=False):
        return i * o * k * k + o * bias + o * wn  # weight norm adds a gain per output channel

    def norm(ch, affine=True):
        return 2 * ch * affine

    ch, n, wn, c0 = c.channels, len(c.channels), c.weight_norm, c.channels[0]
    total = conv(c.in_channels, c0, 3) + norm(c0)
    total += (max(2, c.downsample_times) - 1) * (conv(c0, c0, 3) + norm(c0))
    total += (conv(c0, c0, 1) + norm(c0)) * c.injection_layer
    for width in ch:
        inner = int(c.expansion * width)
        total += conv(width, inner, 3, wn=wn) + norm(inner) + conv(inner, width, 3, wn=wn)
        total += 2 * norm(width) + conv(width, width, 1, wn=wn) + norm(width, c.post_norm_affine)
    for i in range(n):
        for j in range(n):
            if j < i:  # i - j strided convs; the last one changes the width
                total += (i - j - 1) * (conv(ch[j], ch[j], 3, wn=wn) + norm(ch[j]))
                total += conv(ch[j], ch[i], 3, wn=wn) + norm(ch[i])
            elif j > i:
                total += conv(ch[j], ch[i], 1, wn=wn) + norm(ch[i])
    if c.task == "classification":
        wide = [4 * h for h in c.head_channels]
        for width, h in zip(ch, c.head_channels, strict=True):
            total += conv(width, h, 1) + conv(h, h, 3) + conv(h, 4 * h, 1)
            total += 0 if width == 4 * h else conv(width, 4 * h, 1) + norm(4 * h)
        for a, b in zip(wide, wide[1:], strict=False):
            total += conv(a, b, 3, bias=True) + norm(b)
        total += conv(wide[-1], c.final_channels, 1, bias=True) + norm(c.final_channels)
        total += c.final_channels * c.num_classes + c.num_classes
    else:
        s = sum(ch)
        total += conv(s, s, 1, bias=True) + norm(s) + conv(s, c.num_classes, c.seg_kernel, True)
    return total


@pytest.mark.parametrize("name", MDEQ_PRESETS)
def test_full_size_presets_build_on_meta_with_the_expected_parameter_count(name):
    cfg = make_config(name)
    with torch.device("meta"):
        model = cfg.build()
    assert all(p.is_meta for p in model.parameters())
    count = sum(p.numel() for p in model.parameters())
    assert count == closed_form_params(cfg)
    # Within 20% of the paper's figure: exact equality is not expected, the released
    # configurations the issue's table follows differ slightly from the paper's.
    assert abs(count / PAPER_PARAMS[name] - 1) < 0.2, (name, count)


# ------------------------------------------------------------------ shapes and resolutions


@pytest.mark.parametrize("name", MDEQ_PRESETS)
def test_every_preset_runs_at_small_size(name):
    torch.manual_seed(0)
    cfg = small(name)
    model = cfg.build().eval()
    x = images(2, (32, 32))
    with torch.no_grad():
        logits, info = model(x, f_thres=3)
        z, _ = model.features(x, f_thres=3)
    if cfg.task == "classification":
        assert logits.shape == (2, cfg.num_classes)
    else:
        assert logits.shape == (2, cfg.num_classes, 32, 32)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    top = 32 // 2**cfg.downsample_times
    expected = [(2, c, top >> i, top >> i) for i, c in enumerate(cfg.channels)]
    assert [tuple(t.shape) for t in z] == expected
    assert info.mode == "deq" and info.nfe == 3 and info.nstep.shape == (2,)


def test_the_real_tiny_preset_trains_a_step_at_cifar_size():
    torch.manual_seed(0)
    model = build("mdeq-cifar-tiny")
    logits, info = model(images(2, (32, 32)))
    model.loss(logits, torch.tensor([1, 7])).backward()
    assert logits.shape == (2, 10) and info.nfe <= 18 and info.backward.done
    assert model.deq.config.pretrain_layers == 10


@pytest.mark.parametrize("size", [(48, 40), (53, 38)])
def test_branch_resolutions_halve_per_branch(size):
    cfg = small("mdeq-imagenet-small", image_size=size)
    model = cfg.build().eval()
    with torch.no_grad():
        z, _ = model.features(images(1, size), f_thres=2)
    h, w = -(-size[0] // 4), -(-size[1] // 4)  # the stem downsamples twice
    for i, t in enumerate(z):
        assert t.shape[-2:] == (h, w), (i, t.shape)
        h, w = -(-h // 2), -(-w // 2)
    assert branch_sizes(13, 22, 3) == [(13, 22), (7, 11), (4, 6)]


# ------------------------------------------------------------------ f against a naive version


def _weight(conv: nn.Conv2d) -> torch.Tensor:
    """g v / ||v|| from the parametrisation's raw tensors, computed here."""
    g = conv.parametrizations.weight.original0
    v = conv.parametrizations.weight.original1
    return g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def _gn(x, gn: nn.GroupNorm):
    b, c = x.shape[:2]
    y = x.reshape(b, gn.num_groups, -1)
    y = (y - y.mean(-1, keepdim=True)) / torch.sqrt(
        y.var(-1, unbiased=False, keepdim=True) + gn.eps
    )
    y = y.reshape_as(x)
    if gn.affine:
        y = y * gn.weight.view(1, c, 1, 1) + gn.bias.view(1, c, 1, 1)
    return y


def _conv(x, conv, stride=1):
    return F.conv2d(x, _weight(conv), stride=stride, padding=conv.kernel_size[0] // 2)


def naive_f(f, z, x):
    n = len(z)
    y = []
    for i, (blk, zi) in enumerate(zip(f.blocks, z, strict=True)):
        h = torch.relu(_gn(_conv(zi, blk.conv1), blk.gn1))
        h = _conv(h, blk.conv2) + (x if i == 0 else 0)
        y.append(_gn(torch.relu(_gn(h, blk.gn2) + zi), blk.gn3))
    out = []
    for i in range(n):
        total = y[i]
        for j in range(n):
            if j < i:  # composed stride-2 steps, ReLU between them
                h = y[j]
                for k, step in enumerate(f.fuse[i][j].net):
                    h = _gn(_conv(h, step[0], stride=2), step[1])
                    h = torch.relu(h) if k < i - j - 1 else h
                total = total + h
            elif j > i:  # nearest upsampling by 2^(j-i) is a repeat of every pixel
                up = f.fuse[i][j]
                h, r = _gn(_conv(y[j], up.conv), up.gn), 2 ** (j - i)
                total = total + h.repeat_interleave(r, 2).repeat_interleave(r, 3)
        post = f.post[i]
        out.append(_gn(_conv(torch.relu(total), post[1]), post[2]))
    return out


@pytest.mark.parametrize("post_norm_affine", [False, True])
def test_f_equals_a_naive_composition_of_blocks_and_fusion(post_norm_affine):
    torch.manual_seed(0)
    cfg = MDEQConfig(
        channels=[8, 16, 8], head_channels=[2, 2, 2], expansion=2, num_groups=4,
        post_norm_affine=post_norm_affine, dropout=0.0,
    )  # fmt: skip
    f = cfg.build().double().eval().deq.f
    with torch.no_grad():  # move gains and norms off their initial values
        for m in f.modules():
            if isinstance(m, nn.Conv2d):
                m.parametrizations.weight.original0.mul_(
                    torch.rand_like(m.weight[:, :1, :1, :1]) + 0.5
                )
            elif isinstance(m, nn.GroupNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
    g = torch.Generator().manual_seed(3)
    z = [
        torch.randn(2, c, 16 >> i, 16 >> i, generator=g).double() for i, c in enumerate([8, 16, 8])
    ]
    x = torch.randn(2, 8, 16, 16, generator=g).double()
    got, want = f(z, x), naive_f(f, z, x)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # every conv of f is weight-normalised: 2 per block, 4 down, 3 up, 3 post-fusion
    convs = [m for m in f.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6 + 4 + 3 + 3 and all(hasattr(m, "parametrizations") for m in convs)


def test_f_and_the_model_do_not_mix_samples():
    """GroupNorm, not BatchNorm, inside f: each sample's equilibrium is its own."""
    torch.manual_seed(0)
    model = small("mdeq-cifar-large").build().double().eval()
    x = images(3, (16, 16), dtype=torch.float64)
    with torch.no_grad():
        batch, _ = model(x, f_thres=6)
        alone = torch.cat([model(x[i : i + 1], f_thres=6)[0] for i in range(3)])
    torch.testing.assert_close(batch, alone, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ equilibrium and gradients


def tiny_double(**overrides) -> nn.Module:
    base = dict(
        channels=[8, 16], head_channels=[2, 2], final_channels=8, expansion=2,
        num_groups=4, dropout=0.0, num_classes=3,
    )  # fmt: skip
    cfg = MDEQConfig(**{**base, **overrides})
    return contractive(cfg.build().double())


def test_deq_output_equals_the_unrolled_network_at_convergence():
    torch.manual_seed(0)
    model = tiny_double(deq={"f_tol": 1e-11, "f_thres": 80}).eval()
    x = images(2, dtype=torch.float64)
    with torch.no_grad():
        deq_logits, info = model(x)
        deq_z, _ = model.features(x)
        model.deq.config.pretrain_layers = 120  # the weight-tied network, 120 layers deep
        unrolled_logits, pinfo = model(x, pretrain=True)
        unrolled_z, _ = model.features(x, pretrain=True)
        model.deq.config.pretrain_layers = 3
        shallow_z, _ = model.features(x, pretrain=True)
    assert bool(info.converged.all()) and info.nfe < 80
    assert float(pinfo.rel_residual.max()) < 1e-10  # the unrolled network has settled
    torch.testing.assert_close(deq_logits, unrolled_logits, rtol=1e-9, atol=1e-9)
    for a, b, c in zip(deq_z, unrolled_z, shallow_z, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        assert (c - b).norm() > 1e-3 * b.norm()  # depth matters: the comparison can fail


def test_implicit_gradients_equal_backprop_through_the_unrolled_network():
    torch.manual_seed(0)
    model = tiny_double(deq={"f_tol": 1e-11, "f_thres": 80, "b_tol": 1e-11, "b_thres": 80}).train()
    x, labels = images(2, dtype=torch.float64), torch.tensor([0, 2])

    def grads(pretrain):
        model.zero_grad()
        logits, info = model(x, pretrain=pretrain)
        model.loss(logits, labels).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, info

    implicit, info = grads(False)
    model.deq.config.pretrain_layers = 120
    unrolled, _ = grads(True)
    assert bool(info.backward.result.converged.all())
    for name, g in unrolled.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(implicit[name], g, rtol=1e-7, atol=1e-12, msg=name)


@pytest.mark.parametrize("pretrain", [True, False])
def test_gradients_reach_every_parameter(pretrain):
    torch.manual_seed(0)
    model = small("mdeq-imagenet-small", dropout=0.1).build()
    # 64 pixels: the stem's /4 and three halvings leave the last branch 2x2; at 32
    # it is 1x1, and a GroupNorm of one channel per group maps a 1x1 map to its
    # bias, so the conv before it gets an exact zero gradient (roundoff at 2 threads)
    logits, info = model(images(2, (64, 64)), pretrain=pretrain, jac_loss=True)
    (model.loss(logits, torch.tensor([3, 999])) + info.jac_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing
    assert info.mode == ("pretrain" if pretrain else "deq")
    assert info.backward.done != pretrain  # the implicit backward ran in DEQ mode only
    if not pretrain:  # and did solve: a per-sample abs tolerance would stop it at step 1
        assert float(info.backward.result.nstep.float().mean()) > 3


def test_dropout_masks_are_fixed_within_a_solve():
    torch.manual_seed(0)
    model = tiny_double(dropout=0.25, deq={"f_solver": "anderson", "f_tol": 1e-9, "f_thres": 80})
    model.train()
    x = images(2, dtype=torch.float64)
    _, info = model(x)
    assert bool(info.converged.all())  # with masks redrawn at every call of f it does not
    # ...which is what f does outside a DEQ scope: each call draws new masks
    f, inj = model.deq.f, model.stem(x)
    z = [torch.randn_like(t) for t in model.initial_state(inj)]
    a, b = f(z, inj), f(z, inj)
    assert not torch.allclose(a[0], b[0])


# ------------------------------------------------------------------ segmentation


def test_segmenter_logits_have_the_input_resolution():
    model = small("mdeq-cityscapes-small").build().eval()
    with torch.no_grad():
        logits, _ = model(images(1, (27, 41)), f_thres=2)
    assert logits.shape == (1, 19, 27, 41)


def test_segmentation_loss_ignores_label_255():
    torch.manual_seed(0)
    model = small("mdeq-cityscapes-small").build()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 19, 6, 5, generator=g, requires_grad=True)
    labels = torch.randint(0, 19, (2, 6, 5), generator=g)
    ignored = torch.rand(2, 6, 5, generator=g) < 0.4
    labels[ignored] = 255
    loss = model.loss(logits, labels)
    # hand-written: mean negative log-likelihood over the labelled pixels only
    logp = torch.log_softmax(logits, 1).permute(0, 2, 3, 1)[~ignored]
    expected = -logp.gather(1, labels[~ignored].unsqueeze(1)).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert not logits.grad.permute(0, 2, 3, 1)[ignored].any()
    # the logits at ignored pixels do not matter, whatever they are
    other = logits.detach().clone()
    other.permute(0, 2, 3, 1)[ignored] = 100.0
    torch.testing.assert_close(model.loss(other, labels), loss.detach())
    # an image with nothing labelled gives a zero loss, not NaN
    assert float(model.loss(logits.detach(), torch.full_like(labels, 255))) == 0.0


def test_segmenter_trains():
    torch.manual_seed(0)
    model = small("mdeq-cityscapes-small", dropout=0.0, num_classes=3).build()
    x = images(2, (16, 16))
    # a rule on 4x4 patches (the stem works at 1/4 resolution), with a band left unlabelled
    patches = F.avg_pool2d(x[:, :2], 4)
    labels = (patches[:, 0] > 0).long() + (patches[:, 1] > 0).long()
    labels = labels.repeat_interleave(4, 1).repeat_interleave(4, 2)
    labels[:, :4] = 255
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(12):
        logits, _ = model(x, pretrain=step < 6)
        loss = model.loss(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < 0.8 * losses[6], losses


# ------------------------------------------------------------------ training


def test_a_tiny_mdeq_overfits_a_handful_of_images_across_the_pretrain_switch(one_torch_thread):
    torch.manual_seed(0)
    model = MDEQConfig(
        channels=[8, 8], head_channels=[2, 4], final_channels=32, num_classes=4, dropout=0.0,
        pretrain_layers=4, deq={"b_thres": 18},
    ).build()  # fmt: skip
    x, labels = images(8, (16, 16), seed=1), torch.arange(8) % 4
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, modes = [], []
    # The DEQ phase is noisy at lr 1e-2 (the loss jumps at the switch and again
    # later): over seeds 0-4 at 1 thread the mean of the last 5 of 90 steps is
    # 0.006-0.35x the loss at the switch and 0.002-0.10x the first (chance, ln 4)
    for step in range(90):
        logits, info = model(x, pretrain=step < 20)
        loss = model.loss(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        modes.append(info.mode)
    assert modes[19] == "pretrain" and modes[20] == "deq" and info.backward.done
    assert losses[19] < 0.7 * losses[0]  # pretraining learns
    final = sum(losses[-5:]) / 5
    assert final < 0.5 * losses[20]  # and DEQ mode goes on from where it left off
    assert final < 0.15 * losses[0], losses


def test_under_autocast_f_runs_in_bf16_and_the_solver_in_float32(monkeypatch):
    """The DEQ's job, checked on this model: on CUDA, Broyden's SVD has no bfloat16
    kernel, so the solver must not run under autocast (it failed on an H200 when it did)."""
    seen = {"solver": [], "f": []}

    def probe(f, z0, **kwargs):
        seen["solver"].append(torch.is_autocast_enabled("cpu"))
        return broyden(f, z0, **kwargs)

    # register into a copy of the registry that is put back after the test
    monkeypatch.setattr(solvers, "_SOLVERS", dict(solvers._SOLVERS))
    register_solver("mdeq_test_probe", probe)
    torch.manual_seed(0)
    model = small("mdeq-imagenet-small", deq={"f_solver": "mdeq_test_probe"}).build()
    conv = model.deq.f.blocks[0].conv1
    conv.register_forward_hook(lambda m, i, out: seen["f"].append(out.dtype))
    x = images(2, (32, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, info = model(x, f_thres=6)
        z, _ = model.features(x, f_thres=2)
    assert seen["solver"] == [False, False] and set(seen["f"]) == {torch.bfloat16}
    assert all(t.dtype == torch.float32 for t in z)  # the state stays float32
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    model.loss(logits, torch.tensor([1, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert not torch.is_autocast_enabled("cpu")


# ------------------------------------------------------------------ config


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown key 'chanels' .*did you mean 'channels'"):
        build({"preset": "mdeq-cifar-tiny", "chanels": [8, 8]})
    with pytest.raises(ValueError, match=r"deq: unknown key 'f_thresh'"):
        MDEQConfig(deq={"f_thresh": 3})
    with pytest.raises(ValueError, match="divisible by num_groups"):
        MDEQConfig(channels=[12, 24], num_groups=8)
    with pytest.raises(ValueError, match="one width per branch"):
        MDEQConfig(channels=[8, 8, 8])
    with pytest.raises(ValueError, match="pretrain_layers as a field"):
        MDEQConfig(deq={"pretrain_layers": 3})
    with pytest.raises(ValueError, match="task must be one of"):
        make_config("mdeq-cifar-tiny", task="detection")
    cfg = make_config({"preset": "mdeq-cifar-large", "deq": {"f_thres": 7}})
    d = cfg.deq_config()  # deq fields apply over MDEQ's solver defaults
    assert (d.f_thres, d.f_solver, d.b_thres, d.pretrain_layers) == (7, "broyden", 20, 10)
