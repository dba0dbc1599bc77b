"""Self-supervised pretraining of a backbone on images: SimCLR's contrastive loss.

Each step draws a batch of images, makes two random views of each (crop, flip, contrast,
brightness, noise) and trains the backbone, through a small projection that is thrown away
afterwards, to tell each view's partner apart from the other 2N - 2 views (NT-Xent; Chen et
al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations"). No label
is read, so images of other shipped sets can join the source's (``pretrain.contrastive``).
Every random draw comes from one generator seeded by the caller, on the CPU, so a run is
reproducible on any device.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.augment import augment_batch
from common.config import ContrastiveConfig
from common.models import SplitModel

log = logging.getLogger("medfed.pretrain")
MIN_SIDE = 0.55  # a view's crop keeps at least this share of the image's side
PROJECTION = (64, 32)  # hidden and output widths of the projection


def random_view(x: Tensor, g: torch.Generator) -> Tensor:
    """A random view of each image of the batch ``x`` (N, C, H, W), on the CPU.

    Stronger than local training's augmentation (common/augment.py): contrastive learning
    needs views that differ in more than a 2-pixel shift.
    """
    n = x.shape[0]
    side = MIN_SIDE + (1 - MIN_SIDE) * torch.rand(n, generator=g)
    cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - side)
    cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - side)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = side, side, cx, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = augment_batch(x, ("flip", "intensity"), g)
    return (x * (0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g))
            + 0.1 * torch.randn(x.shape, generator=g))


def to_channels(x: np.ndarray, channels: int, where: str) -> np.ndarray:
    """Images (N, C, H, W) in [0, 1] with `channels` channels: colour to grey by luminance
    (ITU-R BT.601 weights), grey to colour by repetition; ValueError naming `where` else."""
    have = x.shape[1]
    if have == channels:
        return x
    if have == 3 and channels == 1:
        return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None].astype(np.float32)
    if have == 1 and channels == 3:
        return np.repeat(x, 3, axis=1)
    raise ValueError(f"{where}: images with {have} channels cannot be turned into {channels}")


def simclr(model: SplitModel, x: np.ndarray, cfg: ContrastiveConfig, seed: int,
           device: torch.device) -> float:
    """Train ``model.backbone`` on the (normalised) images ``x`` for ``cfg.steps`` steps;
    the head is untouched. Returns the last step's loss."""
    g = torch.Generator().manual_seed(seed)
    batch = cfg.batch_size
    proj = nn.Sequential(nn.Linear(model.feature_dim, PROJECTION[0]), nn.ReLU(),
                         nn.Linear(*PROJECTION))
    model.to(device)
    proj.to(device)
    opt = torch.optim.Adam([*model.backbone.parameters(), *proj.parameters()], lr=cfg.lr)
    images = torch.as_tensor(x)
    # view i's positive is view i + batch (the other view of the same image), and back
    target = torch.cat([torch.arange(batch, 2 * batch), torch.arange(0, batch)]).to(device)
    model.train()
    loss = torch.zeros(())
    for step in range(cfg.steps):
        b = images[torch.randint(0, len(images), (batch,), generator=g)]
        views = torch.cat([random_view(b, g), random_view(b, g)]).to(device)
        z = F.normalize(proj(model.features(views)), dim=1)
        sim = z @ z.T / cfg.temperature
        sim.fill_diagonal_(-1e9)  # a view is not its own partner
        loss = F.cross_entropy(sim, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == cfg.steps - 1:
            log.info("contrastive step %d of %d: loss %.3f", step + 1, cfg.steps, loss.item())
    model.eval()
    return float(loss.item())
