"""A user's own model for ``autopar check --factory scripts.check_factory:build`` (tests/test_cli.py):
a plain ``nn.Sequential`` with its batch and loss, since it has no Hugging Face config."""
import torch
from torch import nn


def build():
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g))
    return model, batch, lambda out, b: nn.functional.mse_loss(out, b[1])
