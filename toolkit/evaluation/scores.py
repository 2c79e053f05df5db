"""The numbers of one evaluation cell: FID, KID, CLIP score with intervals, FID∞, precision/recall,
density/coverage, per-prompt CLIP; and paired comparisons of two cells.

What each interval means (``toolkit.metrics.intervals``): FID and KID intervals are over the
generated images, the reference set held fixed (grouped jackknife: estimate ± t·se, so they
always contain the estimate); the FID interval is for E[FID_N] at the N evaluated. The CLIP
interval is the Student-t interval of the mean over images.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from toolkit.metrics.diversity import compare_vendi, vendi_interval
from toolkit.metrics.fidelity import prdc
from toolkit.metrics.intervals import (
    Reference,
    compare_paired,
    fid_infinity,
    fid_interval,
    kid_interval,
    mean_interval,
)


def compute_scores(ref: Reference, fake: np.ndarray, clip: np.ndarray | None, groups: int = 20,
                   level: float = 0.95, seed: int = 0, with_fid_infinity: bool = False,
                   with_prdc: bool = True, with_vendi: bool = True) -> dict[str, float]:
    """Args:
        ref: the reference features (``Reference.from_features``).
        fake: Inception features (n × 2048) of the generated images.
        clip: per-generated-image CLIP scores, or None when CLIP is unavailable.
        groups, level: jackknife groups and the intervals' coverage.
        seed: seed of the jackknife grouping and of FID∞'s subsets.
        with_fid_infinity: add FID∞ (Chong & Forsyth 2020) and its fit.
        with_prdc: add precision/recall (k=3) and density/coverage (k=5) on the same features.
        with_vendi: add the Vendi score of the generated features (diversity; jackknife interval).
    """
    out: dict[str, Any] = {"n_real": len(ref.feats), "n_fake": len(fake)}
    out.update(fid_interval(ref, fake, groups, level, seed).to_dict("fid"))
    out.update(kid_interval(ref, fake, groups, level, seed).to_dict("kid"))
    if clip is not None:
        out.update(mean_interval(clip, level).to_dict("clip_score"))
    if with_fid_infinity:
        out.update(fid_infinity(ref, fake, seed=seed).to_dict())
    if with_prdc:
        out.update(prdc(ref.feats, fake))
    if with_vendi:
        out.update(vendi_interval(fake, groups, level, seed).to_dict("vendi"))
    return out


def per_prompt(prompts: Sequence[str], clip: np.ndarray, groups: Sequence[str] | None = None
               ) -> dict[str, dict[str, Any]]:
    """Mean CLIP score per prompt (and per prompt group), with the number of images."""
    out: dict[str, dict[str, Any]] = {}
    for name, keys in (("prompt", prompts), ("group", groups)):
        if keys is None:
            continue
        acc: dict[str, list[float]] = defaultdict(list)
        for k, c in zip(keys, clip):
            acc[k].append(float(c))
        out[name] = {k: {"clip_score": float(np.mean(v)), "n": len(v)} for k, v in sorted(acc.items())}
    return out


def paired_deltas(ref: Reference, a: dict[str, np.ndarray], b: dict[str, np.ndarray], groups: int = 20,
                  level: float = 0.95, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Δ = B − A of FID, KID, CLIP and Vendi for two cells evaluated on the same prompts and seeds.

    ``a`` / ``b``: the cells' per-image arrays (``features``, ``clip``, ``seeds``); the seeds must
    match row by row, which is what makes the comparison paired."""
    if len(a["seeds"]) != len(b["seeds"]) or not np.array_equal(a["seeds"], b["seeds"]):
        raise ValueError("paired comparison needs the same images (prompts and seeds, in order) in both cells")
    clip_a, clip_b = a.get("clip"), b.get("clip")
    if clip_a is not None and (np.isnan(clip_a).any() or np.isnan(clip_b).any()):
        clip_a = clip_b = None
    comps = compare_paired(ref, a["features"], b["features"], clip_a, clip_b, groups, level, seed)
    comps["vendi"] = compare_vendi(a["features"], b["features"], groups, level, seed)
    return {m: c.to_dict() | {"verdict": c.verdict(names=("A", "B"))} for m, c in comps.items()}
