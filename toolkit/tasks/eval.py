"""Task ``eval``: generate images for a reference set's captions, score FID/KID/CLIP with CIs.

    python run.py task=eval adapter=<run dir> eval.dataset=<captioned dataset> eval.num_images=5000
    python run.py -m task=eval adapter=runA,runB eval.guidance_scale=3,5,7.5 eval.seed=0,1,2
    python run.py task=eval fabric.devices=2 fabric.strategy=ddp      # sharded over 2 processes

Image i uses caption i of the reference set (cycled) and seed ``eval.seed·10⁶ + i``; ranks take
disjoint indices, so N processes give the same images and metrics as one. Each cell appends one
row (settings hash, metrics, full protocol) to the results table: ``<sweep dir>/results.jsonl``
in a multirun, ``<run dir>/results.jsonl`` otherwise; a cell whose key is there is skipped.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from toolkit.evaluation.job import evaluate


def run(cfg: DictConfig) -> dict[str, Any]:
    return evaluate(cfg).get("metrics", {})
