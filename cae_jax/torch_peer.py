"""The PyTorch peer of the benchmark: timm's `legacy_xception` plus the same decoder and classifier.

Built from the same model config as the JAX CAE (decoder widths, kernel, classifier head, BN
epsilon/momentum), trained with the same loss (BCE + lambda * MSE) and AdamW after global-norm
clipping. On a GPU it runs as PyTorch users run it fast: channels_last, `torch.autocast`
bfloat16 where cae-jax computes in bfloat16, optionally `torch.compile`. Needs the `bench`
extra (torch, timm); nothing else in cae-jax imports it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from ml_collections import ConfigDict
from torch import nn

# timm's legacy_xception has these widths only; other configs have no PyTorch peer.
XCEPTION_WIDTHS = {
    "stem_features": (32, 64),
    "entry_features": (128, 256, 728),
    "middle_blocks": 8,
    "exit_features": (728, 1024),
    "head_features": (1536, 2048),
}


def unsupported_reason(model_config: ConfigDict) -> str:
    """Why this model config has no PyTorch peer ("" when it has one)."""
    enc = model_config.encoder
    for name, value in XCEPTION_WIDTHS.items():
        ours = tuple(enc[name]) if isinstance(value, tuple) else enc[name]
        if ours != value:
            return f"timm legacy_xception has fixed widths; encoder.{name}={ours}"
    return ""


class TorchCAE(nn.Module):
    """timm legacy_xception features -> (classifier logit [N], decoder reconstruction)."""

    def __init__(self, mc: ConfigDict):
        super().__init__()
        import timm

        self.encoder = timm.create_model("legacy_xception", pretrained=False, num_classes=0)
        momentum = 1.0 - mc.bn_momentum  # PyTorch counts momentum from the other side.
        layers = []
        ins = [XCEPTION_WIDTHS["head_features"][-1], *mc.decoder.features[:-1]]
        k = mc.decoder.kernel_size
        for i, o in zip(ins, mc.decoder.features, strict=True):
            layers += [
                nn.ConvTranspose2d(i, o, k, stride=2, padding=(k - 2) // 2, bias=False),
                nn.BatchNorm2d(o, eps=mc.bn_epsilon, momentum=momentum),
                nn.ReLU(inplace=True),
            ]
        layers.append(nn.Conv2d(mc.decoder.features[-1], 3, 3, padding=1))
        self.decoder = nn.Sequential(*layers)
        head = []
        width = XCEPTION_WIDTHS["head_features"][-1]
        for h in mc.classifier.hidden:
            head += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(mc.classifier.dropout)]
            width = h
        head.append(nn.Linear(width, 1))
        self.classifier = nn.Sequential(*head)
        self.image_size = mc.image_size

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder.forward_features(x)
        return self.classifier(z.mean(dim=(2, 3)))[:, 0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder.forward_features(x)
        logit = self.classifier(z.mean(dim=(2, 3)))[:, 0]
        recon = self.decoder(z)
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
    o = config.optim
    device = device or torch.device("cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2),
                                  weight_decay=o.weight_decay)
    model.train()

    def step(images: torch.Tensor, labels: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        with compute_dtype(config, device):
            logit, recon = model(images)
            loss = F.binary_cross_entropy_with_logits(logit.float(), labels)
            loss = loss + config.loss.recon_weight * F.mse_loss(recon.float(), images)
        loss.backward()
        if o.clip_grad_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad_norm)
        optimizer.step()
        return loss.item()

    return step
