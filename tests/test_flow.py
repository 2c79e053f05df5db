"""The flow-matching objective (SD3's rectified flow), formula by formula, against a direct
computation and against diffusers' own training helpers and sampler on the same inputs:
``compute_density_for_timestep_sampling``, ``compute_loss_weighting_for_sd3`` and
``FlowMatchEulerDiscreteScheduler`` (its σ schedule, ``scale_noise`` and the Euler ``step``)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from toolkit.models import objectives
from toolkit.models.objective import Objective
from toolkit.models.processes import DDPM, RectifiedFlow

N = 1000


@pytest.fixture(scope="module")
def flow() -> RectifiedFlow:
    return RectifiedFlow(FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=3.0))


def test_sigmas_are_the_schedulers_and_the_shift_formula(flow):
    t = torch.arange(N)
    sched = flow.scheduler
    # the scheduler's own arrays, which run from σ = 1 down: step t sits at N-1-t
    assert torch.equal(flow.sigmas(t), sched.sigmas.flip(0))
    assert torch.equal(flow.model_timesteps(t), sched.timesteps.flip(0))
    # direct: σ = s·u / (1 + (s-1)·u), u = (t+1)/N; the denoiser sees σ·N
    u = (t + 1).double() / N
    direct = 3.0 * u / (1 + 2.0 * u)
    assert torch.allclose(flow.sigmas(t).double(), direct, rtol=1e-6, atol=0)
    assert torch.allclose(flow.model_timesteps(t).double(), direct * N, rtol=1e-6, atol=0)
    assert bool((flow.sigmas(t)[1:] > flow.sigmas(t)[:-1]).all())   # t counts up with the noise


def test_noisy_input_and_target_against_direct_and_the_sampler(flow):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 499, 999])
    s = flow.sigmas(t).view(-1, 1, 1, 1)
    xt = flow.add_noise(x0, eps, t)
    assert torch.allclose(xt, (1 - s) * x0 + s * eps, rtol=0, atol=1e-6)
    assert torch.equal(flow.target(x0, eps, t), eps - x0)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=3.0)
    for i in range(3):   # diffusers' own forward process at the scheduler's timestep
        ref = sched.scale_noise(x0[i:i + 1], flow.model_timesteps(t[i:i + 1]), eps[i:i + 1])
        assert torch.allclose(xt[i:i + 1], ref, rtol=0, atol=1e-6)
    # the sampler's Euler step with the exact velocity lands on the path at its next σ: target's sign and scale
    sched.set_timesteps(4)
    x = (1 - sched.sigmas[0]) * x0 + sched.sigmas[0] * eps
    for k, ts in enumerate(sched.timesteps):
        x = sched.step(eps - x0, ts, x).prev_sample
        nxt = sched.sigmas[k + 1]
        assert torch.allclose(x, (1 - nxt) * x0 + nxt * eps, rtol=0, atol=1e-5)
    assert torch.allclose(x, x0, atol=1e-5)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_timestep_densities_are_diffusers_on_the_same_draws(scheme):
    kw = {"logit_mean": 0.3, "logit_std": 1.2, "mode_scale": 1.29}
    t = objectives.sample_timesteps_density(4096, N, scheme, 0, None, generator=torch.Generator().manual_seed(1),
                                            **kw)
    if scheme == "uniform":   # the integer draw, the DDPM families' bit for bit
        ref = torch.randint(0, N, (4096,), generator=torch.Generator().manual_seed(1))
    else:
        u = compute_density_for_timestep_sampling(scheme, 4096, generator=torch.Generator().manual_seed(1), **kw)
        ref = (u.clamp(0, 1 - 1e-7) * N).long()
    assert torch.equal(t, ref)


def test_the_density_is_oriented_as_the_sd3_paper(flow):
    """u -> t counts up with the noise, so logit_mean > 0 favours noisy steps (SD3 §3.1). diffusers'
    training example indexes its descending schedule with u instead: the mirror, equal in law at
    logit_mean = 0 (the recipe's default) and for mode sampling (symmetric about 1/2)."""
    g = lambda: torch.Generator().manual_seed(2)   # noqa: E731
    t = objectives.sample_timesteps_density(20000, N, "logit_normal", logit_mean=1.0, generator=g())
    assert flow.sigmas(t).mean() > 0.75
    u = compute_density_for_timestep_sampling("logit_normal", 20000, logit_mean=1.0, logit_std=1.0, generator=g())
    diffusers_sigmas = flow.scheduler.sigmas[(u * N).long().clamp(max=N - 1)]   # the example's indices
    assert torch.equal(flow.sigmas(t), flow.scheduler.sigmas[N - 1 - (u.clamp(0, 1 - 1e-7) * N).long()])
    assert diffusers_sigmas.mean() < 0.6
    m = objectives.sample_timesteps_density(20000, N, "mode", mode_scale=1.29, generator=g())
    assert abs(float(m.float().mean()) / (N - 1) - 0.5) < 0.01


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap", "logit_normal", "mode"])
def test_loss_weightings_are_diffusers_and_the_formulas(flow, scheme):
    t = torch.arange(0, N, 7)
    s = flow.sigmas(t)
    ours = objectives.flow_weights(s, scheme)
    ref = compute_loss_weighting_for_sd3(scheme, s)
    if ours is None:   # the density schemes weight every sample 1
        assert torch.equal(ref, torch.ones_like(s))
        return
    assert torch.allclose(ours, ref, rtol=1e-6)
    direct = s.double() ** -2 if scheme == "sigma_sqrt" else 2 / (torch.pi * (1 - 2 * s.double() + 2 * s.double() ** 2))
    assert torch.allclose(ours.double(), direct, rtol=1e-6)


def test_objective_noised_and_weighted_loss_on_a_flow(flow):
    """What the module gets: one draw order (noise, then t), x_t, the velocity target, SD3's weights."""
    obj = Objective(timesteps={"scheme": "sigma_sqrt"}, input_perturbation=0.1)
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    one = torch.Generator().manual_seed(4)   # every kind of draw from one generator, in the objective's order
    n = obj.noised(obj.prepare(flow), x0, {}, training=True, draws=lambda kind: one)
    g = torch.Generator().manual_seed(4)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, N, (4,), generator=g)   # sigma_sqrt: uniform steps, then the weight
    seen = eps + 0.1 * torch.randn(eps.shape, generator=g)
    s = flow.sigmas(t).view(-1, 1, 1, 1)
    assert torch.allclose(n.noisy, (1 - s) * x0 + s * seen, rtol=0, atol=1e-6)
    assert torch.equal(n.target, eps - x0) and torch.equal(n.timesteps, flow.model_timesteps(t))
    assert torch.allclose(n.weights, s.flatten() ** -2)
    pred = torch.randn(x0.shape, generator=g)
    want = ((s.flatten() ** -2) * ((pred - (eps - x0)) ** 2).flatten(1).mean(1)).mean()
    assert torch.allclose(obj.loss(pred, n), want, rtol=1e-6)


@pytest.mark.parametrize("option,value,why", [
    ("snr_gamma", 5.0, "min-SNR"), ("noise_offset", 0.05, "pure noise already"),
    ("zero_terminal_snr", True, "zero terminal SNR by construction"), ("debiased_estimation", True, "SNR")])
def test_ddpm_only_options_are_refused_for_flow_models(flow, option, value, why):
    with pytest.raises(ValueError, match=rf"rectified flow.*module\.objective\.{option} means nothing: .*{why}"):
        Objective(**{option: value}).prepare(flow)


def test_sd3_weightings_are_refused_for_ddpm_models():
    with pytest.raises(ValueError, match="timesteps.scheme=cosmap: SD3's loss weighting.*DDPM"):
        Objective(timesteps={"scheme": "cosmap"}).prepare(DDPM(DDPMScheduler()))
    with pytest.raises(ValueError, match="expected one of"):
        Objective(timesteps={"scheme": "sigmoid"})
