"""Ship the default job's reference features with the miniature (``data/miniature/reference_features``).

    python -m miniature.reference_features                    # the default job's: Inception + CLIP, 500 images
    python -m miniature.reference_features --out <folder> eval.num_ref=1000    # other settings: any overrides

Composes the job's config as ``run.py`` does (the settings chosen from the model included), then
runs the evaluation's own steps (``toolkit.evaluation.job``: the reference set and its identity, the
feature models, ``reference_features`` with the cache and any shipped features turned off) and
writes each space's features under its cache key (``toolkit.evaluation.shipped.write``). Run it
after the miniature's CLIP or the test set changes (``data/miniature/rebuild.sh`` does): features
under a stale key are never used, the job computes them and says which setting differs.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from omegaconf import DictConfig, open_dict

from toolkit.config import data_dir


def compose(overrides: list[str]) -> DictConfig:
    """The config ``python run.py <overrides>`` runs with."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from toolkit.config import CONFIG_DIR, register_resolvers, renamed_overrides
    from toolkit.model_defaults import model_overrides

    register_resolvers()
    args = model_overrides(renamed_overrides(overrides)[0])
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=args)


def ship(cfg: DictConfig, folder: str | Path) -> dict[str, Path]:
    """Compute the reference features of ``cfg``'s evaluation, as its job would, and ship each
    space's under its cache key in ``folder``; returns the files written."""
    from lightning import Fabric

    from toolkit.evaluation import job, shipped
    from toolkit.evaluation.scores import parse_metrics
    from toolkit.metrics.clip import load_clip

    m = cfg.metrics
    with open_dict(m):
        m.cache_reference, m.shipped_reference = False, None   # computed now, from the images
    fabric = Fabric(accelerator="cpu", devices=1)
    wanted = parse_metrics(m.compute)
    needs_clip = any(x.name == "clip_score" or (x.space == "clip" and m.features.clip == "same") for x in wanted)
    clip = load_clip(m.clip_model, fabric.device) if needs_clip else None
    extractors = job.feature_models(m, wanted, clip, fabric.device)
    refset = job.reference_set(cfg)   # through the data policy, as the job reads it
    ref, identity, image_column = refset.rows, refset.identity, refset.image_column
    size = job.reference_size(cfg)
    real, keys, _ = job.reference_features(fabric, m, ref, image_column, size, identity, extractors)
    return {s: shipped.write(folder, keys[s], s, identity, job.protocol_of(s, e, size), real[s])
            for s, e in extractors.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="folder (default: data/miniature/reference_features)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the default job")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from toolkit.evaluation.reference import SHIPPED

    for space, path in ship(compose(a.overrides), a.out or Path(data_dir()) / SHIPPED).items():
        print(f"{space}: {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
