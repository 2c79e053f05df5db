"""The noise schedule an adapter was trained with, and the sampler that matches it.

A flow-matching model (SD3) is sampled by a flow-matching scheduler (``FlowMatch*``), a DDPM model
by any other: the two cannot stand in for each other, so a mismatch is refused. Training may change
the base model's schedule (``module.zero_terminal_snr``: the betas rescaled
so the last step is pure noise, Lin et al. 2024). An adapter trained that way must be sampled
with the same betas and with trailing timesteps, or its first denoising step starts from the wrong
noise level. The export writes ``training_schedule`` into every adapter file
(``toolkit_schedule``); sampling, evaluation, merging and the training grids build their
scheduler with ``sampling_scheduler``.
"""

from __future__ import annotations

import inspect
from typing import Any

import diffusers

FLOW = "flow_matching"   # the "prediction type" of a flow-matching schedule: the velocity ε − x₀


def training_schedule(config: Any) -> dict[str, Any]:
    """What sampling must know of a training noise schedule (a scheduler config). Flow-matching
    schedulers have no ``prediction_type`` (they predict the velocity); their ``shift`` is recorded."""
    if config.get("prediction_type") is None:
        return {"prediction_type": FLOW, "shift": config.get("shift"), "rescale_betas_zero_snr": False,
                "timestep_spacing": None}
    zero_snr = bool(config.get("rescale_betas_zero_snr", False))
    return {"prediction_type": config["prediction_type"], "rescale_betas_zero_snr": zero_snr,
            "timestep_spacing": "trailing" if zero_snr else None}


def sampling_scheduler(name_or_cls: str | type, config: Any, schedule: dict[str, Any] | None, what: str = "") -> Any:
    """A ``name_or_cls`` scheduler built from the base ``config`` and the training ``schedule``.

    Raises ``ValueError`` (naming ``what``, e.g. the adapter) when the schedule cannot be met: the
    base predicts something else, or the scheduler class has no zero-terminal-SNR rescale."""
    cls = getattr(diffusers, name_or_cls, None) if isinstance(name_or_cls, str) else name_or_cls
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"scheduler={name_or_cls!r} is not a diffusers scheduler class")
    base = training_schedule(config)
    if (base["prediction_type"] == FLOW) != cls.__name__.startswith("FlowMatch"):
        flow = base["prediction_type"] == FLOW
        raise ValueError(f"scheduler={cls.__name__} cannot sample a {'flow-matching' if flow else 'DDPM'} model "
                         f"(prediction type {base['prediction_type']!r}); use "
                         f"{'a FlowMatch* scheduler' if flow else 'a DDPM sampler such as DDIMScheduler'} "
                         "(generation.scheduler=auto picks the model family's own)")
    if schedule is None:
        return cls.from_config(config)
    if schedule["prediction_type"] != base["prediction_type"] or schedule.get("shift") != base.get("shift"):
        raise ValueError(f"{what} was trained with the schedule {schedule}, but the base model's scheduler has "
                         f"{base}: wrong base model?")
    if not schedule["rescale_betas_zero_snr"]:
        return cls.from_config(config)
    if "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
        raise ValueError(f"{what} was trained with zero terminal SNR, which {cls.__name__} cannot sample (it has "
                         "no rescale_betas_zero_snr): use e.g. DDIMScheduler or EulerDiscreteScheduler")
    return cls.from_config(config, rescale_betas_zero_snr=True, timestep_spacing=schedule["timestep_spacing"])
