"""Multiscale deep equilibrium models (MDEQ; Bai, Koltun & Kolter, NeurIPS 2020).

    model = deqray.models.build("mdeq-cifar-tiny")
    logits, info = model(images)                  # DEQ mode: solve, implicit backward
    logits, info = model(images, pretrain=True)   # weight-tied unrolled network (warm-up)
    loss = model.loss(logits, labels)
    by_budget, info = model.snapshot_logits(images, (2, 4, 8))  # one solve, several budgets

The picture: a stem turns the image into features at the highest resolution;
those features are the input injection of one equilibrium layer f whose state
is a list of feature maps, branch i at 1/2^i of the stem's resolution. f runs a
residual block on every branch (the injection enters branch 0 only), then
fuses: every branch receives the sum of all the others, resampled to its
resolution. The solver drives the whole list to equilibrium at once; a head
reads all branches (classification: bottlenecks, downsampling and a linear
layer; segmentation: everything upsampled, concatenated and classified per pixel).

Inside f only GroupNorm is used: BatchNorm would mix samples, and the core's
per-sample convergence and Jacobian tools assume f does not. BatchNorm lives in
the stem and heads, outside the solver.

Where the issue leaves a value open, the authors' released configurations (the
MDEQ-Vision code of the DEQ repository) decide it; each such choice is noted
next to the preset it belongs to.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deqray.core import DEQ, DEQConfig, DEQInfo, VariationalDropout2d, apply_weight_norm

from .registry import register_family, register_preset

TASKS = ("classification", "segmentation")
BOTTLENECK_EXPANSION = 4  # the classification head's bottlenecks widen by 4, as in ResNet


def conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=bias)


def conv1x1(c_in: int, c_out: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, bias=bias)


def branch_sizes(height: int, width: int, num_branches: int) -> list[tuple[int, int]]:
    """Spatial size of each branch: halved per branch, rounded up like a stride-2 conv3x3."""
    sizes = [(height, width)]
    for _ in range(num_branches - 1):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


# ----------------------------------------------------------------------------- config


# The solver settings every MDEQ starts from; a config's `deq` overrides them.
MDEQ_SOLVER = {
    "f_solver": "broyden",
    "b_solver": "broyden",
    "f_thres": 18,
    "b_thres": 20,
    "f_stop_mode": "rel",
    # Relative in every preset, also where the forward stops on the absolute
    # residual: the gradient arriving at z* shrinks with the batch size (a mean
    # loss), so a per-sample absolute tolerance would end the backward solve
    # after its first step.
    "b_stop_mode": "rel",
    # The reference Broyden stops at 1e-3 both ways; our solves stop per sample
    # at these tolerances, so the budgets bound only the hard samples.
    "f_tol": 1e-3,
    "b_tol": 1e-3,
}


@dataclass
class MDEQConfig:
    """An MDEQ classifier or segmenter. The defaults are the `mdeq-cifar-tiny` preset.

    Branch i has `channels[i]` channels at 1/2^i of the stem's resolution, and
    the stem downsamples the image by 2^downsample_times.
    """

    task: str = "classification"  # classification | segmentation
    channels: list[int] = field(default_factory=lambda: [24, 24])
    head_channels: list[int] = field(default_factory=lambda: [8, 16])  # classification only
    final_channels: int = 200  # classification only: width before the linear classifier
    expansion: float = 5  # residual block's inner width = expansion x branch width
    num_groups: int = 8  # GroupNorm groups in f (the post-fusion norms use half as many)
    pretrain_layers: int = 10  # depth of the weight-tied network in pretrain mode
    dropout: float = 0.25  # variational 2-D dropout in the residual blocks
    downsample_times: int = 0  # stride-2 convs in the stem
    image_size: tuple[int, int] = (32, 32)  # (H, W) the preset trains on; any size runs
    in_channels: int = 3
    num_classes: int = 10
    # 1x1 conv + BN + ReLU between stem and injection. The reference code skips
    # it for its smallest model (no downsampling, at most two branches).
    injection_layer: bool = False
    post_norm_affine: bool = False  # learnable scale/shift in the post-fusion GroupNorms
    weight_norm: bool = True  # on every convolution inside f
    bn_momentum: float = 0.1  # stem and head BatchNorms
    seg_kernel: int = 1  # segmentation only: kernel of the per-pixel classifier
    ignore_index: int = 255  # segmentation only: label that is left out of the loss
    # Not used by the model: how many optimizer steps a trainer should run in
    # pretrain mode before switching to DEQ mode.
    pretrain_steps: int = 3000
    # DEQConfig fields, applied over MDEQ_SOLVER (Broyden both ways, 18/20 steps, tol 1e-3)
    deq: dict = field(default_factory=dict)

    def __post_init__(self):
        self.channels = list(self.channels)
        self.head_channels = list(self.head_channels)
        self.image_size = tuple(self.image_size)
        self.deq = dict(self.deq)
        self.validate()

    def validate(self, where: str = "MDEQ config") -> None:
        def fail(msg: str):
            raise ValueError(f"{where}: {msg}")

        if self.task not in TASKS:
            fail(f"task must be one of {TASKS}, got {self.task!r}")
        if not self.channels or not all(isinstance(c, int) and c > 0 for c in self.channels):
            fail(f"channels must be a non-empty list of positive ints, got {self.channels}")
        g = self.num_groups
        if not isinstance(g, int) or g < 1:
            fail(f"num_groups must be a positive int, got {g!r}")
        if not self.expansion > 0:
            fail(f"expansion must be > 0, got {self.expansion}")
        for c in self.channels:
            inner = int(self.expansion * c)
            if c % g or inner % g or c % max(g // 2, 1):
                fail(
                    f"branch width {c} and its inner width {inner} must be divisible by "
                    f"num_groups={g} (GroupNorm)"
                )
        if self.task == "classification":
            if len(self.head_channels) != len(self.channels):
                fail(
                    f"head_channels needs one width per branch ({len(self.channels)}), "
                    f"got {self.head_channels}"
                )
            if not all(isinstance(c, int) and c > 0 for c in self.head_channels):
                fail(f"head_channels must be positive ints, got {self.head_channels}")
            if self.final_channels < 1:
                fail(f"final_channels must be >= 1, got {self.final_channels}")
        if not 0 <= self.dropout < 1:
            fail(f"dropout must be in [0, 1), got {self.dropout}")
        if self.downsample_times < 0:
            fail(f"downsample_times must be >= 0, got {self.downsample_times}")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            fail(f"image_size must be (height, width), got {self.image_size}")
        if self.num_classes < 1 or self.in_channels < 1:
            fail("num_classes and in_channels must be >= 1")
        if self.seg_kernel not in (1, 3):
            fail(f"seg_kernel must be 1 or 3, got {self.seg_kernel}")
        if "pretrain_layers" in self.deq:
            fail("set pretrain_layers as a field of the MDEQ config, not inside deq")
        self.deq_config(where)

    def deq_config(self, where: str = "MDEQ config") -> DEQConfig:
        settings = {**MDEQ_SOLVER, **self.deq, "pretrain_layers": self.pretrain_layers}
        return DEQConfig.build(settings, where=f"{where}: deq")

    def build(self) -> nn.Module:
        self.validate()
        if self.task == "classification":
            return MDEQClassifier(self)
        return MDEQSegmenter(self)


# ----------------------------------------------------------------------------- f


class ResidualBlock(nn.Module):
    """The per-branch block of f; the injection enters before the second norm."""

    def __init__(self, channels: int, expansion: float, groups: int, dropout: float):
        super().__init__()
        inner = int(expansion * channels)
        self.conv1 = conv3x3(channels, inner)
        self.gn1 = nn.GroupNorm(groups, inner)
        self.conv2 = conv3x3(inner, channels)
        self.drop = VariationalDropout2d(dropout)
        self.gn2 = nn.GroupNorm(groups, channels)
        self.gn3 = nn.GroupNorm(groups, channels)

    def forward(self, z: Tensor, injection: Tensor | None = None) -> Tensor:
        out = F.relu(self.gn1(self.conv1(z)))
        out = self.drop(self.conv2(out))
        if injection is not None:
            out = out + injection
        out = self.gn2(out)
        return self.gn3(F.relu(out + z))


class Downsample(nn.Module):
    """Branch j -> branch i > j: i - j stride-2 conv3x3s (width changes at the last one)."""

    def __init__(self, c_in: int, c_out: int, levels: int, groups: int):
        super().__init__()
        steps = []
        for k in range(levels):
            last = k == levels - 1
            width = c_out if last else c_in
            step = [conv3x3(c_in, width, stride=2), nn.GroupNorm(groups, width)]
            if not last:
                step.append(nn.ReLU())
            steps.append(nn.Sequential(*step))
        self.net = nn.Sequential(*steps)

    def forward(self, x: Tensor, size: torch.Size) -> Tensor:
        return self.net(x)


class Upsample(nn.Module):
    """Branch j -> branch i < j: a 1x1 conv to the new width, then nearest upsampling."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.conv = conv1x1(c_in, c_out)
        self.gn = nn.GroupNorm(groups, c_out)

    def forward(self, x: Tensor, size: torch.Size) -> Tensor:
        # to an explicit size rather than a factor, so that odd sizes line up
        return F.interpolate(self.gn(self.conv(x)), size=size, mode="nearest")


class MDEQLayer(nn.Module):
    """f(z, x): residual blocks per branch, then multiscale fusion.

    z is the list of branch states, x the injection (branch 0's width and size).
    Output branch i = post_i(block_i(z_i) + sum_{j != i} resample_{j->i}(block_j(z_j))).
    """

    def __init__(self, cfg: MDEQConfig):
        super().__init__()
        ch, g = cfg.channels, cfg.num_groups
        n = len(ch)
        self.blocks = nn.ModuleList(ResidualBlock(c, cfg.expansion, g, cfg.dropout) for c in ch)

        def resample(j: int, i: int) -> nn.Module | None:
            if i == j:
                return None
            if j < i:
                return Downsample(ch[j], ch[i], i - j, g)
            return Upsample(ch[j], ch[i], g)

        # fuse[i][j] carries branch j to branch i
        self.fuse = nn.ModuleList(nn.ModuleList(resample(j, i) for j in range(n)) for i in range(n))
        # half the groups after fusion, as in the reference code
        self.post = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                conv1x1(c, c),
                nn.GroupNorm(max(g // 2, 1), c, affine=cfg.post_norm_affine),
            )
            for c in ch
        )
        if cfg.weight_norm:
            apply_weight_norm(self, types=(nn.Conv2d,))

    def forward(self, z: list[Tensor], x: Tensor) -> list[Tensor]:
        n = len(self.blocks)
        y = [self.blocks[i](z[i], x if i == 0 else None) for i in range(n)]
        out = []
        for i in range(n):
            total = y[i]
            for j in range(n):
                if j != i:
                    total = total + self.fuse[i][j](y[j], y[i].shape[-2:])
            # f keeps the state's dtype whatever precision it ran in (autocast)
            out.append(self.post[i](total).to(z[i].dtype))
        return out


# ----------------------------------------------------------------------------- models


class MDEQBase(nn.Module):
    """Stem, injection and the equilibrium layer; subclasses add a head."""

    def __init__(self, cfg: MDEQConfig):
        super().__init__()
        self.config = cfg
        c0, m = cfg.channels[0], cfg.bn_momentum
        stem, c_in = [], cfg.in_channels
        # Two conv3x3s, the first `downsample_times` of them strided (none for CIFAR,
        # as in the reference code); more, all strided, to downsample more than twice.
        for k in range(max(2, cfg.downsample_times)):
            stride = 2 if k < cfg.downsample_times else 1
            stem += [conv3x3(c_in, c0, stride), nn.BatchNorm2d(c0, momentum=m), nn.ReLU()]
            c_in = c0
        self.stem = nn.Sequential(*stem)
        self.inject = (
            nn.Sequential(conv1x1(c0, c0), nn.BatchNorm2d(c0, momentum=m), nn.ReLU())
            if cfg.injection_layer
            else nn.Identity()
        )
        self.deq = DEQ(MDEQLayer(cfg), cfg.deq_config())

    def initial_state(self, x: Tensor) -> list[Tensor]:
        """Zeros for every branch. The state is float32 at least, also under autocast,
        so that the solver's iterates do not accumulate in bfloat16."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        sizes = branch_sizes(x.shape[-2], x.shape[-1], len(self.config.channels))
        return [
            x.new_zeros((x.shape[0], c, h, w), dtype=dtype)
            for c, (h, w) in zip(self.config.channels, sizes, strict=True)
        ]

    def forward(
        self,
        images: Tensor,
        *,
        pretrain: bool = False,
        f_thres: int | None = None,
        jac_loss: bool = False,
        sradius: bool = False,
        snapshots=None,
    ) -> tuple[Tensor, DEQInfo]:
        z, info = self.features(
            images,
            pretrain=pretrain,
            f_thres=f_thres,
            jac_loss=jac_loss,
            sradius=sradius,
            snapshots=snapshots,
        )
        return self.output(z, images.shape[-2:]), info

    def output(self, z: list[Tensor], size: torch.Size) -> Tensor:
        """The head on an equilibrium state (e.g. a snapshot's `.result`): the logits."""
        return self.head(z, size)

    @torch.no_grad()
    def snapshot_logits(
        self, images: Tensor, steps, *, f_thres: int | None = None
    ) -> tuple[dict[int, Tensor], DEQInfo]:
        """The logits at each forward budget in `steps`, from one solve.

        Returns ({k: logits}, info); `info.snapshots[k]` holds that budget's
        solver statistics (nstep, residuals, converged per sample). In eval
        mode each entry equals `model(images, f_thres=k)[0]` under no_grad;
        the solve runs to `f_thres` (default: the largest step). For
        evaluation: runs without autograd, and in training mode dropout and
        the head's BatchNorm statistics would make separate calls differ.
        """
        steps = tuple(steps)
        budget = max(steps) if f_thres is None else f_thres
        _, info = self.features(images, f_thres=budget, snapshots=steps)
        size = images.shape[-2:]
        return {k: self.output(s.result, size) for k, s in info.snapshots.items()}, info

    def features(
        self,
        images: Tensor,
        *,
        pretrain: bool = False,
        f_thres: int | None = None,
        jac_loss: bool = False,
        sradius: bool = False,
        snapshots=None,
    ) -> tuple[list[Tensor], DEQInfo]:
        """The equilibrium branch states (highest resolution first) and the solve's info.

        `snapshots=(2, 4, 8)` also hands back the solve after those steps in
        `info.snapshots` (see `DEQ.forward`)."""
        x = self.inject(self.stem(images))
        # Under autocast the DEQ runs f in reduced precision and its solvers in the
        # state's dtype (float32, see initial_state).
        return self.deq(
            x,
            self.initial_state(x),
            pretrain=pretrain,
            f_thres=f_thres,
            jac_loss=jac_loss,
            sradius=sradius,
            snapshots=snapshots,
        )


class Bottleneck(nn.Module):
    """The classification head's per-branch widening block (not part of f)."""

    def __init__(self, c_in: int, width: int, momentum: float):
        super().__init__()
        c_out = width * BOTTLENECK_EXPANSION
        # no affine terms inside, as in the reference head; the shortcut's BN keeps its own
        self.body = nn.Sequential(
            conv1x1(c_in, width),
            nn.BatchNorm2d(width, momentum=momentum, affine=False),
            nn.ReLU(),
            conv3x3(width, width),
            nn.BatchNorm2d(width, momentum=momentum, affine=False),
            nn.ReLU(),
            conv1x1(width, c_out),
            nn.BatchNorm2d(c_out, momentum=momentum, affine=False),
        )
        self.shortcut = (
            nn.Identity()
            if c_in == c_out
            else nn.Sequential(conv1x1(c_in, c_out), nn.BatchNorm2d(c_out, momentum=momentum))
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ClassificationHead(nn.Module):
    """Widen every branch, walk from the highest resolution down adding each branch
    on the way, then 1x1 conv to `final_channels`, global average pool, linear."""

    def __init__(self, cfg: MDEQConfig):
        super().__init__()
        m = cfg.bn_momentum
        wide = [h * BOTTLENECK_EXPANSION for h in cfg.head_channels]
        self.widen = nn.ModuleList(
            Bottleneck(c, h, m) for c, h in zip(cfg.channels, cfg.head_channels, strict=True)
        )
        self.down = nn.ModuleList(
            nn.Sequential(
                conv3x3(wide[i], wide[i + 1], stride=2, bias=True),
                nn.BatchNorm2d(wide[i + 1], momentum=m),
                nn.ReLU(),
            )
            for i in range(len(wide) - 1)
        )
        self.final = nn.Sequential(
            conv1x1(wide[-1], cfg.final_channels, bias=True),
            nn.BatchNorm2d(cfg.final_channels, momentum=m),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(cfg.final_channels, cfg.num_classes)

    def forward(self, z: list[Tensor], size: torch.Size | None = None) -> Tensor:
        # `size` (the input's) is for the segmentation head; a class score ignores it
        y = self.widen[0](z[0])
        for i, down in enumerate(self.down):
            y = self.widen[i + 1](z[i + 1]) + down(y)
        y = self.final(y).mean(dim=(2, 3))
        return self.classifier(y)


class SegmentationHead(nn.Module):
    """Upsample all branches to the highest resolution, concatenate, 1x1 conv + BN +
    ReLU, classify each pixel; the logits are upsampled to the image's size."""

    def __init__(self, cfg: MDEQConfig):
        super().__init__()
        total = sum(cfg.channels)
        self.mix = nn.Sequential(
            conv1x1(total, total, bias=True),
            nn.BatchNorm2d(total, momentum=cfg.bn_momentum),
            nn.ReLU(),
        )
        k = cfg.seg_kernel
        self.classifier = nn.Conv2d(total, cfg.num_classes, k, padding=k // 2)

    def forward(self, z: list[Tensor], size: torch.Size) -> Tensor:
        top = z[0].shape[-2:]
        ups = [z[0]] + [
            F.interpolate(t, size=top, mode="bilinear", align_corners=True) for t in z[1:]
        ]
        logits = self.classifier(self.mix(torch.cat(ups, dim=1)))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class MDEQClassifier(MDEQBase):
    """images (B, C, H, W) -> (logits (B, num_classes), DEQInfo)."""

    def __init__(self, cfg: MDEQConfig):
        super().__init__(cfg)
        self.head = ClassificationHead(cfg)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), labels)


class MDEQSegmenter(MDEQBase):
    """images (B, C, H, W) -> (logits (B, num_classes, H, W), DEQInfo)."""

    def __init__(self, cfg: MDEQConfig):
        super().__init__(cfg)
        self.head = SegmentationHead(cfg)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Per-pixel cross-entropy over the pixels not labelled `ignore_index`."""
        ignore = self.config.ignore_index
        if not bool((labels != ignore).any()):
            return logits.sum() * 0.0  # nothing labelled: no signal, but no NaN either
        return F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore)


# ----------------------------------------------------------------------------- presets

register_family("mdeq", MDEQConfig)


def _broyden(f_thres: int, b_thres: int, f_stop_mode: str) -> dict:
    return {"f_thres": f_thres, "b_thres": b_thres, "f_stop_mode": f_stop_mode}


def cifar_tiny() -> MDEQConfig:
    # The dataclass defaults. Pretraining steps (3000) and the missing injection
    # layer follow the released CIFAR-10 configuration.
    return MDEQConfig()


def cifar_large() -> MDEQConfig:
    return MDEQConfig(
        channels=[32, 64, 128, 256],
        head_channels=[14, 28, 56, 112],
        final_channels=1680,
        expansion=5,
        num_groups=8,
        pretrain_layers=10,
        dropout=0.3,
        injection_layer=True,
        pretrain_steps=20000,  # the released configuration's
        deq=_broyden(18, 20, "rel"),
    )


def _imagenet(channels, head_channels, expansion, pretrain_layers, post_norm_affine):
    # 510k pretraining steps and the post-fusion norms' affine terms (on for small
    # and large, off for XL) are the released ImageNet configurations' values.
    return MDEQConfig(
        channels=channels,
        head_channels=head_channels,
        final_channels=2048,
        expansion=expansion,
        num_groups=8,
        pretrain_layers=pretrain_layers,
        dropout=0.0,
        downsample_times=2,
        image_size=(224, 224),
        num_classes=1000,
        injection_layer=True,
        post_norm_affine=post_norm_affine,
        pretrain_steps=510000,
        deq=_broyden(26, 27, "abs"),
    )


def imagenet_small() -> MDEQConfig:
    return _imagenet([32, 64, 128, 256], [24, 48, 96, 192], 5, 5, True)


def imagenet_large() -> MDEQConfig:
    return _imagenet([80, 160, 320, 640], [32, 64, 128, 256], 5, 4, True)


def imagenet_xl() -> MDEQConfig:
    return _imagenet([88, 176, 352, 704], [32, 64, 128, 256], 6, 4, False)


def _cityscapes(imagenet: MDEQConfig, dropout: float, image_size, pretrain_steps):
    # Dropout, training crop (H, W), pretraining steps and affine post-fusion norms
    # are the released Cityscapes configurations' values; the segmenter's
    # BatchNorm momentum there is 0.01. Evaluation runs on full 1024x2048 images.
    return dataclasses.replace(
        imagenet,
        task="segmentation",
        head_channels=[],
        final_channels=0,
        num_classes=19,
        pretrain_layers=3,
        dropout=dropout,
        image_size=image_size,
        post_norm_affine=True,
        bn_momentum=0.01,
        pretrain_steps=pretrain_steps,
        deq=_broyden(27, 30, "abs"),
    )


def cityscapes_small() -> MDEQConfig:
    return _cityscapes(imagenet_small(), 0.05, (512, 1024), 60000)


def cityscapes_large() -> MDEQConfig:
    return _cityscapes(imagenet_large(), 0.03, (512, 1024), 60000)


def cityscapes_xl() -> MDEQConfig:
    return _cityscapes(imagenet_xl(), 0.04, (768, 1024), 40000)


PRESETS = {
    "mdeq-cifar-tiny": cifar_tiny,
    "mdeq-cifar-large": cifar_large,
    "mdeq-imagenet-small": imagenet_small,
    "mdeq-imagenet-large": imagenet_large,
    "mdeq-imagenet-xl": imagenet_xl,
    "mdeq-cityscapes-small": cityscapes_small,
    "mdeq-cityscapes-large": cityscapes_large,
    "mdeq-cityscapes-xl": cityscapes_xl,
}
for _name, _make in PRESETS.items():
    register_preset(_name, _make)
