"""What seeding every sample's draws on its own costs a training step (toolkit/reproducibility.py).

    python bench/sample_draws.py [--steps 20] [overrides ...]      # the default job's module and batch

One process, the same batch, alternating: a forward + backward of the training loss with per-sample
generators (``SampleDraws``, what training does: one generator per sample and kind of draw, plus the
micro-batch's global seed) against the same with torch's global generator (one batched draw per
kind, as before). Prints the median step of each and their ratio as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg
    from toolkit.reproducibility import SampleDraws, seed_global, seed_micro_batch

    out = Path("/tmp/bench-sample-draws")
    cfg = compose_cfg(["task=train", f"hydra.run.dir={out}", *args.overrides], out)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = instantiate(cfg.module)
    module.train()
    module.vae.eval()
    for enc in module.text_encoders:
        enc.eval()

    def step(per_sample: bool) -> float:
        t = time.perf_counter()
        if per_sample:
            seed_micro_batch(0, batch["keys"])
            draws = SampleDraws(0, batch["keys"])
            b = {**batch, "captions": module.objective.captions(batch["captions"], draws("caption_dropout"))}
        else:
            seed_global(0)
            draws, b = None, {**batch, "captions": module.objective.captions(batch["captions"])}
        module.diffusion_loss(b, draws=draws).backward()
        module.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    def draws_only() -> float:   # every draw a training sample takes, at the batch's latent shape
        from toolkit.models import objectives

        t = time.perf_counter()
        seed_micro_batch(0, batch["keys"])
        d = SampleDraws(0, batch["keys"])
        n = len(batch["captions"])
        shape = (n, 4, *[side // 4 for side in batch["pixel_values"].shape[2:]])   # the miniature's VAE: 4 channels, /4
        module.objective.captions(batch["captions"], d("caption_dropout"))
        for kind in ("latent", "noise", "perturbation"):
            objectives.randn(shape, d(kind))
        objectives.randn((n, 4, 1, 1), d("offset"))
        objectives.sample_timesteps_density(n, 1000, generator=d("timestep"))
        return time.perf_counter() - t

    step(True), step(False)   # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.steps):
        for per_sample in (True, False):
            times[per_sample].append(step(per_sample))
    a, b = statistics.median(times[True]), statistics.median(times[False])
    alone = statistics.median(draws_only() for _ in range(50))
    print(json.dumps({"batch": len(batch["captions"]), "per_sample_ms": round(a * 1e3, 1),
                      "global_ms": round(b * 1e3, 1), "ratio": round(a / b, 3),
                      "draws_alone_ms": round(alone * 1e3, 2)}))


if __name__ == "__main__":
    main()
