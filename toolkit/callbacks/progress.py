"""Training progress in optimizer steps toward ``trainer.max_steps``: loss, images/s, time left.

In a terminal, one bar::

    train 120/300 ████████████                   loss 0.1043 · val/loss 0.0981 · 23.8 img/s · 2:01 left

In a log (stderr is not a terminal: a batch job, a pipe), a line every ``every_n_steps`` steps or
``every_s`` seconds, whichever comes first, and one at the end::

    12:01:05 step 120/300 (40%) · loss 0.1043 · val/loss 0.0981 · 23.8 img/s · 1:20 elapsed · 2:01 left

Replaces Lightning's bar (which counts batches per epoch, shows ``Epoch 13/-2`` for step-bounded
runs and prints nothing without a terminal). Rank zero only.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

from toolkit.logs import duration, interactive

log = logging.getLogger(__name__)


def images_in(batch: Any) -> int:
    """Items in a batch: its captions, else the leading size of its first tensor."""
    if isinstance(batch, dict):
        if "captions" in batch:
            return len(batch["captions"])
        batch = next(iter(batch.values()), [])
    if isinstance(batch, list | tuple):
        return images_in(batch[0]) if batch else 0
    return int(batch.shape[0]) if hasattr(batch, "shape") and batch.ndim else 1


def _count(n: float) -> str:
    for div, suffix in ((1e9, " B"), (1e6, " M"), (1e3, " K")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(int(n))


class StepProgress(ProgressBar):
    """Args:
        every_n_steps: in a log, a line every this many optimizer steps (None: a tenth of the run).
        every_s: in a log, a line at least every this many seconds while steps advance.
        mode: ``auto`` (a bar in a terminal, lines otherwise), ``bar`` or ``lines``.
        batch_size_fn: images in a batch (for images/s); default ``images_in``.
        window: images/s and time left are measured over the last this many optimizer steps (the
            first step, with its warm-up, is never in it).
    """

    def __init__(self, every_n_steps: int | None = None, every_s: float = 60.0, mode: str = "auto",
                 batch_size_fn: Callable[[Any], int] | None = None, window: int = 20) -> None:
        super().__init__()
        if mode not in ("auto", "bar", "lines"):
            raise ValueError(f"callbacks.progress.mode={mode!r}: expected auto, bar or lines")
        self.every_n_steps, self.every_s, self.mode = every_n_steps, float(every_s), mode
        self.batch_size_fn = batch_size_fn or images_in
        self.window = max(2, int(window))
        self._enabled = True
        self._bar: Any = None
        self._redirect: Any = None

    # ProgressBar interface
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _active(self, trainer: L.Trainer) -> bool:
        return self._enabled and trainer.is_global_zero

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.total = trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
        self.start_step = self._last_step = self._line_step = trainer.global_step
        self.t0 = self._line_t = time.monotonic()
        self._images = 0
        self._recent: deque[tuple[float, int, int]] = deque(maxlen=self.window)   # (time, step, images)
        self._first: tuple[float, int, int] | None = None   # after the first step: warm-up left out
        if not self._active(trainer):
            return
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in module.parameters())
        what = f"resuming at step {self.start_step} of {self.total}" if self.start_step else f"{self.total} steps"
        log.info("training: %s; %s trainable of %s parameters", what, _count(trainable), _count(total))
        self.every = self.every_n_steps or max(1, round(self.total / 10))
        if self.mode == "bar" or (self.mode == "auto" and interactive()):
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect = logging_redirect_tqdm()   # log lines print above the bar, not through it
            self._redirect.__enter__()

            # the numbers ride in {unit}: tqdm would prefix {postfix} with ", "
            self._bar = tqdm(total=self.total, initial=self.start_step, desc="train", unit="", dynamic_ncols=True,
                             file=sys.stderr, leave=True, bar_format="{desc} {n_fmt}/{total_fmt} {bar:30} {unit}")

    def _numbers(self, trainer: L.Trainer, since: tuple[float, int, int] | None) -> tuple[list[str], float | None]:
        """Loss, val loss, images/s since ``since`` (time, step, images), and seconds left."""
        parts = []
        for key in ("train/loss", "val/loss"):
            if key in trainer.callback_metrics:
                parts.append(f"{key.removeprefix('train/')} {float(trainer.callback_metrics[key]):.4f}")
        now, step = time.monotonic(), trainer.global_step
        if since is None or step <= since[1] or now <= since[0]:
            return parts, None
        t, s, n = since
        parts.append(f"{(self._images - n) / (now - t):.1f} img/s")
        return parts, (self.total - step) * (now - t) / (step - s)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._active(trainer):
            return
        self._images += self.batch_size_fn(batch) * trainer.world_size
        step = trainer.global_step
        if step == self._last_step:   # gradient accumulation: no optimizer step yet
            return
        self._last_step = step
        parts, left = self._numbers(trainer, self._recent[0] if self._recent else None)
        self._recent.append((time.monotonic(), step, self._images))
        self._first = self._first or self._recent[0]
        if left is not None:
            parts.append(f"{duration(left)} left")
        if self._bar is not None:
            self._bar.n, self._bar.unit = step, " · ".join(parts)
            self._bar.refresh()
            return
        now = time.monotonic()
        if step - self._line_step >= self.every or now - self._line_t >= self.every_s or step >= self.total:
            self._line_step, self._line_t = step, now
            parts.insert(-1 if parts and parts[-1].endswith("left") else len(parts),
                         f"{duration(now - self.t0)} elapsed")
            log.info("step %d/%d (%d%%) · %s", step, self.total, 100 * step // max(self.total, 1), " · ".join(parts))

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._close_bar()
        if not self._active(trainer):
            return
        parts, _ = self._numbers(trainer, self._first)
        step = trainer.global_step
        log.info("training %s at step %d/%d: %d steps in %s · %s", "done" if step >= self.total else "stopped",
                 step, self.total, step - self.start_step, duration(time.monotonic() - self.t0),
                 " · ".join(parts) or "no metrics")

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self._close_bar()
