"""Style similarity of a generated set to a reference style set (CSD: Somepalli et al., 2024,
"Measuring Style Similarity in Diffusion Models"): on L2-normalised style embeddings, the dot
product of the mean generated and the mean reference embedding — the mean pairwise cosine
similarity over all (generated, reference) pairs. Its per-image form, gᵢ · mean(r), averages to
exactly the set score, so the interval is the t-interval over images and the paired Δ the paired
t-test (``toolkit.metrics.intervals``), as for the CLIP score.
"""

from __future__ import annotations

import numpy as np

from toolkit.metrics.intervals import Interval, mean_interval


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def per_image(generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """gᵢ · mean(r) for each generated embedding: its mean cosine similarity to the reference set."""
    return _unit(generated) @ _unit(reference).mean(0)


def style_similarity(generated: np.ndarray, reference: np.ndarray) -> float:
    """mean(g) · mean(r) on unit embeddings = the mean pairwise cosine similarity."""
    return float(_unit(generated).mean(0) @ _unit(reference).mean(0))


def style_interval(generated: np.ndarray, reference: np.ndarray, level: float = 0.95) -> Interval:
    return mean_interval(per_image(generated, reference), level)
