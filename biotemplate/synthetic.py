"""Face-like synthetic templates for the demo, tests and benchmarks.

Real face embeddings of one person cluster around a direction; different people are nearly
orthogonal in high dimension. We mimic that: each identity is a random unit vector ``c``;
a sample is ``normalise(c + noise)`` with per-coordinate noise ``sigma``. Two samples of
one identity then have cosine ~ 1 / (1 + d * sigma**2), so ``sigma`` is chosen from the
target genuine score (0.6-0.75 is typical of ArcFace-class models at a good capture);
impostor cosines are ~ N(0, 1/sqrt(d)): 0 +- 0.09 at d = 128, 0 +- 0.044 at d = 512.

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


def _unit(x: NDArray[np.float64]) -> NDArray[np.float32]:
    out: NDArray[np.float32] = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    return out


def noise_sigma(dim: int, genuine: float) -> float:
    """Per-coordinate noise giving an expected genuine cosine of ``genuine``."""
    return float(np.sqrt((1.0 / genuine - 1.0) / dim))


def make_gallery(identities: int, samples: int, dim: int, *, genuine: float = 0.7,
                 seed: int = 0, prefix: str = "P-") -> Gallery:
    """``identities`` people with ``samples`` noisy templates each."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((identities, dim)))
    sigma = noise_sigma(dim, genuine)
    noise = rng.standard_normal((identities, samples, dim)) * sigma
    templates = _unit(centres[:, None, :] + noise).reshape(identities * samples, dim)
    ids = [f"{prefix}{i:06d}" for i in range(identities) for _ in range(samples)]
    return Gallery(centres=centres, templates=templates, subject_ids=ids, sigma=sigma)


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
