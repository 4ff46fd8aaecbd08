"""A SimpleNet-style patch scorer on PatchCore's patch embeddings (feature-space noise training).

Method: Liu et al., "SimpleNet: A Simple Network for Image Anomaly Detection and Localization",
CVPR 2023. A linear feature adaptor and a small discriminator are trained on normal patch
embeddings only: adapted normal patches must score above ``+MARGIN``, the same patches plus
Gaussian noise below ``-MARGIN`` (the paper's truncated L1 loss). At test time a patch's anomaly
score is minus the discriminator's output. Unlike the memory bank's nearest-neighbour distance,
the discriminator learns a boundary around the normal features, which on the grass texture
separates the second generator's thin and soft defects better (``bench/bench_simplenet.py``,
``docs/benchmarks.md``, "SimpleNet-style noise training").

Here the features are the bank's own (EfficientNet-Lite0 blocks, pooled and embedded by
anomalib's ``PatchcoreModel``), standardised per channel with the training patches' mean and
standard deviation; the noise is in those standardised units. A bank whose configuration says
``scorer="simplenet"`` (:attr:`models.patchcore.config.PatchCoreConfig.scorer`) holds one head,
stored as ``head.safetensors`` next to its memory bank.
"""

from __future__ import annotations

import torch
from torch import nn

#: truncation margin of the loss (the paper's th+ = th- = 0.5)
MARGIN = 0.5
#: Gaussian noise standard deviation in standardised feature units; chosen on the tuning set from
#: {0.25, 0.5, 1.0} by the mean image AUROC of gravel and grass (bench/bench_simplenet.py)
NOISE_SIGMA = 0.5
#: optimiser steps and patches per step (each step also scores as many noisy patches)
STEPS = 2000
BATCH = 2048
#: hidden width of the discriminator
HIDDEN = 512
#: acquisition-changed copies of each train normal the head is trained on as well (the bench's set-up)
HEAD_COPIES = 2


class SimpleNetHead(nn.Module):
    """Feature adaptor (``Linear(D, D)``, identity at start) + discriminator (``D -> HIDDEN -> 1``).

    Args:
        dim: patch-embedding width ``D``.
        mu, sd: float32 ``(D,)`` per-channel mean and standard deviation of the training patches
            (the standardisation, stored with the weights).
        hidden: discriminator width.
    """

    def __init__(self, dim: int, mu: torch.Tensor | None = None, sd: torch.Tensor | None = None,
                 hidden: int = HIDDEN) -> None:
        super().__init__()
        self.register_buffer("mu", torch.zeros(dim) if mu is None else mu.float().clone())
        self.register_buffer("sd", torch.ones(dim) if sd is None else sd.float().clone())
        self.adaptor = nn.Linear(dim, dim)
        with torch.no_grad():
            self.adaptor.weight.copy_(torch.eye(dim))
            self.adaptor.bias.zero_()
        self.disc = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2),
                                  nn.Linear(hidden, 1))

    @property
    def dim(self) -> int:
        """The patch-embedding width ``D``."""
        return int(self.mu.shape[0])

    @property
    def hidden(self) -> int:
        """The discriminator's hidden width."""
        return int(self.disc[0].out_features)

    def adapt(self, f: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` raw embeddings -> ``(N, D)`` adapted, standardised features."""
        return self.adaptor((f - self.mu) / self.sd)

    def patch_scores(self, f: torch.Tensor) -> torch.Tensor:
        """``(N,)`` float32 anomaly scores (minus the discriminator's output) of ``(N, D)`` raw embeddings.

        Raises:
            ValueError: ``f`` is not ``(N, D)`` with the head's ``D``.
        """
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"expected (N, {self.dim}) patch embeddings, got {tuple(f.shape)}")
        with torch.inference_mode():
            return -self.disc(self.adapt(f.float()))[:, 0]


def train_head(rows: torch.Tensor, sigma: float = NOISE_SIGMA, steps: int = STEPS, batch: int = BATCH,
               seed: int = 0) -> SimpleNetHead:
    """Train a :class:`SimpleNetHead` on ``(N, D)`` normal patch embeddings (see the module doc).

    Adam (adaptor learning rate 1e-4, discriminator 2e-4, weight decay 1e-5, the paper's
    settings), ``steps`` steps of ``batch`` random normal patches and their noisy copies; the
    sampling, noise and initialisation are seeded by ``seed`` (the same rows give the same head).

    Returns:
        the head in eval mode.

    Raises:
        ValueError: fewer than 2 rows, a non-2-D ``rows``, ``sigma`` <= 0 or ``steps`` < 1.
    """
    if rows.ndim != 2 or rows.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) patch embeddings, got {tuple(rows.shape)}")
    if sigma <= 0 or steps < 1:
        raise ValueError(f"sigma must be > 0 and steps >= 1, got {sigma}, {steps}")
    rows = rows.float()
    torch.manual_seed(seed)
    head = SimpleNetHead(rows.shape[1], rows.mean(0), rows.std(0) + 1e-6)
    opt = torch.optim.Adam([{"params": head.adaptor.parameters(), "lr": 1e-4},
                            {"params": head.disc.parameters(), "lr": 2e-4}], weight_decay=1e-5)
    gen = torch.Generator().manual_seed(seed)
    head.train()
    with torch.enable_grad():
        for _ in range(int(steps)):
            f = head.adapt(rows[torch.randint(len(rows), (batch,), generator=gen)])
            noisy = f + sigma * torch.randn(f.shape, generator=gen)
            out = head.disc(torch.cat([f, noisy]))[:, 0]
            loss = torch.clamp(MARGIN - out[:batch], min=0).mean() + torch.clamp(out[batch:] + MARGIN, min=0).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval()


def head_from_state(state: dict[str, torch.Tensor]) -> SimpleNetHead:
    """A :class:`SimpleNetHead` from its ``state_dict`` (e.g. read from ``head.safetensors``).

    Raises:
        KeyError, RuntimeError: a state that is not a head's.
    """
    head = SimpleNetHead(int(state["mu"].shape[0]), hidden=int(state["disc.0.weight"].shape[0]))
    head.load_state_dict(state)
    return head.eval()
