"""k-center-greedy coreset subsampling of PatchCore's memory bank.

Method: Sener & Savarese 2018 ("Active Learning for Convolutional Neural Networks: A
Core-Set Approach"), as used by PatchCore (Roth et al. 2022, Alg. 1) and anomalib's
``KCenterGreedy``; here in O(N) memory with one fused matrix-vector product per step.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch

from models.patchcore.config import SEED


class _IdentityProjection:
    """Stand-in for anomalib's SparseRandomProjection when it would not reduce dimensions."""

    def fit(self, embedding: torch.Tensor) -> _IdentityProjection:
        return self

    @staticmethod
    def transform(embedding: torch.Tensor) -> torch.Tensor:
        return embedding


def greedy_coreset_indices(features: torch.Tensor, n_select: int, *, seed: int | None = SEED,
                           start: int | None = None, proj_dim: int | None = None,
                           progress: Callable[[float], None] | None = None) -> list[int]:
    """k-center-greedy coreset (Sener & Savarese 2018; PatchCore Alg. 1) in O(N) memory.

    Repeatedly picks the row farthest from all rows picked so far. Each step is
    one fused matrix-vector product over the float32 features
    (``|x|^2 - 2 x.c + |c|^2`` with cached squared norms, ``torch.addmv``) and an
    in-place running minimum of SQUARED distances (same argmax as distances, no
    sqrt); no ``N x N`` (or ``N x d`` temporary) matrix is ever allocated. The
    loop runs on one torch thread: it is memory-bound, and on a loaded 2-core
    machine a second thread made each step ~5x slower (thread hand-off), not faster.

    Args:
        features: float ``(N, D)`` patch features.
        n_select: number of rows to keep (1..N).
        seed: seeds the random first centre and the projection (None: torch's global RNG).
        start: explicit first centre (overrides the random one).
        proj_dim: if set and smaller than ``D``, select in a Gaussian random
            projection to ``proj_dim`` dims (Johnson-Lindenstrauss; the paper's
            approximate greedy coreset) to cut the per-step cost.
        progress: optional ``progress(fraction 0..1)``.

    Returns:
        ``n_select`` distinct row indices, in pick order.

    Raises:
        ValueError: ``n_select`` outside ``1..N`` or features not 2-D.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    n = int(features.shape[0])
    if not 1 <= n_select <= n:
        raise ValueError(f"n_select must be in 1..{n}, got {n_select}")
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    x = features.detach().float()
    if proj_dim is not None and proj_dim < x.shape[1]:
        proj = torch.randn(x.shape[1], proj_dim, generator=gen) / float(np.sqrt(proj_dim))
        x = x @ proj
    x = x.contiguous()
    if start is None:
        start = int(torch.randint(n, (1,), generator=gen)) if gen is not None else int(torch.randint(n, (1,)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sq = x.pow(2).sum(dim=1)
        min_d2 = torch.full((n,), float("inf"))
        picks = [int(start)]
        idx = int(start)
        step = max(1, n_select // 20)
        for i in range(1, n_select):
            center = x[idx]
            d2 = torch.addmv(sq, x, center, alpha=-2.0)
            d2.add_(torch.dot(center, center))
            torch.minimum(min_d2, d2, out=min_d2)
            min_d2[idx] = 0.0
            idx = int(torch.argmax(min_d2))
            picks.append(idx)
            if progress is not None and i % step == 0:
                progress(i / n_select)
    finally:
        torch.set_num_threads(threads)
    return picks


@lru_cache(maxsize=1)
def coreset_sampler_class() -> type:
    """The :class:`CoresetSampler` class (built lazily: importing anomalib takes seconds)."""
    from anomalib.models.components.sampling import KCenterGreedy

    class CoresetSampler(KCenterGreedy):
        """anomalib's k-center-greedy coreset sampler (``KCenterGreedy``), CPU-friendlier.

        Same algorithm as anomalib 2.7 (Sener & Savarese 2018, as used by
        PatchCore): sparse random projection (Johnson-Lindenstrauss, eps 0.9),
        random first centre included, then repeatedly the point farthest from the
        chosen centres. Memory is O(N) (one distance vector, never an N x N
        matrix). Differences: the greedy loop is :func:`greedy_coreset_indices`
        (one fused matrix-vector product per step with cached squared norms,
        instead of materialising ``features - center`` (N x d) each step); the projection is skipped when the JL dimension is not
        smaller than the embedding dimension (it would only add noise and cost);
        progress goes to a callback instead of a tqdm bar.

        Args:
            embedding: float32 ``(N, D)`` patch features.
            sampling_ratio: fraction of rows kept (``int(N * ratio)`` >= 1).
            progress: optional ``progress(fraction 0..1)``.
        """

        def __init__(self, embedding: torch.Tensor, sampling_ratio: float,
                     progress: Callable[[float], None] | None = None) -> None:
            super().__init__(embedding=embedding, sampling_ratio=sampling_ratio)
            jl_dim = self.model._johnson_lindenstrauss_min_dim(n_samples=embedding.shape[0], eps=self.model.eps)
            if embedding.ndim == 2 and jl_dim >= embedding.shape[1]:
                self.model = _IdentityProjection()
            self._progress = progress

        def select_coreset_idxs(self) -> list[int]:
            """Indices of the coreset rows: :func:`greedy_coreset_indices` after the projection.

            The first centre is drawn from torch's global RNG (as anomalib does).
            """
            if self.embedding.ndim == 2:
                self.model.fit(self.embedding)
                self.features = self.model.transform(self.embedding)
            else:
                self.features = self.embedding.reshape(self.embedding.shape[0], -1)
            start = int(torch.randint(high=self.n_observations, size=(1,)))
            return greedy_coreset_indices(self.features, self.coreset_size, seed=None, start=start,
                                          progress=self._progress)

    return CoresetSampler
