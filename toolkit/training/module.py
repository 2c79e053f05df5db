"""The LightningModule that fine-tunes LoRA adapters on a frozen latent-diffusion pipeline.

Family-agnostic: which denoiser is trained (a UNet, SD3's transformer), how prompts become its
conditioning (one CLIP for SD-1.x/2.x; two encoders, pooled embedding and size/crop time ids for
SDXL; two CLIPs and T5 for SD3) and how it is called are asked of the family piece
(``toolkit.models.families``); the noise process (DDPM or rectified flow) of the objective
(``toolkit.models.objective``). This module never branches on the family. The denoiser and the
text encoders are registered under their pipeline names (``unet`` / ``transformer``,
``text_encoder`` ...), so checkpoint keys read ``unet.<module>.lora_A...`` for the UNet families.

Checkpoints hold only the trainable (LoRA) tensors plus Lightning's optimizer/scheduler/loop
state: the frozen base is reloaded from ``model.name_or_path`` and never written to disk.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning as L
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from peft import PeftConfig

from toolkit.adapters.inject import add_lora, init_from_file
from toolkit.hashing import text_key
from toolkit.models.families import ModelFamily
from toolkit.models.objective import Objective
from toolkit.models.pretrained import check_model_path, load_components, model_family
from toolkit.reproducibility import VALIDATION, SampleDraws, gather_rng_states, seed_micro_batch, set_rng_state
from toolkit.run.processes import rescale_batch_progress
from toolkit.training.optimizers import optimizers
from toolkit.training.speed import Speed

log = logging.getLogger(__name__)


MICRO_FIELDS = ("original_size", "crop_top_left", "target_size")   # (h, w) pairs: SDXL's time_ids in order


def fixed_micro_conditioning(family: type[ModelFamily], fixed: Mapping[str, Any] | None) -> torch.Tensor:
    """A (6,) tensor: the values to use instead of each image's own, NaN where the image's are used.

    ``fixed`` maps ``original_size`` / ``crop_top_left`` / ``target_size`` to an (h, w) pair or None,
    e.g. ``{original_size: [1024, 1024], crop_top_left: [0, 0]}`` as other SDXL trainers allow."""
    fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
    unknown = set(fixed) - set(MICRO_FIELDS)
    if unknown:
        raise ValueError(f"module.micro_conditioning: unknown keys {sorted(unknown)}; expected {list(MICRO_FIELDS)}")
    if fixed and not family.micro_conditioned:
        raise ValueError(f"module.micro_conditioning={fixed} is set, but a {family.name} model takes no size/crop "
                         "conditioning (only SDXL does); remove it")
    out = torch.full((6,), float("nan"))
    for i, name in enumerate(MICRO_FIELDS):
        if name in fixed:
            if len(fixed[name]) != 2:
                raise ValueError(f"module.micro_conditioning.{name}={fixed[name]}: expected [height, width]")
            out[2 * i: 2 * i + 2] = torch.tensor([float(x) for x in fixed[name]])
    return out


class LoRADiffusion(L.LightningModule):
    """LoRA fine-tuning of a pipeline's denoiser (and optionally its text encoders).

    Args:
        pretrained: kwargs of :func:`toolkit.models.pretrained.load_components`
            (``name_or_path``, ``revision``, ``variant``, ``dtype``).
        lora: peft config of the denoiser's adapter (``toolkit.adapters.inject.adapter_config``: LoRA,
            DoRA, LoHa or LoKr).
        optimizer: partial optimizer, called with the trainable parameters.
        objective: the denoising objective (``toolkit.models.objective.Objective``): noise, timesteps,
            targets, weights and the loss.
        lr_scheduler: partial ``diffusers.optimization.get_scheduler`` (called with the optimizer
            and ``num_training_steps``), or None for a constant LR.
        text_encoder_lora: adapter config for the text encoder(s) the family's LoRA loader reads (SD3:
            the two CLIPs, not T5), or None to keep them frozen.
        init_adapter: a LoRA file (diffusers, kohya/A1111 or LyCORIS LoCon) to start from: its
            rank, α and target layers replace ``lora``/``text_encoder_lora``'s, and training
            continues from its weights (verified to apply the file's update exactly).
        speed: the speed knobs (``toolkit.training.speed.Speed``).
        validation: ``{timesteps, seed}`` of the validation loss: fixed timesteps and fixed noise,
            so the figure is comparable across runs and checkpoints.
        seed: seed of the per-step random draws (``toolkit.reproducibility``).
        nonfinite: on a NaN/inf loss: ``stop`` (raise, naming the last good checkpoint) or
            ``skip`` (no update for that batch; stops after ``max_skipped_steps`` skips).
        max_skipped_steps: how many non-finite steps ``skip`` tolerates in one run.
        micro_conditioning: SDXL only: fixed ``original_size`` / ``crop_top_left`` /
            ``target_size`` ([h, w] each, None: each image's own) instead of the per-image values.
    """

    def __init__(
        self,
        pretrained: Mapping[str, Any],
        lora: PeftConfig,
        optimizer: Callable[..., torch.optim.Optimizer],
        objective: Objective | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        text_encoder_lora: PeftConfig | None = None,
        init_adapter: str | None = None,
        speed: Speed | None = None,
        validation: Mapping[str, Any] | None = None,
        seed: int = 0,
        nonfinite: str = "stop",
        max_skipped_steps: int = 10,
        micro_conditioning: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.pretrained = dict(pretrained)
        self.objective = objective or Objective()
        speed = speed or Speed()
        if text_encoder_lora is not None:   # refused before any weight loads, not silently left untrained
            check_model_path(self.pretrained["name_or_path"], self.pretrained.get("config"),
                             self.pretrained.get("allow_pickle", False))
            family = model_family(self.pretrained["name_or_path"], self.pretrained.get("revision"),
                                  self.pretrained.get("config"))
            if not any(n in family.lora_components() for n in family.text_encoders):
                raise ValueError(f"module.text_encoder_lora: the {family.name} family's LoRA loader "
                                 f"({family.pipeline_class.__name__}) reads the {family.denoiser_label}'s LoRA only, "
                                 "so a text-encoder adapter could not be used: set module.text_encoder_lora=null")
        # a trained text encoder runs every step (no text cache), so model.quantize covers it too
        c = load_components(**self.pretrained, quantize_text_encoders=text_encoder_lora is not None)
        self.family, self.text_options = c.family, c.text_options
        # the family's noise process (DDPM / rectified flow), checked against the objective's options
        self.process = self.objective.prepare(self.family.noise_process(c.noise_scheduler))
        self.noise_scheduler = self.process.scheduler
        self.vae = c.vae
        setattr(self, self.family.denoiser, c.denoiser)   # registered under its pipeline name: unet / transformer
        for name, tok in c.tokenizers.items():
            setattr(self, name, tok)
        for name, enc in c.text_encoders.items():   # registered as submodules under their pipeline names
            setattr(self, name, enc)
        self.micro_override = fixed_micro_conditioning(self.family, micro_conditioning)
        self.guidance = c.guidance   # the embedded guidance training feeds (FLUX.1-dev; model.guidance)
        speed.before_adapters(self.denoiser, self.vae, self.family)
        self.init_adapter_sha256: str | None = None
        if init_adapter:
            log.info("module.init_adapter=%s: rank, alpha and targets come from the file (module.lora's are "
                     "not used)", init_adapter)
            af, params = init_from_file(self.models, self.family, init_adapter,
                                         dropout=getattr(lora, "lora_dropout", getattr(lora, "rank_dropout", 0.0)))
            self.init_adapter_sha256 = af.sha256
            self.denoiser_lora_params = params.get(self.family.denoiser, [])
            self.text_lora_params = [p for c, ps in params.items() if c != self.family.denoiser for p in ps]
        else:
            self.denoiser_lora_params = add_lora(self.denoiser, lora)
            self.text_lora_params = [] if text_encoder_lora is None else [   # every text encoder its loader reads
                p for enc in self.trainable_text_encoders for p in add_lora(enc, copy.deepcopy(text_encoder_lora))]
        speed.after_adapters(self.denoiser, self.trainable_text_encoders if self.text_lora_params else [])
        self.speed, self.compiled, self.compile_checked = speed, False, False
        self.optimizer_fn, self.lr_scheduler_fn = optimizer, lr_scheduler
        validation = {"timesteps": (100, 300, 500, 700, 900), "seed": 0, **(validation or {})}
        self.val_timesteps, self.val_seed = tuple(validation["timesteps"]), validation["seed"]
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"module.nonfinite={nonfinite!r}: expected 'stop' or 'skip'")
        self.seed, self.nonfinite, self.max_skipped_steps = seed, nonfinite, max_skipped_steps
        self.skipped_steps = 0
        self.step_losses: list[torch.Tensor] = []   # this optimizer step's micro-batch losses
        self.val_total = [0.0, 0]
        self.text_cache: Any = None   # set by the EncodedCache callback
        self.text_encoders_released = False
        # Frozen base weights are absent from our checkpoints, so loading must not be strict.
        self.strict_loading = False

    @property
    def models(self) -> dict[str, torch.nn.Module]:
        """The pipeline components by their pipeline names (what adapter files are keyed by)."""
        return {c: getattr(self, c) for c in self.family.components()}

    @property
    def denoiser(self) -> torch.nn.Module:
        """The family's denoiser (the ``unet`` or ``transformer`` submodule)."""
        return getattr(self, self.family.denoiser)

    @property
    def adapter_kind(self) -> str:
        """``lora``, ``dora``, ``loha`` or ``lokr``: the peft config class of the denoiser's adapter."""
        cfg = self.denoiser.peft_config["default"]
        kind = {"LORA": "lora", "LOHA": "loha", "LOKR": "lokr"}[str(cfg.peft_type.value)]
        return "dora" if kind == "lora" and getattr(cfg, "use_dora", False) else kind

    @property
    def pipeline_components(self) -> dict[str, Any]:
        """Everything the family's pipeline needs but the scheduler, by pipeline name."""
        return {n: getattr(self, n) for n in self.family.pipeline_parts()}

    # diffusers' ``ModelMixin.dtype`` walks every submodule (looking for layerwise-casting hooks, which
    # this toolkit never sets): ~2 ms per call on the miniature's adapted UNet, a step asked it 4 times.
    # The dtype inputs must have is the first layer's; read there, it follows a precision plugin's cast.
    @property
    def denoiser_dtype(self) -> torch.dtype:
        return self.denoiser.get_submodule(self.family.input_layer).weight.dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        return self.vae.encoder.conv_in.weight.dtype

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [getattr(self, n) for n in self.family.text_encoders]

    @property
    def trainable_text_encoders(self) -> list[torch.nn.Module]:
        """The text encoders a text-encoder adapter trains: those the family's LoRA loader reads."""
        return [getattr(self, n) for n in self.family.text_encoders if n in self.family.lora_components()]

    @property
    def tokenizers(self) -> list[Any]:
        return [getattr(self, n) for n in self.family.tokenizers]

    def frozen_text_buffers(self) -> list[str]:
        """Names of the frozen text encoders' buffers (CLIP's position ids), as DDP names them. DDP is
        told to leave them alone (``_ddp_params_and_buffers_to_ignore``, read when it wraps the
        module): it broadcasts every other buffer from rank 0 before each forward, which fails (NCCL
        takes only GPU tensors) once the encoders have left the GPU. Their parameters are still
        broadcast once, when DDP wraps the module, before they leave: every rank encodes captions
        with rank 0's weights, as before. Nothing trains them, so nothing else of DDP touches them."""
        if self.text_lora_params:
            return []
        prefixes = tuple(f"{n}." for n in self.family.text_encoders)
        return [n for n, _ in self.named_buffers(remove_duplicate=False) if n.startswith(prefixes)]

    def release_text_encoders(self) -> None:
        """Once every caption is cached (``EncodedCache``) frozen text encoders leave the accelerator
        (T5-XXL alone is ~9 GB in bfloat16); sampling brings them back for its prompts
        (:meth:`text_encoders_on_device`). In one process, or several under Lightning's DDP, which
        leaves their buffers alone (:meth:`frozen_text_buffers`); with several processes under
        another strategy (FSDP, DeepSpeed: subclasses of DDP's that shard or hold them) they stay."""
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, XLAStrategy

        if self.text_lora_params or self.device.type == "cpu":
            return
        strategy = self.trainer.strategy
        ddp = isinstance(strategy, DDPStrategy) and not isinstance(strategy, (DeepSpeedStrategy, XLAStrategy))
        if self.trainer.world_size > 1 and not ddp:
            log.info("text encoders stay on %s: %s is not DDP", self.device, type(strategy).__name__)
            return
        for enc in self.text_encoders:
            enc.to("cpu")
        self.text_encoders_released = True
        log.info("text encoders moved off %s: every caption is cached", self.device)

    @contextlib.contextmanager
    def text_encoders_on_device(self) -> Iterator[None]:
        """The text encoders on the module's device for a while (sampling from prompts)."""
        if not self.text_encoders_released:
            yield
            return
        for enc in self.text_encoders:
            enc.to(self.device)
        try:
            yield
        finally:
            for enc in self.text_encoders:
                enc.to("cpu")

    # ---------------------------------------------------------------- checkpoint content
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = self.trainable_state_dict()
        checkpoint["pretrained"] = self.pretrained
        checkpoint["rng_states"] = gather_rng_states()   # runs on every rank
        checkpoint["skipped_steps"] = self.skipped_steps
        checkpoint["init_adapter_sha256"] = self.init_adapter_sha256

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = set(self.trainable_state_dict()) - set(checkpoint["state_dict"])
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} LoRA tensors, e.g. {sorted(missing)[:3]}; "
                           "was it written with a different LoRA config?")
        states = checkpoint.get("rng_states", [])
        if len(states) == self.trainer.world_size:
            set_rng_state(states[self.global_rank])
        elif rescale_batch_progress(checkpoint, self.trainer.world_size):   # resumed on another number of processes
            log.info("checkpoint written on %d processes, resumed on %d with the same micro-batches per step",
                     len(states), self.trainer.world_size)
        self.skipped_steps = checkpoint.get("skipped_steps", 0)

    # ---------------------------------------------------------------- the objective
    def encode_text(self, captions: list[str], cached: bool = True) -> dict[str, torch.Tensor]:
        """The family's per-caption conditioning (``cache_fields``), from the text cache when set."""
        if cached and self.text_cache is not None:   # EncodedCache: prompt embeddings computed once
            keys = [text_key(c) for c in captions]
            return {f: store.tensor(keys).to(self.device) for f, store in self.text_cache.items()}
        return self.family.encode_prompts(self.tokenizers, self.text_encoders, captions, self.device,
                                          self.text_options)

    def micro(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """The batch's micro-conditioning (n, 6), with the configured fixed values applied."""
        if not self.family.micro_conditioned:
            return None
        micro = batch["micro"].to(self.device, torch.float32)
        return torch.where(torch.isnan(self.micro_override.to(micro)), micro, self.micro_override.to(micro))

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: Any = None) -> torch.Tensor:
        return self.sample_latents(self.vae.encode(pixel_values.to(self.vae_dtype)).latent_dist.parameters, generator)

    def sample_latents(self, params: torch.Tensor, generator: Any = None) -> torch.Tensor:
        """Latents from cached posterior parameters: the same draw ``encode_images`` makes (``generator``:
        one per sample, or None for torch's global one; the family says draw or mean)."""
        latents = self.family.posterior_latents(DiagonalGaussianDistribution(params.to(self.vae_dtype)), generator)
        return self.family.training_latents(latents, self.vae)

    def diffusion_loss(self, batch: Mapping[str, Any], timesteps: torch.Tensor | None = None,
                       draws: SampleDraws | None = None) -> torch.Tensor:
        """The denoising loss of ``batch``; ``draws``: its per-sample generators (None: torch's global one)."""
        latent_gen = draws("latent") if draws is not None else None
        if "latent_params" in batch:
            latents = self.sample_latents(batch["latent_params"], latent_gen)
        else:
            latents = self.encode_images(batch["pixel_values"], latent_gen)
        cond = self.encode_text(batch["captions"])
        noised = self.objective.noised(self.process, latents, batch, self.training, timesteps, draws)
        dtype = self.denoiser_dtype
        args, kwargs = self.family.denoiser_inputs(noised.noisy.to(dtype), noised.timesteps, cond, self.micro(batch),
                                                   dtype, self.guidance)
        if self.compiled and self.training and not self.compile_checked:   # once, before the first update
            self.speed.check_compiled(self.denoiser, args, kwargs)
            self.compile_checked = True
        pred = self.family.prediction(self.denoiser(*args, **kwargs), noised.noisy)
        return self.objective.loss(pred, noised)

    def setup(self, stage: str) -> None:
        if stage == "fit":   # before the strategy wraps the module in DDP
            self._ddp_params_and_buffers_to_ignore = self.frozen_text_buffers()
        if stage == "fit" and not self.compiled:   # the run's length and device are known here, not in __init__
            steps = self.trainer.max_steps if self.trainer.max_steps > 0 else None
            self.compiled = self.speed.compile_denoiser(self.denoiser, self.trainer.strategy.root_device.type, steps)
        masks = getattr(getattr(self.trainer, "datamodule", None), "masks", None)
        if self.objective.masked_loss != bool(masks):
            raise ValueError(f"module.objective.masked_loss={self.objective.masked_loss} but data.masks={masks!r}: "
                             "the loss masks need both (data.masks=alpha or a folder, and "
                             "module.objective.masked_loss=true)")

    def on_train_epoch_start(self) -> None:
        # Lightning puts the whole module in train mode; the frozen VAE (and a frozen text
        # encoder) must stay in eval mode so dropout/normalisation behave as in inference.
        self.vae.eval()
        if not self.text_lora_params:
            for enc in self.text_encoders:
                enc.eval()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed_micro_batch(self.seed, batch["keys"])   # LoRA dropout: the same masks for the same micro-batch

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        draws = SampleDraws(self.seed, batch["keys"])   # every sample's draws from its own (seed, epoch, index)
        batch = {**batch, "captions": self.objective.captions(batch["captions"], draws("caption_dropout"))}
        loss = self.diffusion_loss(batch, draws=draws)
        if self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False):
            return self._nonfinite(loss)
        self.step_losses.append(loss.detach())   # train/loss: the step's mean over every micro-batch
        return loss

    def _nonfinite(self, loss: torch.Tensor) -> None:
        where = f"step {self.global_step} (epoch {self.current_epoch})"
        if self.nonfinite == "skip" and self.skipped_steps < self.max_skipped_steps:
            self.skipped_steps += 1
            log.warning("non-finite loss (%s) at %s: batch skipped, no update (%d/%d skips allowed)",
                        loss.item(), where, self.skipped_steps, self.max_skipped_steps)
            self.log("train/skipped_steps", float(self.skipped_steps))
            return None
        ckpt = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
        raise FloatingPointError(
            f"non-finite training loss ({loss.item()}) at {where}; stopped before the update, so no "
            f"weight was changed. Last good checkpoint: {ckpt} (resume with ckpt_path=last). Lower the "
            "learning rate, check the data, or set module.nonfinite=skip to skip such batches.")

    def on_validation_epoch_start(self) -> None:
        self.val_total = [0.0, 0]   # Σ over images of their loss (float64), images

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        # Fixed noise and fixed timesteps: each image is scored at every val timestep.
        n, k = len(batch["captions"]), len(self.val_timesteps)
        draws = SampleDraws(self.val_seed, batch["keys"], repeat=k, stream=VALIDATION)
        field = "latent_params" if "latent_params" in batch else "pixel_values"
        rep = {field: batch[field].repeat_interleave(k, 0), "micro": batch["micro"].repeat_interleave(k, 0),
               "captions": [c for c in batch["captions"] for _ in range(k)]}
        t = torch.tensor(self.val_timesteps, device=self.device).repeat(n)
        loss = self.diffusion_loss(rep, timesteps=t, draws=draws)
        self.val_total[0] += float(loss) * n
        self.val_total[1] += n
        return loss

    def on_validation_epoch_end(self) -> None:
        # Σ loss / images over every process: the mean over the same images, whichever process scored them
        # (Lightning's sync_dist averages the processes' means, which weighs uneven shares differently)
        total = self.trainer.strategy.reduce(torch.tensor(self.val_total, dtype=torch.float64, device=self.device),
                                             reduce_op="sum")
        if total[1] > 0:
            self.log("val/loss", (total[0] / total[1]).float(), prog_bar=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # the step's loss: the mean over its micro-batches, on every process (2 processes × 1 micro-batch and
        # 1 process × 2 give the same figure); a collective, so every process logs it
        losses, self.step_losses = self.step_losses, []
        if losses:
            self.log("train/loss", self.trainer.strategy.reduce(torch.stack(losses).mean(), reduce_op="mean"),
                     prog_bar=True)
        # The norm is one more pass over every gradient: only on the steps the loggers write, and the last
        last = self.trainer.max_steps > 0 and self.global_step + 1 >= self.trainer.max_steps
        if (self.global_step + 1) % max(self.trainer.log_every_n_steps, 1) and not last:
            return
        grads = [p.grad for p in self.denoiser_lora_params + self.text_lora_params if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))

    def configure_optimizers(self) -> Any:
        return optimizers(self.denoiser_lora_params + self.text_lora_params, self.optimizer_fn,
                          self.lr_scheduler_fn, self.trainer.estimated_stepping_batches)
