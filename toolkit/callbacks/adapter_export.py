"""Write the LoRA adapter in every export format next to every checkpoint and at the end of training.

``<checkpoint dir>/adapters/step=N/`` at each save, and ``<output dir>/adapter/`` when training
ends: ``pytorch_lora_weights.safetensors`` (diffusers) and ``lora_kohya.safetensors``
(kohya/A1111/ComfyUI, with the ``ss_*`` metadata those tools display), and with an
``AdapterEMA`` callback the averaged weights in ``ema/`` beside them. Rank zero only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L

from toolkit.adapters.formats import formats_for
from toolkit.adapters.inject import save_adapter
from toolkit.callbacks.ema import AdapterEMA
from toolkit.inference.schedule import training_schedule

log = logging.getLogger(__name__)


def kohya_metadata(trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
    """The ``ss_*`` entries kohya's trainer writes and A1111/ComfyUI show in their LoRA cards."""
    dm = getattr(trainer, "datamodule", None)
    opt = trainer.optimizers[0] if trainer.optimizers else None
    res = getattr(dm, "resolution", None)
    n_train = len(dm.train_set) if getattr(dm, "train_set", None) is not None else None
    meta = {"ss_sd_model_name": str(module.pretrained.get("name_or_path")),
            "ss_output_name": "lora_kohya", "ss_training_comment": "trained with toolkit (LoRA, denoising loss)",
            "ss_steps": str(trainer.global_step), "ss_max_train_steps": str(trainer.max_steps),
            "ss_seed": str(getattr(module, "seed", "")), "ss_training_finished_at": str(time.time()),
            "ss_resolution": f"({res}, {res})" if res else "",
            "ss_learning_rate": str(opt.param_groups[0].get("initial_lr", opt.param_groups[0]["lr"])) if opt else "",
            "ss_mixed_precision": str(trainer.precision),
            "ss_caption_dropout_rate": str(module.objective.caption_dropout)}
    if dm is not None and n_train is not None:
        meta["ss_num_train_images"] = str(n_train)
        meta["ss_dataset_dirs"] = json.dumps({Path(str(dm.path)).name: {"n_repeats": 1, "img_count": n_train}})
    if getattr(module, "init_adapter_sha256", None):
        meta["toolkit_init_adapter_sha256"] = module.init_adapter_sha256
    meta["toolkit_schedule"] = json.dumps(training_schedule(module.noise_scheduler.config))
    if getattr(module, "guidance", None) is not None:   # the embedded guidance it was trained at (FLUX.1-dev)
        meta["toolkit_training_guidance"] = str(module.guidance)
    return meta



class AdapterExport(L.Callback):
    """Args:
        dirpath: where the final adapter goes (``<run dir>/adapter``).
        every_checkpoint: also export next to each Lightning checkpoint.
        formats: ``auto`` (every format that carries the adapter kind whole: diffusers + kohya for
            LoRA/DoRA, kohya/LyCORIS for LoHa/LoKr) or a list of ``diffusers``, ``kohya``.
    """

    def __init__(self, dirpath: str, every_checkpoint: bool = True, formats: Sequence[str] | str = "auto") -> None:
        self.dirpath, self.every_checkpoint = Path(dirpath), every_checkpoint
        self.requested = formats if isinstance(formats, str) else tuple(formats)
        self.formats: tuple[str, ...] = ()
        self._exported_step = -1  # "last" and "step=N" checkpoints of one step share one export

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        # before the first step: a format that cannot carry this adapter kind fails the run now
        self.formats = formats_for(module.adapter_kind, self.requested, module.family)

    def _export(self, trainer: L.Trainer, module: L.LightningModule, out: Path) -> None:
        if not trainer.is_global_zero:
            return
        meta = kohya_metadata(trainer, module)
        paths = list(save_adapter(out, module.models, module.family, self.formats, meta).values())
        ema = next((cb for cb in trainer.callbacks if isinstance(cb, AdapterEMA) and cb.active), None)
        if ema is not None:   # the averaged weights beside the raw ones: adapter_variant=ema loads them
            with ema.swapped(module):
                paths += save_adapter(out / "ema", module.models, module.family, self.formats,
                                      {**meta, "toolkit_variant": "ema", "toolkit_ema_decay": str(ema.decay)}
                                      ).values()
        log.info("adapter written: %s", ", ".join(str(p) for p in paths))

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if (self.every_checkpoint and trainer.checkpoint_callback is not None
                and trainer.global_step != self._exported_step):
            self._exported_step = trainer.global_step
            ckpt_dir = Path(trainer.checkpoint_callback.dirpath)
            self._export(trainer, module, ckpt_dir / "adapters" / f"step={trainer.global_step}")

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # (a run stopped by a signal never gets here: callbacks.preemption raises after its checkpoint)
        self._export(trainer, module, self.dirpath)
        if trainer.is_global_zero:
            log_artifact(trainer, self.dirpath)


def log_artifact(trainer: L.Trainer, adapter_dir: Path) -> None:
    """The final adapter as a wandb artifact (offline it is stored with the run and synced later)."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            import wandb

            art = wandb.Artifact(f"adapter-{lg.experiment.id}", type="lora",
                                 metadata={"step": trainer.global_step, "files": sorted(
                                     str(p.relative_to(adapter_dir)) for p in adapter_dir.rglob("*.safetensors"))})
            art.add_dir(str(adapter_dir))
            lg.experiment.log_artifact(art)
