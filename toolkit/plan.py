"""The memory plan: before any weight loads, what each phase of the run will hold at its peak, and
a refusal, naming the knob, for a phase that will not fit.

    python run.py task=train experiment=sdxl_style data.path=<dataset> --plan     # print it and stop
    python run.py ... memory.plan=print                                           # the default: print, then run

Phases: load (host memory), encoding (latent and text caches), class images, the training step,
the validation loss, the sample grid, evaluation generation and features, task=sample's
generation. Each peak is the weights on the device then (from the component configs: parameter
counts × dtypes, quantization included; the frozen encoders off the GPU once cached) plus the
phase's own tensors, traced on fake tensors at its shapes, batch, precision, attention kernel and
gradient checkpointing (``toolkit.models.footprints``), plus the adapter, its gradients and the
optimizer's state in the step. Phases that run frozen models over many images take the largest
batch within ``memory.budget_gib`` (the same functions choose it when they run).

Modes: ``gpu`` counts what sits in GPU memory, with CUDA autocast's dtypes; ``cpu`` counts the
process's resident memory: everything loaded plus this process's own (libraries, measured now).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from toolkit.adapters.inject import add_lora
from toolkit.callbacks.sample_grid import OWN_CAPTIONS
from toolkit.data.datamodule import per_device_batch_size
from toolkit.evaluation.budget import KNOBS as EVAL_KNOBS
from toolkit.evaluation.budget import eval_budget, generation_budget
from toolkit.evaluation.protocol import read_prompts
from toolkit.models import footprints as fp
from toolkit.models import parts as model_parts
from toolkit.models import quantize
from toolkit.models.memory import GiB, Memory, OutOfBudget, fmt

log = logging.getLogger("toolkit")
TRAIN_TASKS, EVAL_TASKS = ("train", "finetune_eval"), ("eval", "finetune_eval")
AMP = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
STEP_KNOBS = ("lower data.global_batch_size (or raise trainer.accumulate_grad_batches), set "
              "module.speed.gradient_checkpointing=true, model.quantize=int8|nf4 or trainer.precision=bf16-mixed")
FROZEN_KNOBS = "raise memory.budget_gib (below the device's memory) or lower the resolution"
# cpu mode without the allocator policy (toolkit/allocator.py): glibc's default malloc kept a process's
# peak resident memory up to this much above its tensors' (25-40 % on LoRA steps, bench/README.md §18)
GLIBC_SLACK = 1.4
LEAN = ("TOOLKIT_LEAN_MALLOC=1 holds it to these figures (toolkit/allocator.py; slower on CPU: "
        "docs/speed-memory.md)")


class PlanError(ValueError):
    """A phase will not fit: the message names it, its figures and the knob."""


@dataclass
class Row:
    phase: str
    batch: int | None
    resident: int          # weights (and other persistent tensors) on the device during the phase
    peak: int              # resident + the phase's own
    where: str = "device"  # device | host
    note: str = ""
    knob: str = FROZEN_KNOBS
    budgeted: bool = False  # its batch comes from memory.budget_gib: over the device means the budget is


@dataclass
class Plan:
    mode: str
    budget_gib: float
    device: int | None
    device_how: str
    baseline: int                     # cpu mode: this process's resident memory now (libraries, config)
    weights: dict[str, int]
    rows: list[Row] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    lean: bool = True                 # cpu mode: the allocator policy holds resident memory to the tensors'

    def total(self, row: Row) -> int:
        """What the phase puts on the device, the process itself included on CPU."""
        return row.peak + (self.baseline if self.mode == "cpu" or row.where == "host" else 0)

    def verdict(self, row: Row) -> str:
        """fits / DOES NOT FIT (refused); on CPU with glibc's default allocator, "tight" where its
        slack could take the phase over the memory (said, not refused: the figures hold with the policy)."""
        if self.device is None:
            return ""
        if self.total(row) > self.device:
            return "DOES NOT FIT"
        tight = self.mode == "cpu" and not self.lean and self.total(row) * GLIBC_SLACK > self.device
        return "fits (tight: see the allocator note)" if tight else "fits"


def mode_of(cfg: DictConfig, mem: Memory) -> str:
    if mem.mode != "auto":
        return mem.mode
    acc = str(OmegaConf.select(cfg, "trainer.accelerator") or OmegaConf.select(cfg, "fabric.accelerator") or "auto")
    if acc in ("gpu", "cuda"):
        return "gpu"
    return "gpu" if acc == "auto" and torch.cuda.is_available() else "cpu"


def rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def device_memory(mode: str, mem: Memory) -> tuple[int | None, str]:
    if mem.device_gib is not None:
        return int(mem.device_gib * GiB), f"memory.device_gib={mem.device_gib:g}"
    if mode == "gpu":
        if not torch.cuda.is_available():
            return None, "no CUDA device here (set memory.device_gib to check against a card)"
        free, total = torch.cuda.mem_get_info()
        return int(free), f"{fmt(free)} free of {fmt(total)} on {torch.cuda.get_device_name()}"
    import psutil

    avail = psutil.virtual_memory().available
    return int(avail + rss()), f"{fmt(avail)} RAM available + this process's {fmt(rss())}"


def _int(x: Any, default: int = 1) -> int:
    return int(x) if isinstance(x, int) or (isinstance(x, str) and x.isdigit()) else default


def adaptation(cfg: DictConfig) -> tuple[Any, str]:
    """What the training module does to the UNet (``Speed.before_adapters``, the adapter,
    ``Speed.after_adapters``), as a function of a skeleton, and its description for the trace key."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    speed, lora = cfg.module.speed, cfg.module.lora

    def adapt(unet: torch.nn.Module) -> None:
        unet.set_attn_processor(AttnProcessor2_0() if speed.attention == "sdpa" else AttnProcessor())
        add_lora(unet, instantiate(lora))
        if speed.gradient_checkpointing:
            unet.enable_gradient_checkpointing()

    key = OmegaConf.to_container(lora, resolve=True) | {"attention": speed.attention,
                                                          "checkpointing": bool(speed.gradient_checkpointing)}
    return adapt, json.dumps(key, sort_keys=True, default=str)


def training_rows(cfg: DictConfig, p: model_parts.Parts, mem: Memory, mode: str, weights: dict[str, int]
                  ) -> list[Row]:
    d, cb, tr = cfg.data, cfg.callbacks, cfg.trainer
    res, flips = int(d.resolution), 2 if d.random_flip else 1
    world = _int(tr.devices) * _int(tr.get("num_nodes", 1))
    batch = per_device_batch_size(int(d.global_batch_size), world, int(tr.accumulate_grad_batches))
    text_trained = cfg.module.get("text_encoder_lora") is not None
    varies = bool(d.tags.shuffle) or float(d.tags.dropout) > 0
    latents_cached = bool(cb.encoded_cache.latents and d.center_crop)
    text_cached = bool(cb.encoded_cache.text) and not text_trained and not varies
    t = mem.traces
    adapt, adapt_key = adaptation(cfg)
    amp = AMP.get(str(tr.precision))
    step = fp.train_step(p.family, p.unet, model_parts.conditioning(p, t), p.latent(res, res), batch, p.dtype,
                         instantiate(cfg.module.optimizer), adapt, adapt_key, mode, amp,
                         int(p.vae.config.latent_channels), t)
    adapter = step["adapter"]
    all_weights = sum(weights.values()) + adapter
    latent = p.latent(res, res)
    rows: list[Row] = []
    vae_cost, text_cost = model_parts.encode_costs(p, (res, res), flips, t)

    def budgeted(name: str, cost: Any, cap: int, resident: int, note: str = "") -> Row:
        n = mem.batch(cost, resident, cap, name, f"Fix: {FROZEN_KNOBS}.")
        return Row(name, n, resident, resident + cost.at(n), note=note, budgeted=True)

    if cfg.callbacks.prior.class_prompt:
        cost = model_parts.generation_cost(p, res, res, float(cb.prior.guidance_scale), t)
        rows.append(budgeted("class images", cost, int(cb.prior.batch_size), all_weights))
    if latents_cached:
        rows.append(budgeted("encoding: latent cache", vae_cost, int(cb.encoded_cache.batch_size), all_weights,
                             f"{flips} variant(s) an image, VAE in {str(p.vae_dtype).removeprefix('torch.')}"))
    if text_cached:
        rows.append(budgeted("encoding: text cache", text_cost, int(cb.encoded_cache.batch_size), all_weights))
    # the frozen text encoders leave the GPU once every caption is cached, in one process or under
    # DDP (LoRADiffusion.release_text_encoders; DDP leaves their buffers alone: frozen_text_buffers)
    strategy = tr.get("strategy", "auto")   # a name, or a config of a Strategy class (its _target_)
    name = str(strategy.get("_target_", "")).rsplit(".", 1)[-1] if isinstance(strategy, DictConfig) else str(strategy)
    ddp = world == 1 or name.startswith(("ddp", "auto")) or name == "DDPStrategy"
    released = text_cached and mode == "gpu" and ddp
    text_weights = sum(v for k, v in weights.items() if k in p.family.text_encoders)
    resident = all_weights - (text_weights if released else 0) + step["optimizer_state"]
    extra, notes = 0, []
    if not latents_cached:   # the naive path: the VAE runs before the UNet in every step
        extra = max(extra, vae_cost.at(batch))
        notes.append("VAE every step")
    if not text_cached:
        extra = max(extra, text_cost.at(batch))
        notes.append("text encoders every step" + (" (trained: ≈ their forward)" if text_trained else ""))
    if released:
        notes.append("text encoders off the GPU")
    ckpt = "checkpointing" if cfg.module.speed.gradient_checkpointing else "no checkpointing"
    notes.insert(0, f"{ckpt}, {tr.precision}, adapter {fmt(adapter)} + optimizer state {fmt(step['optimizer_state'])}")
    rows.append(Row("training step", batch, resident, resident + max(step["activations"], extra), note="; ".join(notes),
                    knob=STEP_KNOBS))
    k = len(cfg.module.validation.timesteps)
    val = fp.denoise(p.family, p.unet, model_parts.conditioning(p, t), latent, p.dtype, False, mode, amp, t)
    rows.append(Row("validation loss", batch * k, resident, resident + val.at(batch * k),
                    note=f"{batch} images x {k} timesteps, no gradients", knob=STEP_KNOBS))
    grid = cb.get("sample_grid")
    if grid is None:   # ~callbacks.sample_grid: no grid
        return rows
    own = isinstance(grid.prompts, str) and grid.prompts in OWN_CAPTIONS   # the run's captions: at most num_prompts
    n_grid = (int(grid.num_prompts) if own else len(read_prompts(grid.prompts, "callbacks.sample_grid.prompts"))) \
        * len(grid.seeds)
    cost = model_parts.generation_cost(p, p.native, p.native, float(grid.guidance_scale), t)
    row = budgeted(f"sample grid ({n_grid} images)", cost, min(int(grid.batch_size), n_grid),
                   all_weights + step["optimizer_state"], "frozen encoders back on the device; VAE decodes one image "
                   "at a time")
    rows.append(row)
    return rows


def build(cfg: DictConfig) -> Plan:
    """The plan of ``cfg``'s task (train, finetune_eval, eval, sample; other tasks load no pipeline)."""
    mem = instantiate(cfg.memory)
    mode, task = mode_of(cfg, mem), str(cfg.task_name)
    text_trained = cfg.get("module") is not None and cfg.module.get("text_encoder_lora") is not None
    quantize.check(cfg.model.get("quantize"), "cuda" if mode == "gpu" else "cpu", model_parts.single_file(cfg.model))
    p = model_parts.parts(cfg.model, quantize_text=text_trained and task in TRAIN_TASKS)
    weights = p.weights()
    device, how = device_memory(mode, mem)
    plan = Plan(mode, mem.budget_gib, device, how, rss(), weights,
                lean=mode != "cpu" or bool(os.environ.get("MALLOC_MMAP_THRESHOLD_")))
    if not plan.lean:
        plan.notes.append(f"allocator: glibc's default; a CPU process's peak resident memory runs up to "
                          f"{GLIBC_SLACK - 1:.0%} above these figures; {LEAN}")
    full = model_parts.parts({**OmegaConf.to_container(cfg.model, resolve=True), "quantize": None}).weights()
    transient = max(full[c] for c in full) if cfg.model.get("quantize") else 0
    plan.rows.append(Row("load", None, sum(weights.values()), sum(weights.values()) + transient, "host",
                         "every component in host memory" + (", the UNet read in full precision then quantized"
                                                             if transient else "")))
    if not fp.traced(p.family):   # the load row only: the phases' peaks are not traced for this family
        plan.notes.append(fp.untraced(p.family, "phases after loading not planned"))
        return plan
    try:
        if task in TRAIN_TASKS:
            plan.rows += training_rows(cfg, p, mem, mode, weights)
        if task in EVAL_TASKS:
            if cfg.model.get("quantize") and cfg.eval.fuse_adapters and (cfg.adapter or task == "finetune_eval"):
                plan.problems.append(f"generation.fuse_adapters=true with model.quantize={cfg.model.quantize}: "
                                     "fusing would re-quantize W + ΔW; set generation.fuse_adapters=false")
            b = eval_budget(cfg, cfg.eval, mem)
            plan.rows.append(Row("evaluation generation", b.generation_batch, b.resident, b.generation_peak,
                                 note=f"eval.batch_size={cfg.eval.batch_size} at most", knob=EVAL_KNOBS,
                                 budgeted=True))
            plan.rows.append(Row(f"evaluation features ({', '.join(b.extractors) or 'none'})", b.feature_batch,
                                 b.resident, b.feature_peak, knob=EVAL_KNOBS, budgeted=True))
        if task == "sample":
            n, resident, peak = generation_budget(cfg, cfg.sample, mem)
            plan.rows.append(Row("generation", n, resident, peak, knob=EVAL_KNOBS, budgeted=True))
    except OutOfBudget as err:
        plan.problems.append(str(err))
    if device is not None:
        for row in plan.rows:
            if row.where == "device" and plan.total(row) > device:
                room = device - (plan.total(row) - row.peak)   # what the budget may be: the process's own left out
                knob = (f"set memory.budget_gib to at most {room / GiB:.2f} (the device's memory less what the "
                        "process holds besides; the phase then takes a smaller batch)"
                        if row.budgeted and room > 0 else row.knob)
                plan.problems.append(f"{row.phase} needs {fmt(plan.total(row))} (batch {row.batch}), more than the "
                                     f"device's {fmt(device)} ({how}): {knob}")
    return plan


def render(plan: Plan) -> list[str]:
    base = f"; this process {fmt(plan.baseline)} counted in every phase" if plan.mode == "cpu" else ""
    lines = [f"memory plan ({plan.mode} mode; phases running frozen models within memory.budget_gib="
             f"{plan.budget_gib:g}; device: {plan.device_how}{base})",
             "  weights: " + " · ".join(f"{k} {fmt(v)}" for k, v in plan.weights.items())]
    width = max(len(r.phase) for r in plan.rows)
    for r in plan.rows:
        batch = "-" if r.batch is None else str(r.batch)
        ok = plan.verdict(r)
        where = "host" if r.where == "host" else "device"
        lines.append(f"  {r.phase:<{width}}  batch {batch:>4}  {where} {fmt(plan.total(r)):>10}  "
                     f"(weights {fmt(r.resident)})  {ok}{'  · ' + r.note if r.note else ''}")
    return lines + [f"  {n}" for n in plan.notes]


def at_start(cfg: DictConfig) -> bool:
    """Print the plan (rank zero) and refuse a run with a phase that will not fit; True when the
    run should stop here (``memory.plan=only``)."""
    from toolkit.run.lifecycle import rank_zero

    if cfg.get("memory") is None or cfg.memory.plan == "off" or str(cfg.task_name) not in (
            *TRAIN_TASKS, *EVAL_TASKS, "sample"):
        return False
    plan = build(cfg)
    if rank_zero():
        for line in render(plan):
            log.info(line)
    if plan.problems:
        raise PlanError("the memory plan refuses this run before loading anything:\n  " + "\n  ".join(plan.problems))
    return cfg.memory.plan == "only"
