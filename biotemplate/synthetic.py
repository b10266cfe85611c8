"""Face-like synthetic templates for the demo, tests and benchmarks.

Real face embeddings of one person cluster around a direction, and different people are
nearly orthogonal; but the identity directions do not fill all d dimensions: they occupy a
subspace of much lower intrinsic dimension, which is why impostor scores of real models
spread as ~ 0 +- 0.1 rather than 0 +- 1/sqrt(d). We mimic both: each identity is a random
unit vector ``c`` in a random ``intrinsic``-dimensional subspace (default 100, so impostor
cosines are ~ N(0, 0.1)); a sample is ``normalise(c + noise)`` with isotropic noise of
per-coordinate ``sigma`` in all d dimensions. Two samples of one identity then have cosine
~ 1 / (1 + d * sigma**2), so ``sigma`` follows from the target genuine score (0.6-0.75 is
typical of ArcFace-class models at a good capture). The intrinsic dimension matters for
benchmarks: HNSW graphs degrade on data that really fills 512 dimensions, which no face
model produces.

No real faces, no downloads: everything is generated from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class Gallery:
    """Identities' centres and enrolled samples (row i belongs to ``subject_ids[i]``)."""

    centres: NDArray[np.float32]
    templates: NDArray[np.float32]
    subject_ids: list[str]
    sigma: float
    basis: NDArray[np.float64] | None = None  # the identity subspace (None: all of R^d)


def _unit(x: NDArray[np.float64]) -> NDArray[np.float32]:
    out: NDArray[np.float32] = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    return out


def noise_sigma(dim: int, genuine: float) -> float:
    """Per-coordinate noise giving an expected genuine cosine of ``genuine``."""
    return float(np.sqrt((1.0 / genuine - 1.0) / dim))


def make_gallery(identities: int, samples: int, dim: int, *, genuine: float = 0.7,
                 seed: int = 0, prefix: str = "P-", intrinsic: int = 100) -> Gallery:
    """``identities`` people with ``samples`` noisy templates each."""
    rng = np.random.default_rng(seed)
    basis = None
    if intrinsic >= dim:
        centres = _unit(rng.standard_normal((identities, dim)))
    else:  # identity directions in a random subspace of dimension ``intrinsic``
        basis, _ = np.linalg.qr(rng.standard_normal((dim, intrinsic)))
        centres = _unit(rng.standard_normal((identities, intrinsic)) @ basis.T)
    sigma = noise_sigma(dim, genuine)
    noise = rng.standard_normal((identities, samples, dim)) * sigma
    templates = _unit(centres[:, None, :] + noise).reshape(identities * samples, dim)
    ids = [f"{prefix}{i:06d}" for i in range(identities) for _ in range(samples)]
    return Gallery(centres=centres, templates=templates, subject_ids=ids, sigma=sigma,
                   basis=basis)


def probes(gallery: Gallery, which: NDArray[np.int64] | list[int], *,
           seed: int = 1) -> NDArray[np.float32]:
    """Fresh samples (mated probes) of the given identities."""
    rng = np.random.default_rng(seed)
    idx = np.asarray(which)
    noise = rng.standard_normal((len(idx), gallery.centres.shape[1])) * gallery.sigma
    return _unit(gallery.centres[idx] + noise)


def strangers(n: int, dim: int, *, seed: int = 2) -> NDArray[np.float32]:
    """Templates of people who are not in any gallery (non-mated probes)."""
    return _unit(np.random.default_rng(seed).standard_normal((n, dim)))


def non_mated(gallery: Gallery, n: int, *, seed: int = 3) -> NDArray[np.float32]:
    """Probes of people who are not in the gallery but come from the same population
    (the same identity subspace and capture noise): realistic non-mated searches."""
    rng = np.random.default_rng(seed)
    dim = gallery.centres.shape[1]
    if gallery.basis is None:
        centres = _unit(rng.standard_normal((n, dim)))
    else:
        centres = _unit(rng.standard_normal((n, gallery.basis.shape[1])) @ gallery.basis.T)
    return _unit(centres + rng.standard_normal((n, dim)) * gallery.sigma)
