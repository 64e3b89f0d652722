"""Feature maps for kernel (linear) attention: ``phi`` such that ``phi(q) . phi(k)`` stands in for a similarity.

Every map takes ``x [B, T, H, D]`` and returns ``[B, T, H, M]``; by name:

- ``"identity"``: ``phi(x) = x`` (plain linear attention), M = D.
- ``"elu+1"``: ``elu(x) + 1`` (Katharopoulos et al., 2020), positive, M = D.
- ``"relu"``: ``max(x, 0)``, M = D.
- ``"taylor"``: Based's second-order Taylor map, ``phi(q) . phi(k) = 1 + s + s^2 / 2`` with ``s = q . k / sqrt(D)``,
  M = 1 + D + D^2.

and as an object, :class:`FavorPlusFeatures` (Performer's FAVOR+ positive orthogonal random features, holding
its projection; ``phi(q) . phi(k)`` is an unbiased estimate of ``exp(q . k / sqrt(D))``). Any callable
``[.., D] -> [.., M]`` works too.

Shape legend: B batch, T tokens, H heads, D head dim, M feature dim.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import torch
import torch.nn.functional as F

from hybridattn.ops._checks import check_choice, check_positive_int, check_tensor

FeatureMap = Callable[[torch.Tensor], torch.Tensor]


def identity_features(x: torch.Tensor) -> torch.Tensor:
    return x


def elu_plus_one_features(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def relu_features(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """Based's map: ``[1, x / D^(1/4), vec(x x^T) / (sqrt(2) sqrt(D))]``, so that
    ``phi(q) . phi(k) = 1 + s + s^2 / 2`` with ``s = q . k / sqrt(D)`` (the Taylor series of ``exp(s)``)."""
    d = x.shape[-1]
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
    return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, outer / math.sqrt(2 * d)], dim=-1)


FEATURE_MAPS: dict[str, FeatureMap] = {
    "identity": identity_features,
    "elu+1": elu_plus_one_features,
    "relu": relu_features,
    "taylor": taylor_features,
}


class FavorPlusFeatures:
    """Performer's FAVOR+ positive random features for the softmax kernel ``exp(q . k / sqrt(D))``.

    ``phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(M)`` with ``x' = x / D^(1/4)`` and the rows of ``W [M, D]`` drawn
    from ``N(0, I)``; with ``orthogonal=True`` they come in blocks of ``D`` mutually orthogonal rows with
    chi-distributed norms (lower variance, Choromanski et al., 2021). The projection is drawn on the CPU from
    ``seed`` (the same features on every device) and moved to the input's device and dtype when called.
    The map is not max-stabilised (that would break the estimate for unnormalised attention), so keep
    ``|x|^2 / sqrt(D)`` well below ~80 in float32.

    Args:
        head_dim: D, the size of the inputs' last dimension.
        num_features: M, the number of random features.
        orthogonal: draw orthogonal blocks (default) or i.i.d. Gaussian rows.
        seed: seed of the draw.

    Raises:
        TypeError, ValueError: a non-positive size; an input whose last dimension is not ``head_dim``.
    """

    def __init__(self, head_dim: int, num_features: int, *, orthogonal: bool = True, seed: int = 0):
        self.head_dim = check_positive_int("head_dim", head_dim)
        self.num_features = check_positive_int("num_features", num_features)
        self.orthogonal = bool(orthogonal)
        self.seed = check_positive_int("seed", seed, allow_zero=True)
        self.projection = self._draw(self.seed)

    def _draw(self, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        m, d = self.num_features, self.head_dim
        if not self.orthogonal:
            return torch.randn(m, d, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(torch.randn(-(-m // d), d, d, generator=gen, dtype=torch.float64))
        # QR's sign convention makes Q depend on the sign pattern of R; fixing diag(R) > 0 makes each Q
        # Haar-distributed, so every row is uniform on the sphere and the estimator stays unbiased
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
        rows = q.transpose(-1, -2).reshape(-1, d)[:m]  # blocks of d orthonormal rows
        # orthonormal rows have norm 1; Gaussian rows have chi(D) norms, which the estimator's variance assumes
        norms = torch.randn(m, d, generator=gen, dtype=torch.float64).norm(dim=1, keepdim=True)
        return rows * norms

    def redraw(self, seed: int | None = None) -> None:
        """Draw a new projection (Performer redraws during training): from ``seed``, or the next seed."""
        self.seed = self.seed + 1 if seed is None else check_positive_int("seed", seed, allow_zero=True)
        self.projection = self._draw(self.seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x)
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"x: expected last dimension head_dim={self.head_dim}, received shape {tuple(x.shape)}")
        x = x * self.head_dim ** -0.25
        w = self.projection.to(device=x.device, dtype=x.dtype)
        return torch.exp(x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(self.num_features)

    def __repr__(self) -> str:
        return (f"FavorPlusFeatures(head_dim={self.head_dim}, num_features={self.num_features}, "
                f"orthogonal={self.orthogonal}, seed={self.seed})")


def resolve_feature_map(feature_map: Union[str, FeatureMap]) -> FeatureMap:
    """A feature map from a name in :data:`FEATURE_MAPS` or a callable (returned as is)."""
    if callable(feature_map):
        return feature_map
    if isinstance(feature_map, str):
        if feature_map in ("favor+", "performer"):
            raise ValueError("feature_map: FAVOR+ needs its projection: pass "
                             "FavorPlusFeatures(head_dim, num_features, seed=...) instead of the name")
        check_choice("feature_map", feature_map, FEATURE_MAPS)
        return FEATURE_MAPS[feature_map]
    raise TypeError(f"feature_map: expected a name in {tuple(FEATURE_MAPS)} or a callable, "
                    f"received {type(feature_map).__name__}")
