"""timm's `efficientnet_b4` (`forward_features`) written out in plain torch: the reference of the
EfficientNet import parity test and the encoder of the benchmark's B4 peer (`torch_peer`; timm
itself needs torchvision, which does not load beside the pinned CPU torch). Transcribed from
timm's `_gen_efficientnet`, `EfficientNetBuilder`, `DepthwiseSeparableConv`, `InvertedResidual`,
`SqueezeExcite` and `DropPath`: same modules, state-dict keys and ops (BatchNorm2d eps 1e-5,
SiLU, padding ((stride - 1) + (k - 1)) // 2, block i of n dropping its residual branch with
drop_path_rate * i / n in training), at any channel and depth multiplier (1.4, 1.8 is B4)."""

from __future__ import annotations

import math

import torch
from torch import nn

ARCH = (  # timm's arch_def: type, repeats, kernel, stride, expansion, channels; SE 0.25.
    ("ds", 1, 3, 1, 1, 16), ("ir", 2, 3, 2, 6, 24), ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80), ("ir", 3, 5, 1, 6, 112), ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)


def make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """timm's `drop_path`: whole samples of a residual branch dropped, the rest scaled."""
    if not training or rate == 0:
        return x
    keep = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(1 - rate)
    return x * keep / (1 - rate)


def conv(cin, cout, k, stride=1, groups=1, bias=False):
    return nn.Conv2d(cin, cout, k, stride, ((stride - 1) + (k - 1)) // 2, groups=groups,
                     bias=bias)


class SqueezeExcite(nn.Module):
    def __init__(self, chs, rd_ratio):
        super().__init__()
        rd = round(chs * rd_ratio)
        self.conv_reduce = nn.Conv2d(chs, rd, 1, bias=True)
        self.act1 = nn.SiLU()
        self.conv_expand = nn.Conv2d(rd, chs, 1, bias=True)

    def forward(self, x):
        s = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * s.sigmoid()


class DepthwiseSeparableConv(nn.Module):
    def __init__(self, cin, cout, k, stride, se_ratio, drop_path_rate=0.0):
        super().__init__()
        self.has_skip = stride == 1 and cin == cout
        self.drop_path_rate = drop_path_rate
        self.conv_dw = conv(cin, cin, k, stride, groups=cin)
        self.bn1 = nn.BatchNorm2d(cin)
        self.se = SqueezeExcite(cin, se_ratio)
        self.conv_pw = conv(cin, cout, 1)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        y = nn.functional.silu(self.bn1(self.conv_dw(x)))
        y = self.bn2(self.conv_pw(self.se(y)))
        return drop_path(y, self.drop_path_rate, self.training) + x if self.has_skip else y


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, k, stride, exp_ratio, se_ratio, drop_path_rate=0.0):
        super().__init__()
        self.has_skip = stride == 1 and cin == cout
        self.drop_path_rate = drop_path_rate
        mid = make_divisible(cin * exp_ratio)
        self.conv_pw = conv(cin, mid, 1)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv_dw = conv(mid, mid, k, stride, groups=mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.se = SqueezeExcite(mid, se_ratio / exp_ratio)  # se_from_exp=False.
        self.conv_pwl = conv(mid, cout, 1)
        self.bn3 = nn.BatchNorm2d(cout)

    def forward(self, x):
        y = nn.functional.silu(self.bn1(self.conv_pw(x)))
        y = nn.functional.silu(self.bn2(self.conv_dw(y)))
        y = self.bn3(self.conv_pwl(self.se(y)))
        return drop_path(y, self.drop_path_rate, self.training) + x if self.has_skip else y


class EfficientNet(nn.Module):
    """`features` is the latent's width."""

    def __init__(self, channel_multiplier=1.4, depth_multiplier=1.8, drop_path_rate=0.0):
        super().__init__()

        def chs(c):
            return make_divisible(c * channel_multiplier)

        stem = chs(32)
        self.conv_stem = conv(3, stem, 3, 2)
        self.bn1 = nn.BatchNorm2d(stem)
        plan = [(kind, int(math.ceil(repeats * depth_multiplier)), *rest)
                for kind, repeats, *rest in ARCH]
        total = sum(repeats for _, repeats, *_ in plan)
        stages, cin, index = [], stem, 0
        for kind, repeats, k, stride, exp, cout in plan:
            blocks = []
            for i in range(repeats):
                s, rate = (stride if i == 0 else 1), drop_path_rate * index / total
                blocks.append(DepthwiseSeparableConv(cin, chs(cout), k, s, 0.25, rate)
                              if kind == "ds"
                              else InvertedResidual(cin, chs(cout), k, s, exp, 0.25, rate))
                cin, index = chs(cout), index + 1
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.features = chs(1280)
        self.conv_head = conv(cin, self.features, 1)
        self.bn2 = nn.BatchNorm2d(self.features)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.silu(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        return nn.functional.silu(self.bn2(self.conv_head(x)))
