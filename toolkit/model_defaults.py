"""Settings that follow the model: what the user does not set comes from the model they named.

    python run.py task=train model.name_or_path=<SD-1.5 id, folder or .safetensors> data.path=<images>
      -> data.resolution=512 (unet sample_size 64 x VAE factor 8), module=lora (the SD-1.x/2.x preset),
         generation: DDIMScheduler, 25 steps, guidance 5 (the UNet families' sampler)
    ... model.name_or_path=<an SD3.5 id or folder>
      -> data.resolution=1024 (transformer sample_size 128 x VAE factor 8), module=lora_sd3,
         generation: FlowMatchEulerDiscreteScheduler, 28 steps, guidance 7 (the SD3 pipeline's)

The shipped config leaves these values open (``auto`` / null), and ``run.py`` fills each from the
model before Hydra composes the run, as if the user had typed it, so the choice is in the run's
saved overrides and config (a resume replays it) and under ``chosen.<key>`` with its reason,
which the task logs once at start. Each comes from the model's family piece
(``toolkit.models.families``), never from a branch here:

- ``data.resolution`` (null): the model's native size, the denoiser's ``sample_size`` x VAE factor
  (training, and ``task=prepare``: the smallest side it keeps);
- ``module`` (``auto``): the family's preset (``ModelFamily.preset``); the embedded miniature keeps its own
  (training, and ``task=prepare`` for ``prepare.encode=true``);
- ``generation.scheduler`` / ``steps`` / ``guidance_scale`` (``auto``): the family's sampler, steps
  and guidance (``ModelFamily.sampling``), for the tasks that generate (train's sample grid, eval,
  sample);
- ``eval.dataset`` (``auto``): the miniature's held-out style split for the embedded model on its
  style set; for any other model the held-out part of ``data.path`` (``held_out``: the images the
  datamodule keeps out of training) when it has at least ``MIN_REFERENCE`` images, else an error
  asking for one;
- ``metrics.clip_model`` (``auto``): the miniature's CLIP for the embedded model only; any other
  model needs a real CLIP named (or ``metrics.clip_model=null``: no CLIP score, said in the row);
- ``callbacks.sample_grid.prompts`` (``auto``): the miniature's shape prompts for the embedded model,
  for any other the run's own held-out captions (``validation``).

Everything here reads configs only (no weights), so a refusal comes before anything is loaded.
In a sweep (``-m``) they are chosen per cell, from the cell's own composed config (after its
experiment applies), by the sweeper (``hydra_plugins/toolkit_sweeper``) before any cell starts:
a sweep over experiments or models naming different models trains each at its own size with its
own preset, and a cell that cannot be chosen for stops the sweep before anything runs.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from toolkit.config import CONFIG_DIR, register_resolvers

# the embedded miniature's parts, under paths.data_dir (toolkit.config.data_dir)
EMBEDDED_MODEL, EMBEDDED_CLIP, EMBEDDED_STYLE = "miniature/sd", "miniature/clip", "world/style"
EMBEDDED_GRID_PROMPTS = "miniature/grid_prompts.txt"   # shapes the miniature knows, striped and not
EMBEDDED_PRESET = "lora_miniature"
GENERATION = ("scheduler", "steps", "guidance_scale")   # generation.<key>=auto: the family's
EMBEDDED_NUM_REF = 500
# Fewer reference images than this make FID/KID mostly sample-size bias (FID's bias falls as 1/N,
# Chong & Forsyth 2020) and their intervals too wide to tell two adapters apart; the miniature's
# job uses 500. A smaller held-out part is refused rather than scored.
MIN_REFERENCE = 200
EVAL_TASKS = ("eval", "finetune_eval")
TRAIN_TASKS = ("train", "finetune_eval")
# task=prepare builds the training data (the smallest side kept is data.resolution) and, with
# prepare.encode=true, the training module: both follow the model as in training
MODEL_TASKS = (*TRAIN_TASKS, "prepare")
GENERATING_TASKS = ("train", "finetune_eval", "eval", "sample")


class ModelDefaultsError(ValueError):
    """A value left to the model cannot be chosen: the message says which key to set."""


def embedded_data(cfg: DictConfig) -> Path | None:
    """The embedded miniature's folder (``paths.data_dir``), or None where it is not installed."""
    from omegaconf.errors import InterpolationResolutionError

    try:
        return Path(cfg.paths.data_dir).resolve()
    except InterpolationResolutionError:   # an installed package without TOOLKIT_DATA: no miniature here
        return None


def same_path(a: Any, b: Path | None) -> bool:
    path = Path(str(a)).expanduser()
    return b is not None and path.exists() and path.resolve() == b.resolve()


def native_resolution(name_or_path: str, revision: str | None = None, config: str | None = None) -> tuple[int, str]:
    """The model's native training size and how it was read (the denoiser's ``sample_size`` x VAE factor)."""
    from toolkit.models.pretrained import check_model_path, denoiser_config, vae_factor

    check_model_path(name_or_path, config, allow_pickle=True)
    family = family_of_model(OmegaConf.create({"name_or_path": name_or_path, "revision": revision, "config": config}))
    dcfg = denoiser_config(name_or_path, revision, config)
    factor = vae_factor(name_or_path, revision, config)
    return family.native_size(dcfg, factor), (f"the model's native size ({family.denoiser_label} sample_size "
                                              f"{family.native_sample_size(dcfg)} x VAE factor {factor})")


def family_of_model(m: DictConfig) -> Any:
    """The model's family piece; a pipeline of no supported family is refused here, before any weight."""
    from toolkit.models.families import UnsupportedFamily
    from toolkit.models.pretrained import check_model_path, model_family

    check_model_path(m.name_or_path, m.get("config"), allow_pickle=True)
    try:
        return model_family(m.name_or_path, m.revision, m.get("config"))
    except UnsupportedFamily as err:
        raise ModelDefaultsError(str(err)) from None


def held_out_count(data: DictConfig) -> int:
    return _held_out_count(data.path, data.split, data.validation_split, data.val_fraction, data.seed,
                           data.image_column, data.caption_column, data.revision, data.get("local"))


@functools.lru_cache(maxsize=64)
def _held_out_count(*args: Any) -> int:   # the cells of a sweep share their data: counted once
    from toolkit.data.sources import held_out

    return len(held_out(*args))


GUIDANCE_KEYS = ("generation.guidance_scale", "eval.guidance_scale", "sample.guidance_scale",
                 "callbacks.sample_grid.guidance_scale")


def _compose(args: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return compose("config", overrides=args, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check_guidance(cfg: DictConfig, family: Any, index: Any, dcfg: Any) -> None:
    """A sampling guidance the model ignores (schnell; a step-distilled Klein) is refused: rows and grids
    would carry a guidance their images were not made with (a guidance sweep: the same images, other labels)."""
    if (why := family.guidance_ignored(index, dcfg)) is None:
        return
    for key in GUIDANCE_KEYS:
        value = OmegaConf.select(cfg, key, throw_on_missing=False, default=None)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 1:
            raise ModelDefaultsError(f"{key}={value}: {why}; set it to at most 1 (or leave generation.* to the model)")


def choose(cfg: DictConfig, given: set[str]) -> dict[str, tuple[Any, str]]:
    """``{key: (value, reason)}`` for every open setting of the composed ``cfg`` (keys the user
    gave, in ``given``, are never touched). Raises ``ModelDefaultsError`` naming the key to set."""
    m, task = cfg.model, cfg.task_name
    data = embedded_data(cfg)
    model, clip, style = ((data / p) if data else None for p in (EMBEDDED_MODEL, EMBEDDED_CLIP, EMBEDDED_STYLE))
    embedded = same_path(m.name_or_path, model)
    out: dict[str, tuple[Any, str]] = {}
    if task in MODEL_TASKS:
        if cfg.hydra.runtime.choices.get("module") == "auto":
            if embedded:
                out["module"] = (EMBEDDED_PRESET, "the embedded miniature's own preset")
            else:
                family = family_of_model(m)
                out["module"] = (family.preset, f"the preset for the {family.name.upper()} family")
        if cfg.data.resolution is None:
            out["data.resolution"] = native_resolution(m.name_or_path, m.revision, m.get("config"))
        if OmegaConf.select(cfg, "callbacks.sample_grid.prompts") == "auto":
            out["callbacks.sample_grid.prompts"] = (
                (str(data / EMBEDDED_GRID_PROMPTS), "the embedded miniature's shape prompts") if embedded else
                ("validation", "the run's own captions: the first ones of its held-out images"))
    gen = cfg.get("generation")
    if task in GENERATING_TASKS and gen is not None:
        from toolkit.models.pretrained import denoiser_config, pipeline_index

        family = family_of_model(m)
        index, dcfg = (f(m.name_or_path, m.revision, m.get("config")) for f in (pipeline_index, denoiser_config))
        if any(gen.get(k) == "auto" for k in GENERATION):
            sampling = family.sampling(index, dcfg)
            for k in GENERATION:
                if gen.get(k) == "auto":
                    out[f"generation.{k}"] = (sampling[k], f"the {family.name.upper()} family's sampling {k}")
        check_guidance(cfg, family, index, dcfg)
    if task in EVAL_TASKS:
        if cfg.eval.dataset == "auto":
            if embedded and same_path(OmegaConf.select(cfg, "data.path", throw_on_missing=False), style / "train"):
                out["eval.dataset"] = (str(style / "test"), "the held-out split of the embedded style set")
                if cfg.eval.num_ref is None and "eval.num_ref" not in given:
                    out["eval.num_ref"] = (EMBEDDED_NUM_REF, "the embedded style test set's reference size")
            elif task == "finetune_eval" and (n := held_out_count(cfg.data)) >= MIN_REFERENCE:
                out["eval.dataset"] = ("held_out", f"the {n} images of data.path held out of training "
                                       f"(data.val_fraction={cfg.data.val_fraction})")
            else:
                have = (f"data.path holds out only {n} images (data.val_fraction={cfg.data.val_fraction}), fewer "
                        f"than the {MIN_REFERENCE} a FID/KID reference needs"
                        if task == "finetune_eval" else "task=eval has no training data to hold out")
                raise ModelDefaultsError(
                    f"eval.dataset: the embedded miniature's test set applies only to the embedded model on its "
                    f"style set, and {have}. Pass eval.dataset=<a captioned folder or hub dataset of the target "
                    f"style> (or raise data.val_fraction so that data.path holds out at least {MIN_REFERENCE}).")
        if cfg.metrics.clip_model == "auto":
            if not embedded:
                raise ModelDefaultsError(
                    "metrics.clip_model: the default is the embedded miniature's 128-d CLIP, which fits only the "
                    f"embedded model, not {m.name_or_path!r}. Name a real CLIP (a hub id such as "
                    "openai/clip-vit-large-patch14, or a local CLIPModel folder), or set metrics.clip_model=null to "
                    "leave the CLIP score out (said in each row's protocol).")
            out["metrics.clip_model"] = (str(clip), "the embedded miniature's CLIP (for the embedded model)")
    return out


def as_overrides(chosen: dict[str, tuple[Any, str]]) -> list[str]:
    """The choices as command-line overrides: ``key=value`` and ``+chosen.key="value: why"``."""
    from toolkit.run.resume import hydra_quote

    extra = []
    for key, (value, why) in chosen.items():
        extra.append(f"{key}={hydra_quote(str(value))}")
        extra.append(f"+chosen.{key}={_quote(f'{value}: {why}')}")
    return extra


def cell_overrides(cfg: DictConfig, cell: list[str]) -> list[str]:
    """The choices for one sweep cell (``cell``: its overrides; ``cfg``: its composed config)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = {o.key_or_group for o in OverridesParser.create().parse_overrides(cell)}
    return as_overrides(choose(cfg, given))


def model_overrides(args: list[str]) -> list[str]:
    """``args`` plus an override for every setting left to the model, each with its reason under
    ``chosen.<key>``. Raises ``ModelDefaultsError`` before any weight is read. A sweep (``-m``) is
    left as it is: its cells are chosen for one by one (``cell_overrides``, by the sweeper). What a
    resume's saved overrides or a DDP child's command line already carry is no longer open, so only
    settings still open are chosen (those a newer version leaves to the model, on a run made before it)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a in ("-m", "--multirun") for a in args):
        return args
    lines = [a for a in args if ("=" in a or a.startswith("~")) and not a.startswith("-")]   # deletions too
    parsed = OverridesParser.create().parse_overrides(lines)
    cfg = _compose([o.input_line for o in parsed])
    chosen = choose(cfg, {o.key_or_group for o in parsed})
    # a key chosen before and reopened now (a resume given ``data.resolution=null``): its old reason goes,
    # Hydra refuses a second ``+chosen.<key>``
    stale = tuple(f"{p}chosen.{k}=" for k in chosen for p in ("+", ""))
    return [*(a for a in args if not a.startswith(stale)), *as_overrides(chosen)]


def chosen_lines(cfg: DictConfig) -> list[str]:
    """The ``chosen`` block as log lines (``data.resolution 512: the model's native size ...``)."""
    from toolkit.run.resume import flatten

    if not cfg.get("chosen"):
        return []
    return [f"{key}={why}" for key, why in flatten(OmegaConf.to_container(cfg.chosen, resolve=True)).items()]
