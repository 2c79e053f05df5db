"""Task ``sample``: images from a base pipeline plus adapters, with every setting recorded.

    python run.py task=sample adapter=<run dir> sample.prompts=prompts.txt sample.seeds=[0,1,2,3]
    python run.py task=sample 'sample.prompts=[a red circle, a blue square]' sample.lora_scale=0.5

Writes ``samples/NNNNN.png`` with ``NNNNN.json`` beside each (prompt, seed, settings),
``samples.jsonl`` (all of them) and ``grid.png`` (a row per prompt, a column per seed).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from toolkit.config import as_list
from toolkit.evaluation.budget import generation_budget
from toolkit.evaluation.protocol import read_prompts, versions
from toolkit.inference.pipeline import call_kwargs, generate, generation_record, make_grid, pipeline_from_cfg

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    s = cfg.sample
    out = Path(cfg.paths.output_dir)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    prompts = read_prompts(s.prompts)
    seeds = [int(x) for x in as_list(s.seeds)]
    pairs = [(p, sd) for p in prompts for sd in seeds]
    batch, _, _ = generation_budget(cfg, s, instantiate(cfg.memory))   # sample.batch_size at most
    pipe = pipeline_from_cfg(cfg, s)
    images = generate(pipe, [p for p, _ in pairs], [sd for _, sd in pairs], s.steps, s.guidance_scale,
                      s.negative_prompt, s.height, s.width, batch, call_kwargs=call_kwargs(cfg.model))
    record = {**generation_record(cfg, s), "versions": versions()}
    rows = []
    for i, (img, (prompt, seed)) in enumerate(zip(images, pairs)):
        img.save(out / "samples" / f"{i:05d}.png")
        row = {"file": f"samples/{i:05d}.png", "prompt": prompt, "seed": seed, **record}
        (out / "samples" / f"{i:05d}.json").write_text(json.dumps(row, indent=1, default=str))
        rows.append(row)
    (out / "samples.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    make_grid(images, cols=len(seeds)).save(out / "grid.png")
    log.info("%d images in %s, grid %s", len(images), out / "samples", out / "grid.png")
    return {"num_images": len(images), "grid": str(out / "grid.png")}
