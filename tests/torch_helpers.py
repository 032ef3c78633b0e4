"""Shared by the torch-reference tests (torch imported only when called)."""


def randomize_batch_norm(model, generator) -> None:
    """Random BN statistics and affine terms (fresh ones are 0/1 and would hide a mix-up)."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) * 0.4 + 0.8)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
