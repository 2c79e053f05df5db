"""The one paired comparison of two evaluation rows: Δ = B − A image by image, or why it cannot be.

Two rows pair when every image i of one was made from the same prompt and seed as image i of the
other and both are scored against the same reference set: same prompts (their hash), same seeds
(row by row in ``per_image.npz``), same reference identity, size and feature extractor, same
number of images. The Δ interval uses the rows' own interval settings (``metrics.interval_groups``,
``metrics.level``, the evaluation seed), so ``finetune_eval``'s ``paired.json``, ``summarize`` and
the report give the same numbers. A pair that is not one, or whose files are gone, is said so
(``Pairing.reason``), never computed as if it were.

Row files are stored relative to the results table's folder when they lie under it (a moved sweep
still pairs); ``toolkit.results.read_rows`` hands them out resolved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.evaluation import reference
from toolkit.evaluation.scores import SPACES, paired_deltas, parse_metrics, reference_file_key

# settings that must be equal for image i of one row to be comparable with image i of the other
SAME = (("prompts_sha256", "prompts"), ("dataset", "reference set"), ("num_ref", "number of reference images"),
        ("num_images", "number of images"), ("inception_sha256", "Inception weights"),
        ("clip_sha256", "CLIP weights"), ("features", "feature models"), ("held_out", "held-out prompts"),
        ("seed", "evaluation seed"))
SAME_METRICS = (("reference_size", "reference size"), ("interval_groups", "interval groups"),
                ("level", "interval level"), ("channels_last", "Inception layout"))


@dataclass
class Pairing:
    deltas: dict[str, dict[str, Any]] = field(default_factory=dict)   # metric -> paired_deltas entry
    reason: str | None = None                                          # why there is no paired Δ

    @property
    def method(self) -> str:
        return "paired jackknife over images" if self.reason is None else f"not paired: {self.reason}"


def row_file(row: dict[str, Any], name: str) -> Path | None:
    f = (row.get("files") or {}).get(name)
    return Path(f) if f else None


def per_image(row: dict[str, Any]) -> dict[str, np.ndarray] | None:
    f = row_file(row, "per_image")
    if f is None or not f.is_file():
        return None
    with np.load(f) as z:
        return {k: z[k] for k in z.files}


def mismatch(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """What makes two rows' images not comparable one to one (None: they pair)."""
    sa, sb = a["settings"], b["settings"]
    for key, what in SAME:
        if sa.get(key) != sb.get(key):
            return f"{what} differ"
    for key, what in SAME_METRICS:
        if (sa.get("metrics") or {}).get(key) != (sb.get("metrics") or {}).get(key):
            return f"{what} differ"
    return None


def pair(a: dict[str, Any], b: dict[str, Any]) -> Pairing:
    """Δ = ``b`` − ``a`` paired image by image, with the rows' interval settings."""
    if (problem := mismatch(a, b)) is not None:
        return Pairing(reason=problem)
    a_img, b_img = per_image(a), per_image(b)
    for row, img in ((a, a_img), (b, b_img)):
        if img is None:
            return Pairing(reason=f"per-image file {row_file(row, 'per_image')} of row {row.get('key')} "
                                  "is missing")
    if not np.array_equal(a_img["seeds"], b_img["seeds"]):
        return Pairing(reason="seeds differ image by image")
    refs = {}
    for space in SPACES:
        f = row_file(a, reference_file_key(space))
        if f is None:
            continue
        if not f.is_file():
            return Pairing(reason=f"reference features {f} are missing (cache cleared?): evaluate either row again "
                                  "(eval.force=true) to recompute them")
        refs[space] = reference.statistics(f)
    m, seed = a["settings"]["metrics"], int(a["settings"]["seed"])
    both = [x for x in parse_metrics(compute(a)) if x.name in set(compute(b))
            and (x.name != "lpips_diversity" or a["settings"].get("lpips") == b["settings"].get("lpips"))]
    deltas = paired_deltas(refs, a_img, b_img, both, int(m["interval_groups"]), float(m["level"]), seed,
                           n_in=int(a["settings"]["num_images"]))
    return Pairing(deltas=deltas)


def compute(row: dict[str, Any]) -> list[str]:
    """The metrics a row computed (rows from before ``metrics.compute``: FID, KID, CLIP, Vendi)."""
    return list((row["settings"].get("metrics") or {}).get("compute") or ["fid", "kid", "clip_score", "vendi"])
