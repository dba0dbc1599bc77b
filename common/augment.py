"""Seeded random augmentation of image batches during local training and pretraining.

A spec is ``none`` or operations joined by ``+``: ``flip`` (horizontal, half the images),
``shift`` (translate by up to 2 pixels, edges replicated), ``intensity`` (scale by 0.9-1.1
and offset by -0.1..0.1 on the normalised values). Every operation works on a whole
(N, C, H, W) batch at once; the draws come from a generator the caller seeds, so a node's
round is reproducible and the global RNG is untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

AUGMENTATIONS = ("flip", "shift", "intensity")
MAX_SHIFT = 2  # pixels; a 28x28 image keeps its lesion in frame


def parse_augment(text: str) -> tuple[str, ...]:
    """Operations of a spec, in the order applied; ValueError naming the first unknown one."""
    if text == "none":
        return ()
    ops = tuple(text.split("+"))
    for op in ops:
        if op not in AUGMENTATIONS:
            raise ValueError(f"augmentation '{op}' is unknown; expected none or "
                             f"{', '.join(AUGMENTATIONS)} joined by '+' (e.g. flip+shift)")
    if len(set(ops)) != len(ops):
        raise ValueError(f"augmentation spec '{text}' names an operation twice")
    return ops


def augment_batch(x: Tensor, ops: tuple[str, ...], generator: torch.Generator) -> Tensor:
    """A randomly augmented copy of the image batch ``x`` (N, C, H, W); ``x`` is unchanged."""
    if not ops:
        return x
    if x.dim() != 4:
        raise ValueError(f"augmentation needs image batches (N, C, H, W), got shape "
                         f"{tuple(x.shape)}")
    n, channels, height, width = x.shape
    for op in ops:
        if op == "flip":
            flip = torch.rand(n, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        elif op == "shift":
            s = MAX_SHIFT
            padded = F.pad(x, (s, s, s, s), mode="replicate")
            dy = torch.randint(0, 2 * s + 1, (n,), generator=generator)
            dx = torch.randint(0, 2 * s + 1, (n,), generator=generator)
            rows = dy[:, None] + torch.arange(height)  # (n, H): each image's window
            cols = dx[:, None] + torch.arange(width)
            x = padded[torch.arange(n)[:, None, None, None],
                       torch.arange(channels)[None, :, None, None],
                       rows[:, None, :, None], cols[:, None, None, :]]
        elif op == "intensity":
            scale = 0.9 + 0.2 * torch.rand(n, 1, 1, 1, generator=generator)
            offset = 0.2 * torch.rand(n, 1, 1, 1, generator=generator) - 0.1
            x = x * scale + offset
    return x
