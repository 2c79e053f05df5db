"""Test-only callbacks and modules, injected through the real config (``+callbacks.x._target_=tests.helpers.X``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from safetensors.torch import save_file

from toolkit.training.module import LoRADiffusion


class DumpRankLoRA(L.Callback):
    """Each rank writes its LoRA tensors at the end of training (to compare ranks in DDP tests)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous() for k, v in module.trainable_state_dict().items()}
        save_file(sd, self.dirpath / f"rank{trainer.global_rank}.safetensors")


class NaNLoRA(LoRADiffusion):
    """The real module, with a loss that turns NaN from optimizer step ``nan_at_step`` on
    (fault injection through the config: ``module._target_=tests.helpers.NaNLoRA``)."""

    def __init__(self, *args: Any, nan_at_step: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nan_at_step = nan_at_step

    def diffusion_loss(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().diffusion_loss(*args, **kwargs)
        return loss * float("nan") if self.training and self.global_step >= self.nan_at_step else loss


class RecordLoRA(L.Callback):
    """Keeps the trainable tensors after every optimizer step (``history[step]``), for checks of
    what a run computed from them (e.g. the EMA)."""

    history: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        RecordLoRA.history = {}

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        RecordLoRA.history[trainer.global_step] = {k: v.detach().clone()
                                                  for k, v in module.trainable_state_dict().items()}


class RecordBatches(L.Callback):
    """Keeps the training batches (``batches``), for checks of what the loader produced."""

    batches: list[dict[str, Any]] = []

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        RecordBatches.batches = []

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        RecordBatches.batches.append(batch)


class SignalAt(L.Callback):
    """Sends ``signal`` to this process at the start of the first batch of optimizer step ``step``
    + 1 whose index in its accumulation window is ``window_batch`` — once per ``marker`` file, so a
    resume (which replays the run's overrides) is not signalled again."""

    def __init__(self, step: int, signal: str, marker: str, window_batch: int = 0) -> None:
        self.step, self.signal, self.marker, self.window_batch = step, signal, Path(marker), window_batch

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        import os
        import signal

        if (not self.marker.exists() and trainer.global_step == self.step
                and batch_idx % trainer.accumulate_grad_batches == self.window_batch):
            self.marker.write_text(str(batch_idx))
            os.kill(os.getpid(), getattr(signal, self.signal))


class RecordStep(L.Callback):
    """The trainable tensors before the first step, its gradients (before clipping) and the tensors after."""

    seen: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        RecordStep.seen = {"before": [p.detach().clone() for p in module.denoiser_lora_params]}

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        RecordStep.seen["grads"] = [p.grad.detach().clone() for p in module.denoiser_lora_params]
        RecordStep.seen["lr"] = optimizer.param_groups[0]["lr"]

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        RecordStep.seen["after"] = [p.detach().clone() for p in module.denoiser_lora_params]


def one_process_trainer(datamodule: Any) -> Any:
    """What ``EncodedCache.on_fit_start`` reads of a Trainer, for one process (no fit needed)."""
    strategy = type("S", (), {"barrier": staticmethod(lambda: None)})()
    return type("T", (), {"datamodule": datamodule, "global_rank": 0, "world_size": 1, "num_nodes": 1,
                          "node_rank": 0, "local_rank": 0, "num_devices": 1, "strategy": strategy})()


def free_port() -> int:
    """A TCP port nothing listens on now (for a rendezvous or a local server)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WriteBatchKeys(L.Callback):
    """Each rank appends, per training batch, the global step and a digest of every item's input
    tensor (which image, as it was cut) to ``<dirpath>/rank<r>.jsonl``: what a run trained on, step
    by step, to compare runs on different numbers of processes."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        import hashlib
        import json

        field = "latent_params" if "latent_params" in batch else "pixel_values"
        keys = [hashlib.sha256(t.detach().cpu().numpy().round(4).tobytes()).hexdigest()[:16] for t in batch[field]]
        self.dirpath.mkdir(parents=True, exist_ok=True)
        with open(self.dirpath / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "keys": keys}) + "\n")


class ScancelAt(L.Callback):
    """Rank 0 asks SLURM to send ``signal`` to every task of this job (``scancel --signal``, what
    ``--signal=USR1@<s>`` does before a time limit) at the start of optimizer step ``step`` + 1,
    once per ``marker`` file (a requeued job replays the run's overrides, this callback included).
    ``signal`` may map task names to signals (the cells of a sweep), ``task`` naming this one's."""

    def __init__(self, step: int, signal: str | dict[str, str], marker: str, task: str | None = None) -> None:
        self.step, self.marker = step, Path(marker)
        self.signal = signal[task] if isinstance(signal, dict | DictConfig) else signal

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        import subprocess

        from toolkit.run.signals import slurm_job

        if trainer.is_global_zero and trainer.global_step == self.step and not self.marker.exists():
            self.marker.write_text(slurm_job())
            subprocess.run(["scancel", f"--signal={self.signal}", slurm_job()], check=True)


class SlowSteps(L.Callback):
    """Each optimizer step takes at least ``seconds`` (a run long enough to meet a SLURM time limit;
    waiting changes no number)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        import time

        time.sleep(self.seconds)


def keys_per_step(folder: Path) -> dict[int, list[str]]:
    """The sample keys each optimizer step trained on, over every rank's ``WriteBatchKeys`` file:
    a step once per rank (a resumed copy of the run, replaying its overrides, appends its own later)."""
    import json

    steps: dict[int, list[str]] = {}
    for f in sorted(folder.glob("rank*.jsonl")):
        seen: set[int] = set()
        for line in f.read_text().splitlines():
            row = json.loads(line)
            if row["step"] not in seen:
                seen.add(row["step"])
                steps.setdefault(row["step"], []).extend(row["keys"])
    return {s: sorted(k) for s, k in steps.items()}


def kohya_read_back(run: Path, model: str, family: Any, adapter: str) -> Any:
    """A transformer family's run: its kohya file and its diffusers file (``adapter``) read by the toolkit
    against the model's module shapes give the same updates (1e-6), every layer matched; the kohya read."""
    from toolkit.adapters.formats import KOHYA_FILE, read_adapter
    from toolkit.adapters.layers import compare_updates
    from toolkit.adapters.loading import module_shapes
    from toolkit.models.pretrained import skeletons

    _, models = skeletons(model)
    mods = {c: module_shapes(m) for c, m in models.items()}
    cfg = models["transformer"].config
    kohya = read_adapter(run / "adapter" / KOHYA_FILE, family, mods, cfg).require_matched()
    diff = read_adapter(run / adapter, family, mods, cfg).require_matched()
    cmp = compare_updates(diff.updates("transformer"), kohya.updates("transformer"))
    assert cmp.ok(1e-6), cmp.describe()
    assert {w.rank for w in kohya.layers["transformer"].values()} == {4}   # the parts' own ranks, not 3 x 4
    return kohya


def loss_and_vae_sample(cfg: DictConfig, draw: bool = True
                        ) -> tuple[torch.Tensor, LoRADiffusion, dict[str, Any], torch.Tensor]:
    """The module's diffusion loss on the first training batch at seed 0, the module, the batch, and the
    VAE's latent sample z drawn as the module draws it (seed 0 again: what follows z is the module's noise);
    ``draw=False``: z is the posterior's mean, nothing drawn."""
    from hydra.utils import instantiate

    from toolkit.reproducibility import seed_global

    dm = instantiate(cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = instantiate(cfg.module)
    module.eval()
    seed_global(0)
    got = module.diffusion_loss(batch)
    seed_global(0)
    with torch.no_grad():
        mean, logvar = module.vae.encode(batch["pixel_values"]).latent_dist.parameters.chunk(2, dim=1)
        z = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn(mean.shape) if draw else mean
    return got, module, batch, z


def resumes_bit_identically(run: Path, copy: Path, steps: int, adapter: str) -> None:
    """A copy of a finished ``steps``-step run, stopped as if at its step-2 checkpoint, resumed through the
    entry point (``ckpt_path=last``): its exported adapter equals the uninterrupted run's, tensor for tensor."""
    import shutil

    from tests.conftest import run_entry
    from tests.test_fault_tolerance import same_tensors

    shutil.copytree(run, copy)
    for p in (copy / "adapter", copy / "checkpoints" / "adapters" / f"step={steps}"):
        shutil.rmtree(p)
    (copy / "checkpoints" / f"step={steps}.ckpt").unlink()
    shutil.copy(copy / "checkpoints" / "step=2.ckpt", copy / "checkpoints" / "last.ckpt")   # stopped at step 2
    res = run_entry([f"hydra.run.dir={copy}", "ckpt_path=last"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert same_tensors(copy / adapter, run / adapter)


def ddp_overrides(out: Path) -> list[str]:
    """2 DDP processes, 3 steps, each rank's LoRA dumped and each step's batch keys written (in ``out``)."""
    return ["trainer=ddp", "trainer.devices=2", "trainer.max_steps=3",
            "+callbacks.dump._target_=tests.helpers.DumpRankLoRA", f"+callbacks.dump.dirpath={out}/ranks",
            *batch_keys(out)]


def batch_keys(out: Path) -> list[str]:
    """Overrides that write each step's batch keys into ``out/keys`` (``WriteBatchKeys``)."""
    return ["+callbacks.keys._target_=tests.helpers.WriteBatchKeys", f"+callbacks.keys.dirpath={out / 'keys'}"]


def finished_run(args: list[str], out: Path) -> Path:
    """``python run.py ARGS`` run to its end (asserted), its console kept in ``out/entry.log``; ``out``."""
    from tests.conftest import run_entry

    res = run_entry(args)
    assert res.returncode == 0, res.stderr[-3000:]
    (out / "entry.log").write_text(res.stdout + res.stderr)
    return out


def sample_images(folder: Path) -> list[Any]:
    """``task=sample``'s images in ``folder/samples``, as integer arrays."""
    import numpy as np
    from PIL import Image

    return [np.asarray(Image.open(p)).astype(int) for p in sorted((folder / "samples").glob("*.png"))]


def two_ranks_train_what_one_trains(args: list[str], out: Path, one_process_run: Path) -> None:
    """The run ``args`` (with ``ddp_overrides(out)``) on 2 processes: both ranks hold one LoRA, and together
    they train on the images the one-process run (its ``keys`` folder) trains on, step by step."""
    from safetensors.torch import load_file

    from tests.conftest import run_entry

    res = run_entry(args)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (load_file(out / "ranks" / f"rank{r}.safetensors") for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    one, two = keys_per_step(one_process_run / "keys"), keys_per_step(out / "keys")
    assert two and all(two[s] == one[s] for s in two)
