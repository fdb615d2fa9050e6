"""Train a small Vision Transformer (ViT) image classifier with autopar on generated images.

The images are made on the fly, so nothing is downloaded: each class is a texture (horizontal
stripes, vertical stripes, diagonal stripes, checkerboard) with a random frequency, phase and
colour, plus noise. It is easy for a ViT, which makes the loss curve a quick sanity check of a
grid. ``--pretrained DIR`` starts from a local Hugging Face ViT folder (its image size is used).

    python examples/train_vit.py --steps 100
    autopar run -n 4 --grid x=2,z=2 examples/train_vit.py

Options, loop and logging: ``examples/common.py``; output in ``runs/vit/``.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from transformers import ViTConfig, ViTForImageClassification

import autopar
import common

CLASSES = ("horizontal", "vertical", "diagonal", "checker")


def images(batch: int, size: int, channels: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless seeded global batches of textured images and their class (identical on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    r, c = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    while True:
        labels = torch.randint(len(CLASSES), (batch,), generator=gen)
        freq = (1 + torch.rand(batch, 1, 1, generator=gen) * 3) * 2 * math.pi / size
        phase = torch.rand(batch, 1, 1, generator=gen) * 2 * math.pi
        pattern = torch.empty(batch, size, size)
        for i, k in enumerate(labels.tolist()):
            if CLASSES[k] == "checker":
                pattern[i] = torch.sin(freq[i] * r + phase[i]).sign() * torch.sin(freq[i] * c + phase[i]).sign()
            else:
                pattern[i] = torch.sin(freq[i] * {"horizontal": r, "vertical": c, "diagonal": r + c}[CLASSES[k]]
                                       + phase[i])
        colour = torch.rand(batch, channels, 1, 1, generator=gen)
        pixels = pattern[:, None] * colour + 0.3 * torch.randn(batch, channels, size, size, generator=gen)
        yield {"pixel_values": pixels, "labels": labels}


def main() -> None:
    p = common.parser(__doc__, out="runs/vit", lr=1e-3)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch", type=int, default=8)
    args = p.parse_args()
    common.init(args)
    config = ViTConfig(image_size=args.image_size, patch_size=args.patch, num_channels=3, hidden_size=args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       intermediate_size=4 * args.hidden, num_labels=len(CLASSES),
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = common.build(lambda: ViTForImageClassification(config), args, ViTForImageClassification)
    size, channels = model.config.image_size, model.config.num_channels
    schedules: list = []
    engine = autopar.parallelize(model, optimizer=common.optimizer(args, schedules),
                                 num_microbatches=args.microbatches, clip_grad_norm=1.0)
    common.describe(model, f"{size}x{size} images of {CLASSES}; {args.steps} steps of {args.global_batch}")
    common.train(engine, images(args.global_batch, size, channels, args.seed), args, "ViT", "samples",
                 args.global_batch, schedules)
    autopar.destroy()


if __name__ == "__main__":
    main()
