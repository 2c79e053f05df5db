"""What a run prints: each line once, known-harmless library chatter silenced at its source,
warnings that change results prefixed so they stand out, and progress that reads well both in a
terminal (a bar) and in a log file (a line every so often).

    quiet()                 # run.py, once, before anything is imported: filters + env defaults
    route_library_logs()    # after the task's imports: library loggers print through ours only
    for x in progress(items, "encoding latents", unit="img"): ...     # or bar = progress(total=n, desc=...)

``TOOLKIT_VERBOSE=1`` turns every filter off (library warnings, tips, model summaries' notices,
wandb's notices) to see everything a library says. Each silenced message is listed in
``HARMLESS`` / ``HARMLESS_WARNINGS`` with the reason it is harmless here.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

# Log records: originating logger -> messages (regex, searched) that never mean a wrong result here.
HARMLESS: dict[str, tuple[str, ...]] = {
    # transformers 5 without torchvision: image processors fall back to their PIL twins (we never
    # process images with them; CLIP features use our own preprocessing).
    "transformers.utils.import_utils": (r"requires torchvision \(not installed\); falling back",),
    # Lightning's start-up inventory: hardware lines (the accelerator is in the config), an
    # advertisement, and a restatement of limit_val_batches.
    "lightning.pytorch.utilities.rank_zero": (
        r"^(GPU|TPU|HPU|IPU) available:", r"💡 Tip:", r"^`Trainer\(limit_\w+_batches=[\d.]+\)` was configured",
        r"^`Trainer\.fit` stopped: `max_steps=\d+` reached", r"^You are using a CUDA device .* Tensor Cores",
        r"^LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES", r"^Restoring states from the checkpoint path",
        r"^Restored all states from the checkpoint"),
    "lightning.fabric.utilities.seed": (r"^Seed set to",),          # the seed is in .hydra/config.yaml
    # diffusers warns on .to(dtype) even when no module needs float32 (the list is empty).
    "diffusers.models.modeling_utils": (r"that should be kept in float32: \[\]\.",),
    # diffusers' LoRA loader, for an adapter without tensors for a component (e.g. no text-encoder
    # LoRA): toolkit/adapters/loading.py counts every layer that arrived and fails on a shortfall.
    "diffusers.loaders.lora_base": (r"^No LoRA keys associated to \w+ found with the prefix=",),
    "diffusers.loaders.peft": (r"^No LoRA keys associated to \w+ found with the prefix=",),
    "lightning.fabric.utilities.distributed": (r"^Initializing distributed:",),
    # torchao / bitsandbytes (the quantize extra), imported by diffusers whenever installed: their
    # CUDA-only kernels (mxfp8, Hopper cutlass, triton) fail to load on a CPU build; bitsandbytes'
    # optional hub kernel for CPU 4-bit is not fetched offline (its own CPU code runs instead); the
    # torchao tensor types diffusers registers serve pre-quantized checkpoints, which are never read
    # here (toolkit/models/quantize.py quantizes while loading).
    "torchao": (r"^Failed to load .*_C_\w+.*\.so",),
    "torchao.kernel.intmm": (r"Detected no triton",),
    "bitsandbytes.backends.cpu.ops": (r"^Failed to load CPU gemm_4bit_forward from kernels-community",),
    "kernels._internals.hf_hub": (r"^Skipping publisher trust check for 'kernels-community/",),
    "diffusers.quantizers.torchao.torchao_quantizer": (
        r"^Unable to import `torchao` Tensor objects",
        # int8 weights with float32 activations run (tests/test_quantize.py: output within the
        # int8 rounding of the float32 UNet's); diffusers only says bf16 is what it tests
        r"for integer quantization, but only bfloat16 is supported right now"),
    # torch asks libraries to stop registering enums with pytree (torchao does, at import)
    "torch.utils._pytree": (r"is an Enum subclass and is now natively supported by torch.compile",),
    "lightning.pytorch.accelerators.cuda": (r"^LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES",),
}
LIBRARY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "diffusers", "datasets",
                   "huggingface_hub")
LIBRARY_LOGGING = ("transformers.utils.logging", "datasets.utils.logging", "huggingface_hub.utils.logging",
                   "diffusers.utils.logging")
# Python warnings (message regex, matched from the start): Lightning notices that describe our
# design, not a problem.
HARMLESS_WARNINGS: tuple[str, ...] = (
    r".*module\(s\) in eval mode at the start of training",   # the frozen base is in eval mode on purpose
    r".*you need to define a `flops_per_batch`",               # ThroughputMonitor logs img/s without FLOPs
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated",     # Lightning vs torch 2.13 internals
    r".*Checkpoint directory .* exists and is not empty",      # a resume: fresh runs over checkpoints are refused
    r".*does not have many workers which may be a bottleneck", # data.num_workers is a documented knob
    r".*The number of training batches \(\d+\) is smaller than the logging interval",
    r".*Starting from v1\.9\.0, `tensorboardX` has been removed",
    r".*The `srun` command is available on your system but is not used",
    # one finetune_eval cell logs training and both evaluations into one dashboard run, on purpose
    r".*There is a wandb run already in progress and newly created instances of `WandbLogger` will reuse",
)


def verbose() -> bool:
    """``TOOLKIT_VERBOSE=1``: print everything the libraries say."""
    return os.environ.get("TOOLKIT_VERBOSE", "").lower() in ("1", "true", "yes")


def interactive() -> bool:
    """A person is watching (stderr is a terminal): draw bars; otherwise print progress lines."""
    return sys.stderr.isatty()


class HarmlessFilter(logging.Filter):
    """Drops records whose message matches one of ``patterns``."""

    def __init__(self, patterns: Iterable[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(p.search(msg) for p in self.patterns)


def quiet() -> None:
    """Install the filters (once, at start-up, before the libraries are imported: some speak at
    import time). No-op with ``TOOLKIT_VERBOSE=1``."""
    if verbose():
        return
    os.environ.setdefault("WANDB_SILENT", "true")   # wandb's banner, sync hints and tips
    # MLflow's "View run <name> at: <url>" lines, printed at every run's end: toolkit/tracking.py logs each link once
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name, patterns in HARMLESS.items():
        lg = logging.getLogger(name)
        if not any(isinstance(f, HarmlessFilter) for f in lg.filters):
            lg.addFilter(HarmlessFilter(patterns))
    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def finish_trackers() -> None:
    """End the dashboard run of the task that just ran (wandb keeps one per process otherwise, and
    every later multirun cell would be logged into it)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def wandb_logger(**kwargs):
    """Lightning's ``WandbLogger`` without the ``anonymous=None`` it always passes to
    ``wandb.init``: wandb (0.31 here) prints "The anonymous setting has no effect" for any value,
    before its silent mode applies, as the first line of every run's log."""
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(**kwargs)
    if logger._wandb_init.get("anonymous", "unset") is None:
        del logger._wandb_init["anonymous"]
    return logger


def route_library_logs() -> None:
    """Make library loggers print through the root handlers only (set up from
    ``conf/hydra/default.yaml``): ``lightning`` installs its own console handler at import, and
    ``datasets`` / ``huggingface_hub`` add one while still propagating, so their lines printed
    twice; transformers/diffusers printed in their own formats, outside ``run.log``. Also turns off
    progress bars that are noise here: transformers' per-tensor "Loading weights" and datasets'
    bars for local folders (our scan reports progress itself). Call after the task's imports."""
    for name in LIBRARY_LOGGING:   # each library adds its handler when its logging is first used
        if name in sys.modules or not name.startswith("diffusers"):   # diffusers: only if in use (imports torch)
            with contextlib.suppress(ImportError):
                mod = importlib.import_module(name)
                mod.get_logger()
                if not verbose() and hasattr(mod, "disable_progress_bar"):
                    mod.disable_progress_bar()
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True


class WarningsOnly(logging.Filter):
    """Warnings and errors pass; the routine lines do not."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def once_per_job(rank: int) -> None:
    """On ranks other than zero the root handlers (console and ``run.log``) keep warnings and
    errors only: the routine lines (data scan, caches, steps) are the job's, printed by rank zero
    once, not once per process (srun and torchrun start every rank with the same logging)."""
    if rank == 0:
        return
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, WarningsOnly) for f in h.filters):
            h.addFilter(WarningsOnly())


class ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS message``; warnings and errors as ``HH:MM:SS WARNING message`` so the lines that
    may mean a wrong result stand out from the routine ones."""

    def __init__(self, datefmt: str = "%H:%M:%S") -> None:
        super().__init__("%(asctime)s %(message)s", datefmt)
        self._loud = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt)

    def format(self, record: logging.LogRecord) -> str:
        return (self._loud if record.levelno >= logging.WARNING else super()).format(record)


def duration(seconds: float) -> str:
    """``1:02:03`` / ``2:03``."""
    s = int(round(max(seconds, 0)))
    h, m = divmod(s, 3600)
    return f"{h}:{m // 60:02d}:{m % 60:02d}" if h else f"{m // 60}:{m % 60:02d}"


class LineProgress:
    """tqdm's shape (iterate, or ``update(n)`` + ``close()``, or ``with``) for a log: a line
    ``desc: n/total (p%) · rate · time left`` every ``every_s`` seconds, and a closing line when it
    ran longer than that."""

    def __init__(self, iterable: Iterable[Any] | None, desc: str, total: int | None, unit: str,
                 every_s: float, disable: bool) -> None:
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.every_s, self.disable = every_s, disable
        self.n, self.t0 = 0, time.monotonic()
        self._last, self._closed = self.t0, False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.disable and now - self._last >= self.every_s:
            self._last = now
            log.info("%s", progress_line(self.desc, self.n, self.total, now - self.t0, self.unit))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        took = time.monotonic() - self.t0
        if not self.disable and took >= self.every_s:
            log.info("%s: %d %s in %s", self.desc, self.n, self.unit, duration(took))

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update()
        self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(iterable: Iterable[T] | None = None, desc: str = "", total: int | None = None, unit: str = "it",
             every_s: float = 30.0, disable: bool = False) -> Any:
    """A drop-in for ``tqdm(...)`` that reads well in both places: a tqdm bar when stderr is a
    terminal; in a log, ``LineProgress`` (a line every ``every_s`` seconds instead of a bar redrawn
    with carriage returns). Iterate over it, or call ``update(n)`` and ``close()``.

    Args:
        iterable: what to iterate over (None: update it by hand).
        desc: what is being done ("encoding latents").
        total: number of items (default: ``len(iterable)`` when it has one).
        unit: name of one item, for the rate.
        every_s: seconds between lines in a log.
        disable: no output at all (e.g. on ranks other than zero, or nothing to do).
    """
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)   # type: ignore[arg-type]
    if interactive():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, mininterval=0.5, dynamic_ncols=True,
                    disable=disable)
    return LineProgress(iterable, desc, total, unit, every_s, disable)


def progress_line(desc: str, n: int, total: int | None, elapsed: float, unit: str = "it") -> str:
    rate = n / elapsed if elapsed > 0 else 0.0
    parts = [f"{desc}: {n}/{total} ({100 * n / total:.0f}%)" if total else f"{desc}: {n}",
             f"{rate:.1f} {unit}/s"]
    if total and rate > 0:
        parts.append(f"{duration((total - n) / rate)} left")
    return " · ".join(parts)
