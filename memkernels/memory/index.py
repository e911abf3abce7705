"""An inverted-file index of a large one-row bank (MemoryBank.build_index):
spherical k-means of the keys per kv head, slots sorted by cluster."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cluster_slots(keys: Tensor, clusters: int, iterations: int = 10,
                  seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """An inverted-file index of unit keys [P, S, Dh] (spherical k-means per
    kv head, `iterations` Lloyd steps from `clusters` distinct slots drawn
    with `seed`): (order [P, S], the slots sorted by cluster; centroids [P,
    clusters, Dh], unit length; starts [P, clusters + 1], where each
    cluster's range begins in the sorted order). MemoryBank.build_index."""
    P, S, D = keys.shape
    clusters = max(1, min(clusters, S))
    x = keys.detach()
    x = x if x.dtype == torch.float64 else x.float()
    gen = torch.Generator().manual_seed(seed)
    first = torch.stack([torch.randperm(S, generator=gen)[:clusters] for _ in range(P)])
    centroids = torch.gather(x, 1, first.to(x.device)[..., None].expand(-1, -1, D))
    for _ in range(iterations):
        assign = _nearest(x, centroids)  # [P, S]
        sums = torch.zeros_like(centroids).scatter_add_(1, assign[..., None].expand(-1, -1, D), x)
        # an emptied cluster keeps its centroid (it will hold nothing)
        centroids = torch.where(sums.norm(dim=-1, keepdim=True) > 0, F.normalize(sums, dim=-1),
                                centroids)
    assign = _nearest(x, centroids)
    order = torch.argsort(assign, dim=1, stable=True)
    counts = torch.zeros(P, clusters, dtype=torch.long, device=x.device).scatter_add_(
        1, assign, torch.ones_like(assign))
    starts = torch.cat([counts.new_zeros(P, 1), counts.cumsum(1)], 1)
    return order, centroids, starts


def _nearest(x: Tensor, centroids: Tensor, scores_per_chunk: int = 1 << 22) -> Tensor:
    """[P, S]: each slot's centroid of highest dot product, computed a chunk of
    slots at a time so that memory stays bounded (scores [P, chunk, clusters]),
    however many clusters were asked for."""
    P, S, _ = x.shape
    chunk = max(1, scores_per_chunk // max(1, P * centroids.shape[1]))
    return torch.cat([torch.einsum("psd,pcd->psc", x[:, i:i + chunk], centroids).argmax(-1)
                      for i in range(0, S, chunk)], 1) if S else x.new_zeros(P, 0, dtype=torch.long)
