"""The numbers of one evaluation cell, chosen by ``metrics.compute``, and paired comparisons of two cells.

Every metric is a family applied in a feature space (``toolkit.metrics.features``; ``inception``
is TF-Inception):

========================  ======================  =========================================================
name in metrics.compute   family, space           row keys (each with _ci_low/_ci_high unless said)
========================  ======================  =========================================================
fid / fd_<space>          Fréchet distance        fid / fd_<space>
kid / kd_<space>          KID (poly kernel MMD²)  kid / kd_<space>
fid_infinity / fd_infinity_<space>   FD∞          fid_inf / fd_inf_<space> (no interval; the fit is kept)
prdc / prdc_<space>       precision/recall (k=3), density/coverage (k=5): precision, … / precision_<space>, …
vendi / vendi_<space>     Vendi score             vendi / vendi_<space>
cmmd / cmmd_<space>       CMMD (RBF σ=10, ×1000)  cmmd (space clip) / cmmd_<space>
style_similarity          CSD mean·mean           style_similarity (space style)
clip_score                CLIP text–image score   clip_score (``metrics.clip_model``)
preference                PickScore's logit       preference (``metrics.preference_model``)
lpips_diversity           within-prompt LPIPS     lpips_diversity (``metrics.lpips``: trunk and heads files)
========================  ======================  =========================================================

What each interval means (``toolkit.metrics.intervals``): set metrics (FD, KD, CMMD, Vendi) have
the grouped jackknife over the generated images, the reference set held fixed (estimate ± t·se;
the FD interval is for E[FD_N] at the N evaluated); per-image means (CLIP score, style
similarity) the Student-t interval over images; LPIPS diversity the Student t over prompts (the
mean pairwise distance within each prompt is one value). Paired Δ: the same jackknife with pairs
kept together, or the paired t on per-image (per-prompt) differences.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit.metrics import perceptual, style
from toolkit.metrics.cmmd import cmmd_interval, compare_cmmd
from toolkit.metrics.diversity import compare_vendi, vendi_interval
from toolkit.metrics.fidelity import prdc
from toolkit.metrics.intervals import (
    Comparison,
    Reference,
    compare_means,
    compare_paired,
    fid_infinity,
    fid_interval,
    kid_interval,
    mean_interval,
)

SPACES = ("inception", "clip", "dinov2", "style")
FAMILIES = ("fd", "kd", "fd_infinity", "prdc", "vendi", "cmmd")   # usable in any space: <family>_<space>
# the published names: metric name -> (family, space)
NAMED = {"fid": ("fd", "inception"), "kid": ("kd", "inception"), "fid_infinity": ("fd_infinity", "inception"),
         "prdc": ("prdc", "inception"), "vendi": ("vendi", "inception"), "cmmd": ("cmmd", "clip"),
         "style_similarity": ("style_similarity", "style"), "clip_score": ("clip_score", None),
         "preference": ("preference", None), "lpips_diversity": ("lpips_diversity", None)}
PAIRED = ("fd", "kd", "vendi", "cmmd", "style_similarity", "clip_score", "preference",
          "lpips_diversity")   # families with a paired Δ
PER_IMAGE = ("clip_score", "preference", "style_similarity", "lpips_diversity")   # means of per-image values
TEXT = ("clip_score", "preference")   # text–image scores, computed with the images' prompts
BY_PROMPT = ("lpips_diversity",)   # per-image values whose independent units are prompts (intervals over prompts)


@dataclass(frozen=True)
class Metric:
    name: str            # as in metrics.compute, and the row's key
    family: str
    space: str | None    # feature space; None: text–image (CLIP score)

    @property
    def key(self) -> str:
        """The row's key of the main number (FD∞ and PRDC write several, see the module table)."""
        return {"fid_infinity": "fid_inf"}.get(self.name, self.name.replace("fd_infinity_", "fd_inf_"))


def parse_metrics(names: Sequence[str]) -> list[Metric]:
    """``metrics.compute`` as metrics; an unknown name fails listing what is known."""
    out = []
    for name in names:
        name = str(name)
        if name in NAMED:
            out.append(Metric(name, *NAMED[name]))
            continue
        m = re.fullmatch(rf"({'|'.join(sorted(FAMILIES, key=len, reverse=True))})_({'|'.join(SPACES)})", name)
        if m is None:
            raise ValueError(f"metrics.compute: unknown metric {name!r}; known: {', '.join(NAMED)}, and "
                             f"<family>_<space> for family in {', '.join(FAMILIES)} and space in {', '.join(SPACES)}")
        alias = next((k for k, v in NAMED.items() if v == (m.group(1), m.group(2))), None)
        if alias:
            raise ValueError(f"metrics.compute: {name!r} is called {alias!r}")
        out.append(Metric(name, m.group(1), m.group(2)))
    if len({m.name for m in out}) != len(out):
        raise ValueError(f"metrics.compute lists a metric twice: {list(names)}")
    return out


def spaces_needed(metrics: Sequence[Metric]) -> list[str]:
    return [s for s in SPACES if any(m.space == s for m in metrics)]


def _suffixed(d: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    return {new + k[len(old):] if k.startswith(old) else k: v for k, v in d.items()}


def compute_scores(refs: dict[str, Reference], fakes: dict[str, np.ndarray], texts: dict[str, np.ndarray],
                   metrics: Sequence[Metric], groups: int = 20, level: float = 0.95, seed: int = 0,
                   prompt_index: np.ndarray | None = None) -> dict[str, Any]:
    """Args:
        refs: per feature space, the reference features (``Reference.from_features``).
        fakes: per feature space, the generated images' features (n × d), rows in image order.
        texts: per metric computed from the images themselves (``clip_score``, ``preference``,
            ``lpips_diversity``'s rᵢ), the per-image scores; one missing (CLIP off) is skipped.
        prompt_index: each image's prompt (``lpips_diversity``'s unit).
        metrics: what to compute (``parse_metrics``).
        groups, level: jackknife groups and the intervals' coverage.
        seed: seed of the jackknife grouping and of FD∞'s subsets.
    """
    first = next(iter({**fakes, **texts}.values()), None)
    out: dict[str, Any] = {"n_real": len(next(iter(refs.values())).feats) if refs else 0,
                           "n_fake": len(first) if first is not None else 0}
    for m in metrics:
        ref, fake = refs.get(m.space), fakes.get(m.space)
        if m.family == "fd":
            out.update(fid_interval(ref, fake, groups, level, seed).to_dict(m.key))
        elif m.family == "kd":
            out.update(kid_interval(ref, fake, groups, level, seed).to_dict(m.key))
        elif m.family == "fd_infinity":
            out.update(_suffixed(fid_infinity(ref, fake, seed=seed).to_dict(), "fid_inf", m.key))
        elif m.family == "prdc":
            sfx = "" if m.space == "inception" else f"_{m.space}"
            out.update({f"{k}{sfx}": v for k, v in prdc(ref.feats, fake).items()})
        elif m.family == "vendi":
            out.update(vendi_interval(fake, groups, level, seed).to_dict(m.key))
        elif m.family == "cmmd":
            out.update(cmmd_interval(ref.feats, fake, groups, level, seed).to_dict(m.key))
        elif m.family == "style_similarity":
            out.update(style.style_interval(fake, ref.feats, level).to_dict(m.key))
        elif m.family in TEXT and m.name in texts:
            out.update(mean_interval(texts[m.name], level).to_dict(m.key))
        elif m.family in BY_PROMPT and m.name in texts:
            out.update(perceptual.diversity_interval(texts[m.name], prompt_index, level).to_dict(m.key))
    return out


def per_image_scores(refs: dict[str, Reference], fakes: dict[str, np.ndarray], texts: dict[str, np.ndarray],
                     metrics: Sequence[Metric]) -> dict[str, np.ndarray]:
    """The per-image forms of the per-image metrics (CLIP score, preference, style similarity, LPIPS
    diversity): what prompt groups and paired Δs are computed from."""
    out = {}
    for m in metrics:
        if (m.family in TEXT or m.family in BY_PROMPT) and m.name in texts:
            out[m.key] = np.asarray(texts[m.name], np.float64)
        elif m.family == "style_similarity":
            out[m.key] = style.per_image(fakes[m.space], refs[m.space].feats)
    return out


def per_prompt(prompts: Sequence[str], scores: dict[str, np.ndarray], groups: Sequence[str] | None = None,
               level: float = 0.95, prompt_index: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """Mean per-image scores per prompt, and per prompt group with their t intervals (over the group's
    prompts for ``BY_PROMPT`` metrics, given ``prompt_index``); the number of images."""
    out: dict[str, dict[str, Any]] = {}
    if not scores:
        return out
    for name, keys in (("prompt", prompts), ("group", groups)):
        if keys is None:
            continue
        members: dict[str, list[int]] = defaultdict(list)
        for i, k in enumerate(keys):
            members[k].append(i)
        table = {}
        for k, idx in sorted(members.items()):
            entry: dict[str, Any] = {"n": len(idx)}
            for metric, values in scores.items():
                v = values[idx]
                if np.isnan(v).all():   # LPIPS of a prompt with one image
                    continue
                if name == "group":
                    iv = perceptual.diversity_interval(v, prompt_index[idx], level) if metric in BY_PROMPT \
                        else mean_interval(v, level)
                    entry.update({metric: iv.estimate, f"{metric}_ci_low": iv.low, f"{metric}_ci_high": iv.high})
                else:
                    entry[metric] = float(np.mean(v))
            table[k] = entry
        out[name] = table
    return out


PER_IMAGE_TEXT = {"clip_score": "clip", "preference": "preference",
                  "lpips_diversity": "lpips"}   # their keys in per_image.npz (with ``prompt_index``)


def reference_file_key(space: str) -> str:
    """A space's reference features among a row's ``files`` (Inception's under ``reference_features``)."""
    return "reference_features" if space == "inception" else f"reference_features_{space}"


def per_image_key(space: str) -> str:
    """Where a space's generated features lie in ``per_image.npz`` (Inception's under ``features``)."""
    return "features" if space == "inception" else f"features_{space}"


def paired_deltas(refs: dict[str, Reference], a: dict[str, np.ndarray], b: dict[str, np.ndarray],
                  metrics: Sequence[Metric], groups: int = 20, level: float = 0.95, seed: int = 0,
                  n_in: int | None = None) -> dict[str, dict[str, Any]]:
    """Δ = B − A of each metric with a paired form, for two cells evaluated on the same prompts and seeds.

    ``a`` / ``b``: the cells' per-image arrays (``per_image.npz``: ``seeds``, ``clip`` and each
    space's features, ``per_image_key``); the seeds must match row by row, which is what makes
    the comparison paired. A metric either cell lacks is left out. ``n_in``: images after the
    first ``n_in`` are the held-out prompts' (``eval.held_out_prompts``): set metrics leave them
    out, per-image ones get a ``<metric>_held_out`` Δ of their own."""
    if len(a["seeds"]) != len(b["seeds"]) or not np.array_equal(a["seeds"], b["seeds"]):
        raise ValueError("paired comparison needs the same images (prompts and seeds, in order) in both cells")
    n_in = len(a["seeds"]) if n_in is None else n_in
    if n_in < len(a["seeds"]):
        per_image = [m for m in metrics if m.family in PER_IMAGE]
        held = paired_deltas(refs, {k: v[n_in:] for k, v in a.items()}, {k: v[n_in:] for k, v in b.items()},
                             per_image, groups, level, seed)
        out = paired_deltas(refs, {k: v[:n_in] for k, v in a.items()}, {k: v[:n_in] for k, v in b.items()},
                            metrics, groups, level, seed)
        return out | {f"{k}_held_out": v | {"metric": f"{k}_held_out"} for k, v in held.items()}
    comps: dict[str, Comparison] = {}
    fd_kd: dict[str, dict[str, Comparison]] = {}
    for m in metrics:
        if m.family not in PAIRED:
            continue
        if m.family in TEXT:
            ca, cb = a.get(PER_IMAGE_TEXT[m.name]), b.get(PER_IMAGE_TEXT[m.name])
            if ca is not None and cb is not None and not (np.isnan(ca).any() or np.isnan(cb).any()):
                comps[m.key] = compare_means(m.key, ca, cb, level)
            continue
        if m.family in BY_PROMPT:
            ca, cb, pa = a.get(PER_IMAGE_TEXT[m.name]), b.get(PER_IMAGE_TEXT[m.name]), a.get("prompt_index")
            if ca is not None and cb is not None and pa is not None and (~np.isnan(ca)).any():
                if not np.array_equal(pa, b.get("prompt_index")) or not np.array_equal(np.isnan(ca), np.isnan(cb)):
                    raise ValueError(f"{m.key}: the cells' images belong to different prompts")
                comps[m.key] = perceptual.compare_diversity(m.key, ca, cb, pa, level)
            continue
        key = per_image_key(m.space)
        if key not in a or key not in b or m.space not in refs:
            continue
        ref, fa, fb = refs[m.space], a[key], b[key]
        if m.family in ("fd", "kd"):
            if m.space not in fd_kd:
                fd_kd[m.space] = compare_paired(ref, fa, fb, groups=groups, level=level, seed=seed)
            c = fd_kd[m.space]["fid" if m.family == "fd" else "kid"]
        elif m.family == "vendi":
            c = compare_vendi(fa, fb, groups, level, seed)
        elif m.family == "cmmd":
            c = compare_cmmd(ref.feats, fa, fb, groups, level, seed)
        else:   # style similarity: per-image form, paired t
            c = compare_means(m.key, style.per_image(fa, ref.feats), style.per_image(fb, ref.feats), level)
        comps[m.key] = dataclasses.replace(c, metric=m.key)
    return {k: c.to_dict() | {"verdict": c.verdict(names=("A", "B"))} for k, c in comps.items()}
