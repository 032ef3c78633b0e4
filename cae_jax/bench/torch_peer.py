"""PyTorch: timm's `legacy_xception` in plain torch, and the benchmark's peer CAE around it (or
around timm's `efficientnet_b4`, `torch_efficientnet`, for a B4 config).

`LegacyXception` is the Cadene/timm Xception module written out with torch.nn alone (same
modules, same order, same state-dict keys and ops as `timm.create_model("legacy_xception",
num_classes=0)`), because timm imports torchvision, and PyPI's torchvision for torch 2.13
(0.28.0) does not load beside the CPU torch this project pins. It is the reference of the
timm import parity test and the encoder of the peer. The peer adds the same decoder and
classifier as the JAX CAE (decoder widths, kernel, classifier head, BN epsilon/momentum),
trained with the same loss (BCE + lambda * MSE) and AdamW after global-norm clipping. On a
GPU it runs as PyTorch users run it fast: channels_last, `torch.autocast` bfloat16 where
cae-jax computes in bfloat16, optionally `torch.compile`. Needs torch (the `bench` and
`test` extras); nothing else in cae-jax imports it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from ml_collections import ConfigDict
from torch import nn

from cae_jax import backbones
from cae_jax.bench.torch_efficientnet import EfficientNet

# legacy_xception has these widths only; other Xception configs have no PyTorch peer.
XCEPTION_WIDTHS = {
    "stem_features": (32, 64),
    "entry_features": (128, 256, 728),
    "middle_blocks": 8,
    "exit_features": (728, 1024),
    "head_features": (1536, 2048),
}


def unsupported_reason(model_config: ConfigDict) -> str:
    """Why this model config has no PyTorch peer ("" when it has one: Xception at
    legacy_xception's widths, EfficientNet-B4 at any multipliers)."""
    name = backbones.name_of(model_config)
    if name == backbones.efficientnet.NAME:
        return ""
    if name != backbones.xception.NAME:
        return f"no PyTorch peer for encoder.name={name}"
    enc = model_config.encoder
    for name, value in XCEPTION_WIDTHS.items():
        ours = tuple(enc[name]) if isinstance(value, tuple) else enc[name]
        if ours != value:
            return f"legacy_xception has fixed widths; encoder.{name}={ours}"
    return ""


class SeparableConv2d(nn.Module):
    """3x3 depthwise (`conv1`) then 1x1 (`pointwise`), no biases."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.conv1(x))


class Block(nn.Module):
    """`reps` x (ReLU, separable conv, BN) [+ 3x3/stride max-pool], plus the (projected) input."""

    def __init__(self, cin: int, cout: int, reps: int, stride: int,
                 start_with_relu: bool = True, grow_first: bool = True):
        super().__init__()
        if cout != cin or stride != 1:
            self.skip = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            self.skipbn = nn.BatchNorm2d(cout)
        else:
            self.skip = None
        rep = []
        for i in range(reps):
            if grow_first:
                inc, outc = (cin if i == 0 else cout), cout
            else:
                inc, outc = cin, (cin if i < reps - 1 else cout)
            # The first ReLU must not overwrite the block's input, which the skip still reads.
            rep += [nn.ReLU(inplace=i > 0), SeparableConv2d(inc, outc), nn.BatchNorm2d(outc)]
        if not start_with_relu:
            rep = rep[1:]
        if stride != 1:
            rep.append(nn.MaxPool2d(3, stride, 1))
        self.rep = nn.Sequential(*rep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.skipbn(self.skip(x)) if self.skip is not None else x
        return self.rep(x) + skip


class LegacyXception(nn.Module):
    """timm's `legacy_xception` without its classifier: `forward_features` -> [N, 2048, h, w]."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, 2, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(32, 64, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.act2 = nn.ReLU(inplace=True)
        self.block1 = Block(64, 128, 2, 2, start_with_relu=False)
        self.block2 = Block(128, 256, 2, 2)
        self.block3 = Block(256, 728, 2, 2)
        for i in range(4, 12):
            setattr(self, f"block{i}", Block(728, 728, 3, 1))
        self.block12 = Block(728, 1024, 2, 2, grow_first=False)
        self.conv3 = SeparableConv2d(1024, 1536)
        self.bn3 = nn.BatchNorm2d(1536)
        self.act3 = nn.ReLU(inplace=True)
        self.conv4 = SeparableConv2d(1536, 2048)
        self.bn4 = nn.BatchNorm2d(2048)
        self.act4 = nn.ReLU(inplace=True)
        self.features = XCEPTION_WIDTHS["head_features"][-1]
        for m in self.modules():  # timm's initialization.
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        for i in range(1, 13):
            x = getattr(self, f"block{i}")(x)
        x = self.act3(self.bn3(self.conv3(x)))
        return self.act4(self.bn4(self.conv4(x)))


def torch_encoder(model_config: ConfigDict) -> nn.Module:
    """The config's encoder in torch (`unsupported_reason` says which have one)."""
    if backbones.name_of(model_config) == backbones.efficientnet.NAME:
        enc = model_config.encoder
        return EfficientNet(enc.width_multiplier, enc.depth_multiplier, enc.drop_path_rate)
    return LegacyXception()


class TorchCAE(nn.Module):
    """Encoder features -> (classifier logit [N], decoder reconstruction), from images in
    [-1, 1] that the encoder sees in its own normalization, as `models.CAE`."""

    def __init__(self, model_config: ConfigDict):
        super().__init__()
        self.encoder = torch_encoder(model_config)
        module = backbones.backbone(model_config)
        # (x + 1) / 2 in the backbone's normalization: x * scale + shift per channel.
        std = torch.tensor(module.STD)
        self.register_buffer("scale", (0.5 / std).reshape(1, 3, 1, 1))
        self.register_buffer("shift", ((0.5 - torch.tensor(module.MEAN)) / std).reshape(1, 3, 1, 1))
        momentum = 1.0 - model_config.bn_momentum  # PyTorch counts momentum from the other side.
        layers = []
        ins = [self.encoder.features, *model_config.decoder.features[:-1]]
        k = model_config.decoder.kernel_size
        for width_in, width_out in zip(ins, model_config.decoder.features, strict=True):
            layers += [
                nn.ConvTranspose2d(width_in, width_out, k, stride=2, padding=(k - 2) // 2,
                                   bias=False),
                nn.BatchNorm2d(width_out, eps=model_config.bn_epsilon, momentum=momentum),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv2d(model_config.decoder.features[-1], 3, 3, padding=1))
        self.decoder = nn.Sequential(*layers)
        head = []
        width = self.encoder.features
        for h in model_config.classifier.hidden:
            head += [nn.Linear(width, h), nn.ReLU(inplace=True),
                     nn.Dropout(model_config.classifier.dropout)]
            width = h
        head.append(nn.Linear(width, 1))
        self.classifier = nn.Sequential(*head)
        self.image_size = model_config.image_size

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_features(x * self.scale + self.shift)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encode(x).mean(dim=(2, 3)))[:, 0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        logit = self.classifier(z.mean(dim=(2, 3)))[:, 0]
        recon = self.decoder(z).float()  # As the JAX decoder: RGB out, then float32.
        if recon.shape[-1] != self.image_size:
            size = (self.image_size, self.image_size)
            recon = F.interpolate(recon, size, mode="bilinear", antialias=True)
        return logit, torch.tanh(recon)


def compute_dtype(config: ConfigDict, device: torch.device):
    """`torch.autocast` for the config's compute dtype (a no-op context for float32)."""
    if config.model.dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def for_device(model: TorchCAE, device: torch.device, compile_backend: str = "") -> nn.Module:
    """The model on `device`, channels_last on a GPU, `torch.compile`d when a backend is named
    ("inductor" on a GPU; "eager" traces without code generation, for tests)."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model, backend=compile_backend) if compile_backend else model


def make_train_step(config: ConfigDict, model: nn.Module, device: torch.device | None = None):
    """`step(images NCHW float, labels float) -> loss`, one AdamW update as in `train_step.py`,
    the forward pass in the config's compute dtype."""
    optim_config = config.optim
    device = device or torch.device("cpu")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=optim_config.learning_rate,
        betas=(optim_config.b1, optim_config.b2), weight_decay=optim_config.weight_decay)
    model.train()

    def step(images: torch.Tensor, labels: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        with compute_dtype(config, device):
            logit, recon = model(images)
            loss = F.binary_cross_entropy_with_logits(logit.float(), labels)
            loss = loss + config.loss.recon_weight * F.mse_loss(recon.float(), images)
        loss.backward()
        if optim_config.clip_grad_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), optim_config.clip_grad_norm)
        optimizer.step()
        return loss.item()

    return step
