"""Each training option reaches the maths through the real module and trainer: the loss of a recorded
batch equals the objective's formula written out here (not the toolkit's functions), and the update
after one real optimizer step equals the optimizer's formula on the recorded (clipped) gradients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import compose_cfg, tiny_overrides
from tests.helpers import RecordStep
from toolkit.reproducibility import SampleDraws
from toolkit.tasks import train


def module_and_batch(model: str, data: Path, out: Path, *extra: str) -> tuple[Any, dict[str, Any]]:
    cfg = compose_cfg(tiny_overrides(model, data, out) + ["data.val_fraction=0", *extra], out)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = instantiate(cfg.module)
    module.train()
    module.vae.eval()
    for enc in module.text_encoders:
        enc.eval()
    return module, batch


def each(shape: tuple[int, ...], gens: list[torch.Generator]) -> torch.Tensor:
    """Sample i's standard normals from its own generator."""
    return torch.stack([torch.randn(shape[1:], generator=g) for g in gens])


def by_hand(module: Any, batch: dict[str, Any], *, loss: str = "mse", delta: float = 1.0, density: str = "uniform",
            gamma: float = 0.0, debiased: bool = False, prior: tuple[list[int], float] | None = None) -> torch.Tensor:
    """The denoising loss from the papers' formulas, each sample's random numbers from its own
    generators: latent sample, noise, timestep, perturbation."""
    sched = module.noise_scheduler
    d = SampleDraws(0, batch["keys"])
    with torch.no_grad():
        params = module.vae.encode(batch["pixel_values"]).latent_dist.parameters
        mean, logvar = params.chunk(2, dim=1)
        sample = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * each(mean.shape, d("latent"))
        x0 = sample * module.vae.config.scaling_factor
        tok = module.tokenizer(batch["captions"], padding="max_length", max_length=module.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
        cond = module.text_encoder(tok.input_ids)[0]
    eps = each(x0.shape, d("noise"))
    n, T = x0.shape[0], sched.config.num_train_timesteps
    if density == "uniform":
        t = torch.cat([torch.randint(0, T, (1,), generator=g) for g in d("timestep")])
    else:   # logit-normal (SD3 §3.1): u = sigmoid(N(0, 1)), t = floor(u T)
        u = torch.cat([torch.normal(0.0, 1.0, size=(1,), generator=g) for g in d("timestep")])
        t = (torch.sigmoid(u).clamp(0, 1 - 1e-7) * T).long()
    seen = eps + gamma * each(eps.shape, d("perturbation")) if gamma else eps   # input perturbation: x_t from ε + γξ
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * seen
    pred = module.unet(xt, t, encoder_hidden_states=cond).sample.float()
    r = pred - eps
    # mse: r²; 2 x Huber: r² below δ, 2δ(|r| − δ/2) above
    rho = r**2 if loss == "mse" else torch.where(r.abs() <= delta, r**2, 2 * delta * (r.abs() - delta / 2))
    per_sample = rho.flatten(1).mean(1)
    w = torch.ones(n)
    if debiased:   # Yu et al.: 1/sqrt(SNR) for ε-prediction, SNR capped at 1000
        snr = (abar / (1 - abar)).flatten()
        w = w / snr.clamp(max=1000).sqrt()
    if prior is not None:   # DreamBooth: mean over instance images + λ · mean over class images
        is_prior, lam = torch.tensor(prior[0], dtype=torch.bool), prior[1]
        return (w * per_sample)[~is_prior].mean() + lam * (w * per_sample)[is_prior].mean()
    return (w * per_sample).mean()


CASES = {
    "mse": ([], {}),
    "huber": (["module.objective.loss.kind=huber", "module.objective.loss.huber_delta=0.05"],
              {"loss": "huber", "delta": 0.05}),
    "logit_normal": (["module.objective.timesteps.scheme=logit_normal"], {"density": "logit_normal"}),
    "debiased": (["module.objective.debiased_estimation=true"], {"debiased": True}),
    "input_perturbation": (["module.objective.input_perturbation=0.1"], {"gamma": 0.1}),
    "all": (["module.objective.loss.kind=huber", "module.objective.loss.huber_delta=0.05",
             "module.objective.timesteps.scheme=logit_normal", "module.objective.debiased_estimation=true",
             "module.objective.input_perturbation=0.1"],
            {"loss": "huber", "delta": 0.05, "density": "logit_normal", "debiased": True, "gamma": 0.1}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_module_loss_is_the_objectives_formula(case, tiny_model, imagefolder_data, tmp_path):
    overrides, formula = CASES[case]
    module, batch = module_and_batch(tiny_model, imagefolder_data, tmp_path, *overrides)
    got = module.diffusion_loss(batch, draws=SampleDraws(0, batch["keys"]))
    want = by_hand(module, batch, **formula)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    if case != "mse":   # and the option matters: the plain MSE of the same draws differs
        assert not torch.allclose(by_hand(module, batch), want, rtol=1e-5, atol=1e-7)


def test_prior_preservation_weights_through_the_module(tiny_model, imagefolder_data, tmp_path):
    module, batch = module_and_batch(tiny_model, imagefolder_data, tmp_path)
    flags = [0, 0, 1, 1]
    batch = {**batch, "prior": torch.tensor(flags), "prior_weight": 0.5}
    got = module.diffusion_loss(batch, draws=SampleDraws(0, batch["keys"]))
    torch.testing.assert_close(got, by_hand(module, batch, prior=(flags, 0.5)), rtol=1e-5, atol=1e-7)


def one_step(model: str, data: Path, out: Path, *extra: str) -> dict[str, Any]:
    cfg = compose_cfg(tiny_overrides(model, data, out) + [
        "trainer.max_steps=1", "module.lr_scheduler.num_warmup_steps=0", "callbacks.sample_grid.every_n_steps=100",
        "+callbacks.record._target_=tests.helpers.RecordStep", *extra], out)
    train.run(cfg)
    return RecordStep.seen


def clipped(grads: list[torch.Tensor], max_norm: float = 1.0) -> list[torch.Tensor]:
    """Lightning's gradient_clip_val=1 (norm clipping, torch's clip_grad_norm_: factor max/(‖g‖+1e-6), ≤ 1)."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    factor = min(1.0, max_norm / (float(norm) + 1e-6))
    return [g * factor for g in grads]


def test_foreach_adamw_step_is_adamws_formula(tiny_model, imagefolder_data, tmp_path):
    seen = one_step(tiny_model, imagefolder_data, tmp_path, "module.optimizer.foreach=true",
                    "module.optimizer.lr=3e-3", "module.optimizer.weight_decay=0.1")
    lr, wd, eps = 3e-3, 0.1, 1e-8
    assert seen["lr"] == pytest.approx(lr)
    for before, g, after in zip(seen["before"], clipped(seen["grads"]), seen["after"]):
        # step 1 from zero moments: m̂ = g, v̂ = g², θ ← θ(1 − lr·wd) − lr·g/(|g| + ε)
        want = before * (1 - lr * wd) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-8)


def test_prodigy_step_is_prodigys_with_the_configured_settings(tiny_model, imagefolder_data, tmp_path):
    from prodigyopt import Prodigy

    seen = one_step(tiny_model, imagefolder_data, tmp_path, "module/optimizer=prodigy", "module.optimizer.lr=1.0")
    params = [b.clone().requires_grad_(True) for b in seen["before"]]
    ref = Prodigy(params, lr=1.0, weight_decay=1e-2, d_coef=1.0, use_bias_correction=True, safeguard_warmup=True)
    for p, g in zip(params, clipped(seen["grads"])):
        p.grad = g
    ref.step()
    moved = False
    for p, after, before in zip(params, seen["after"], seen["before"]):
        torch.testing.assert_close(after, p.detach(), rtol=1e-5, atol=1e-9)
        moved |= not torch.equal(after, before)
    assert moved
