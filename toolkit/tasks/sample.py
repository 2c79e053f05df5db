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

from omegaconf import DictConfig, OmegaConf

from toolkit.evaluation.protocol import as_list, read_prompts, versions
from toolkit.inference.pipeline import adapter_sha256, generate, load_pipeline, make_grid
from toolkit.models.pretrained import model_family

log = logging.getLogger(__name__)


def pipeline_from_cfg(cfg: DictConfig, gen: DictConfig, device: Any = "cpu"):
    return load_pipeline(**OmegaConf.to_container(cfg.model, resolve=True), adapters=as_list(cfg.adapter),
                         lora_scales=[float(s) for s in as_list(gen.lora_scale)], adapter_variant=cfg.adapter_variant,
                         scheduler=gen.scheduler, fuse_adapters=gen.fuse_adapters, device=device)


def generation_record(cfg: DictConfig, gen: DictConfig) -> dict[str, Any]:
    """Everything that determines a generated image, besides its prompt and seed."""
    m = cfg.model
    return {"model": OmegaConf.to_container(m, resolve=True),
            "family": model_family(m.name_or_path, m.revision, m.get("config")).name,
            "adapters": [{"path": str(a), "variant": cfg.adapter_variant,
                          "sha256": adapter_sha256(a, cfg.adapter_variant)} for a in as_list(cfg.adapter)],
            "lora_scale": as_list(gen.lora_scale), "scheduler": gen.scheduler, "steps": gen.steps,
            "guidance_scale": gen.guidance_scale, "negative_prompt": gen.negative_prompt,
            "fuse_adapters": gen.fuse_adapters,
            "height": gen.height, "width": gen.width}


def run(cfg: DictConfig) -> dict[str, Any]:
    s = cfg.sample
    out = Path(cfg.paths.output_dir)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    prompts = read_prompts(s.prompts)
    seeds = [int(x) for x in as_list(s.seeds)]
    pairs = [(p, sd) for p in prompts for sd in seeds]
    pipe = pipeline_from_cfg(cfg, s)
    images = generate(pipe, [p for p, _ in pairs], [sd for _, sd in pairs], s.steps, s.guidance_scale,
                      s.negative_prompt, s.height, s.width, s.batch_size)
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
