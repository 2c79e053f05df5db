"""Evaluation throughput on this machine: generation img/s, Inception and CLIP feature img/s,
and the reference-statistics time cold vs cached.

    python bench/eval_throughput.py [--model DIR] [--clip DIR] [--data DIR] [--n 200] [--steps 25]

Defaults: the embedded miniature (data/miniature/sd, data/miniature/clip) and the held-out
style set (data/world/style/test).
"""

import argparse
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

from toolkit.config import ROOT
from toolkit.evaluation import reference
from toolkit.inference.pipeline import generate, load_pipeline
from toolkit.metrics.clip import CLIPScorer
from toolkit.metrics.inception import InceptionFeatures


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "data/miniature/sd"))
    ap.add_argument("--clip", default=str(ROOT / "data/miniature/clip"))
    ap.add_argument("--data", default=str(ROOT / "data/world/style/test"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=50)
    args = ap.parse_args()

    refset = reference.load_reference(args.data, "image", "text", "train", args.n)
    ref, fp = refset.rows, refset.identity
    images_ref = [r["image"] for r in ref]
    inception = InceptionFeatures(batch_size=args.batch)
    cache = Path(tempfile.mkdtemp())
    key = reference.cache_key(fp, inception.protocol)

    def cold():
        feats = inception(images_ref, progress=False)
        reference.save_cached(cache, key, feats)
        return feats

    _, t_cold = timed(cold)
    _, t_hot = timed(lambda: reference.load_cached(cache, key))
    pipe = load_pipeline(args.model, scheduler="DDIMScheduler")
    prompts = [str(c) for c in ref["text"]]
    gen, t_gen = timed(lambda: generate(pipe, prompts, list(range(args.n)), args.steps, 5.0,
                                        batch_size=args.batch, progress=False))
    _, t_inc = timed(lambda: inception(gen, progress=False))
    clip = CLIPScorer(args.clip, batch_size=args.batch)
    _, t_clip = timed(lambda: clip.scores(gen, prompts, progress=False))
    print(OmegaConf.to_yaml({
        "n_images": args.n, "steps": args.steps, "batch": args.batch,
        "generation_img_per_s": round(args.n / t_gen, 2),
        "inception_img_per_s": round(args.n / t_inc, 2),
        "clip_img_per_s": round(args.n / t_clip, 2),
        "reference_stats_cold_s": round(t_cold, 2), "reference_stats_cached_s": round(t_hot, 4)}))


if __name__ == "__main__":
    main()
