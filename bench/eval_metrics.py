"""The cost of each metric of an evaluation cell, at the default job's sizes.

    python bench/eval_metrics.py [--clip DIR] [--data DIR] [--ref 500] [--fake 250] [--groups 20]

Prints (1) the feature extraction each feature space adds, per reference set (paid once, then
cached) and per generated image, and (2) the seconds of each metric's number with its interval
(the grouped jackknife over ``--groups`` groups) and of its paired Δ, on features of the default
job's shapes: Inception 2048-d, the CLIP image embeddings (the miniature's CLIP: 128-d; CMMD with
``features.clip=same`` reuses the CLIP score's embeddings, so a generated image costs nothing
more), and 1024-d features for a DINOv2 ViT-L-sized space. The "generated" features are the
reference features of other images with noise added: a metric's cost depends on the shapes only.
(3) LPIPS diversity per generated image (its trunk forward and the within-prompt pairs, ``--per-prompt``
images a prompt) for AlexNet and VGG-16 at 64, 256 and 512 px, on a randomly initialised trunk
(the cost depends on the shapes only; no weights ship offline).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from toolkit.config import ROOT
from toolkit.evaluation import reference
from toolkit.evaluation.scores import compute_scores, paired_deltas, parse_metrics
from toolkit.metrics import perceptual
from toolkit.metrics.clip import CLIPScorer
from toolkit.metrics.features import FeatureModel
from toolkit.metrics.inception import InceptionFeatures
from toolkit.metrics.intervals import Reference


def best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clip", default=str(ROOT / "data/miniature/clip"))
    ap.add_argument("--data", default=str(ROOT / "data/world/style/test"))
    ap.add_argument("--ref", type=int, default=500)
    ap.add_argument("--fake", type=int, default=250)
    ap.add_argument("--groups", type=int, default=20)
    ap.add_argument("--per-prompt", type=int, default=4)
    args = ap.parse_args()

    ref_rows = reference.load_reference(args.data, "image", "text", "train", args.ref).rows
    images = [reference.reference_image(r["image"], (64, 64)) for r in ref_rows]
    inception, scorer = InceptionFeatures(), CLIPScorer(args.clip, batch_size=50)
    clip = FeatureModel("clip", args.clip, model=scorer.model)
    t_inc = best(lambda: inception(images, progress=False), 1)
    t_clip = best(lambda: clip(images, progress=False), 1)
    print(f"feature extraction on {len(images)} reference images (once per reference set, then cached):")
    print(f"  inception {t_inc:7.2f} s   clip (CMMD, features.clip=same) {t_clip:7.2f} s")
    print("  per generated image: CMMD with features.clip=same adds 0 (the CLIP score's embeddings)")

    rng = np.random.default_rng(0)
    feats = {"inception": inception(images, progress=False), "clip": clip(images, progress=False)}
    feats["dinov2"] = rng.standard_normal((len(images), 1024)) @ (rng.standard_normal((1024, 1024)) / 32)
    refs = {s: Reference.from_features(f) for s, f in feats.items()}
    fake = {s: f[: args.fake] + 0.05 * f.std() * rng.standard_normal((args.fake, f.shape[1])) for s, f in feats.items()}
    fake_b = {s: f + 0.05 * f.std() * rng.standard_normal(f.shape) for s, f in fake.items()}
    clip_scores = rng.uniform(20, 30, args.fake)
    seeds = np.arange(args.fake)
    pi = lambda d: {"seeds": seeds, "clip": clip_scores, "features": d["inception"], "features_clip": d["clip"],
                    "features_dinov2": d["dinov2"]}
    print(f"\nseconds per cell, {args.ref} reference / {args.fake} generated, G={args.groups} "
          "(number + interval; paired Δ of two cells):")
    print(f"  {'metric':16s} {'score':>8s} {'paired':>8s}")
    for name in ("fid", "kid", "prdc", "vendi", "clip_score", "cmmd", "fd_dinov2", "kd_dinov2", "vendi_dinov2"):
        m = parse_metrics([name])
        t_s = best(lambda m=m: compute_scores(refs, fake, {"clip_score": clip_scores}, m, args.groups))
        t_p = best(lambda m=m: paired_deltas(refs, pi(fake), pi(fake_b), m, args.groups)) \
            if name not in ("prdc",) else float("nan")
        print(f"  {name:16s} {t_s:8.3f} {t_p:8.3f}")

    k = args.per_prompt
    print(f"\nLPIPS diversity, seconds per generated image ({k} images a prompt, trunk + pairs):")
    for net in ("alex", "vgg"):
        model = perceptual.LPIPS(net).eval()
        for side in (64, 256, 512):
            ims = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(k)]
            t = best(lambda m=model, x=ims: perceptual.pairwise(m, x, batch_size=k), 2)
            print(f"  {net:5s} {side:4d} px {t / k:8.4f}")


if __name__ == "__main__":
    main()
