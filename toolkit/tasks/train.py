"""Task ``train``: fine-tune LoRA adapters on a frozen pretrained latent-diffusion pipeline.

    python run.py task=train                                   # 1 CPU, embedded default
    python run.py task=train trainer=gpu model=sd15 data=hub data.path=<hub dataset>
    python run.py task=train trainer=ddp trainer.devices=8 trainer.num_nodes=2
    python run.py hydra.run.dir=<run dir> ckpt_path=last             # resume (the run's own settings)
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from toolkit.config import in_multirun
from toolkit.locate import check_local_or_hub
from toolkit.models.pretrained import check_resolution
from toolkit.run_dir import record_event, relaunch_as_cell, resume_command
from toolkit.training import build_trainer

log = logging.getLogger(__name__)
INTERRUPTED_EXIT_CODE = 130   # 128 + SIGINT: what a shell reports for Ctrl-C


class Interrupted(Exception):
    """Training stopped by Ctrl-C without a checkpoint of the current step."""


def check_fresh_run_dir(output_dir: Path, ckpt_path: str | None) -> None:
    """Refuse to start a fresh run over another run's checkpoints (resuming is explicit)."""
    ckpts = list((output_dir / "checkpoints").glob("*.ckpt"))
    if ckpts and ckpt_path is None:
        raise FileExistsError(
            f"{output_dir} already holds {len(ckpts)} checkpoint(s) of an earlier run. Resume it with "
            f"{resume_command(output_dir)}, or start a fresh run in another directory (hydra.run.dir=...).")


def last_checkpoint(trainer: L.Trainer, output_dir: Path) -> Path:
    cb = trainer.checkpoint_callback
    return Path(cb.dirpath if cb is not None and cb.dirpath else output_dir / "checkpoints") / "last.ckpt"


def resolve_ckpt_path(ckpt_path: str | None, trainer: L.Trainer, output_dir: Path) -> str | None:
    """``last`` -> this run's ``last.ckpt`` (the one file: never a guess between versions); an
    error if there is none, rather than a silent fresh start."""
    if ckpt_path != "last":
        return ckpt_path
    path = last_checkpoint(trainer, output_dir)
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path=last: no checkpoint {path}, so there is nothing to resume in {output_dir}. Drop ckpt_path "
            "to start a fresh run (in a new hydra.run.dir).")
    return str(path)


def fit(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule,
        ckpt_path: str | None) -> None:
    """``trainer.fit`` that reads checkpoints with ``weights_only=True`` (tensors and plain
    containers only: a pickle cannot run code on load) and explains a refused file. Lightning
    turns a KeyboardInterrupt it catches (Ctrl-C before training started, or a second Ctrl-C)
    into ``exit(1)``; that becomes ``Interrupted``."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SystemExit:
        if trainer.interrupted:
            raise Interrupted from None
        raise
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refused to load checkpoint {ckpt_path!r}: it holds Python objects beyond tensors and "
            f"plain containers, and unpickling those can execute arbitrary code ({str(err).splitlines()[0]}). "
            "Resume only from checkpoints this toolkit wrote; to start from foreign LoRA weights, "
            "convert them to safetensors first.") from None


def reuse_or_resume(cfg: DictConfig, out: Path) -> tuple[DictConfig, dict[str, Any] | None]:
    """A sweep cell run again: its finished training's metrics (reused), or its interrupted
    training continued from its last checkpoint (``cfg`` with ``ckpt_path=last``)."""
    done = out / "train_metrics.json"
    if done.is_file() and (out / "adapter").is_dir():
        log.info("training of %s finished earlier: reused (%s)", out, done)
        return cfg, json.loads(done.read_text())
    if (out / "checkpoints" / "last.ckpt").is_file() and cfg.ckpt_path is None:
        log.info("training of %s was interrupted: resuming from its last checkpoint", out)
        record_event(out, "resume", ckpt_path="last", why="the sweep ran again over an interrupted cell")
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            cfg.ckpt_path = "last"
    return cfg, None


def run(cfg: DictConfig) -> dict[str, Any]:
    output_dir = Path(cfg.paths.output_dir)
    if in_multirun():   # a sweep run again: finished cells are skipped, interrupted ones resumed
        cfg, done = reuse_or_resume(cfg, output_dir)
        if done is not None:
            return done
    check_fresh_run_dir(output_dir, cfg.ckpt_path)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    # Everything that can be checked without model weights is checked first: the model and data
    # locations, the data (scan, columns, batch split) and the resolution against the VAE config.
    trainer = build_trainer(cfg)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, trainer, output_dir)
    if trainer.is_global_zero:
        log.info("run dir %s (resume: %s)", output_dir, resume_command(output_dir))
        if ckpt_path:
            log.info("starting from checkpoint %s", ckpt_path)
    check_local_or_hub(cfg.model.name_or_path, "model.name_or_path", "model", cfg.model.revision)
    datamodule = instantiate(cfg.data)
    datamodule.trainer = trainer
    datamodule.setup("fit")
    check_resolution(cfg.model.name_or_path, datamodule.resolution, cfg.model.revision, cfg.model.get("config"))
    module = instantiate(cfg.module)
    if in_multirun():   # DDP in a sweep cell: the other ranks must run this cell, not the sweep
        relaunch_as_cell(cfg.ckpt_path)

    try:
        fit(trainer, module, datamodule, ckpt_path)
    except Interrupted:
        last = last_checkpoint(trainer, output_dir)
        log.warning("interrupted at step %d, without a checkpoint of that step. %s", trainer.global_step,
                    f"The last checkpoint is {last}; resume with: {resume_command(output_dir)}" if last.is_file()
                    else "No checkpoint was written: nothing to resume.")
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
    stop = next((cb for cb in trainer.callbacks if getattr(cb, "preempted_at", None) is not None), None)
    if stop is not None:
        log.warning("stopped by %s at step %d; checkpoint %s. Resume with:\n    %s",
                    stop.requested or "a signal on another rank", stop.preempted_at, stop.checkpoint,
                    resume_command(output_dir))
        raise SystemExit(stop.exit_code)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics.update(global_step=trainer.global_step, adapter=str(output_dir / "adapter"))
    if trainer.is_global_zero:
        (output_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
        log.info("train metrics (%s): %s", output_dir / "train_metrics.json",
                 " · ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    return metrics
