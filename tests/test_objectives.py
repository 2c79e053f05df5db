import math

import pytest
import torch
from diffusers import DDPMScheduler

from toolkit.models import objectives


def sched(kind: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, prediction_type=kind)


def test_timesteps_stay_in_range():
    t = objectives.sample_timesteps(5000, 1000, 200, 400, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 200 and t.max() < 400 and t.dtype == torch.long
    assert len(t.unique()) > 150  # uniform over the range, not a constant
    with pytest.raises(ValueError, match="timestep range"):
        objectives.sample_timesteps(4, 1000, 500, 100)


def test_epsilon_target_is_the_noise():
    lat, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([1, 500, 999])
    assert torch.equal(objectives.training_target(sched(), lat, noise, t), noise)


def test_v_target_matches_formula():
    s = sched("v_prediction")
    lat, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([1, 500, 999])
    a = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    expect = a.sqrt() * noise - (1 - a).sqrt() * lat
    torch.testing.assert_close(objectives.training_target(s, lat, noise, t), expect)
    with pytest.raises(ValueError, match="prediction_type"):
        objectives.training_target(sched("sample"), lat, noise, t)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_weights(kind):
    s = sched(kind)
    t = torch.tensor([10, 500, 990])
    a = s.alphas_cumprod[t]
    snr = a / (1 - a)
    w = objectives.min_snr_weights(s, t, gamma=5.0)
    denom = snr + 1 if kind == "v_prediction" else snr
    torch.testing.assert_close(w, torch.clamp(snr, max=5.0) / denom)
    assert w[0] < 1 and (kind == "v_prediction" or math.isclose(w[2].item(), 1.0, rel_tol=1e-5))
    assert objectives.min_snr_weights(s, t, None) is None


def test_weighted_mse():
    pred, target = torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 2.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    assert objectives.weighted_mse(pred, target).item() == pytest.approx(2.5)
    assert objectives.weighted_mse(pred, target, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5)


def test_noise_offset_is_a_per_channel_constant():
    noise = torch.zeros(2, 4, 8, 8)
    out = objectives.offset_noise(noise, 0.1, torch.Generator().manual_seed(0))
    assert torch.all(out.amax((2, 3)) == out.amin((2, 3)))  # constant over space
    assert out.abs().sum() > 0
    assert objectives.offset_noise(noise, 0.0) is noise


def test_caption_dropout_rate():
    caps = ["x"] * 4000
    out = objectives.drop_captions(caps, 0.25, torch.Generator().manual_seed(0))
    assert set(out) == {"x", ""}
    assert out.count("") / len(out) == pytest.approx(0.25, abs=0.03)
    assert objectives.drop_captions(caps, 0.0) == caps


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_timestep_densities(scheme):
    g = lambda: torch.Generator().manual_seed(0)
    t = objectives.sample_timesteps_density(20000, 1000, scheme, 100, 900, generator=g())
    assert t.dtype == torch.long and t.min() >= 100 and t.max() < 900
    again = objectives.sample_timesteps_density(20000, 1000, scheme, 100, 900, generator=g())
    assert torch.equal(t, again)                                   # a pure function of the generator
    middle = ((t >= 400) & (t < 600)).float().mean().item()         # share of the middle quarter of the range
    if scheme == "uniform":
        assert torch.equal(t, objectives.sample_timesteps(20000, 1000, 100, 900, generator=g()))
        assert abs(middle - 0.25) < 0.02
    else:
        assert middle > 0.3                                        # mass moved to the middle of the schedule
    with pytest.raises(ValueError, match="timestep sampling"):
        objectives.sample_timesteps_density(4, 1000, "cosmic")


def test_zero_terminal_snr_rescale_reaches_zero_snr():
    s = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                      prediction_type="v_prediction", rescale_betas_zero_snr=True)
    snr = objectives.compute_snr(s, torch.tensor([0, 500, 999]))
    assert snr[-1].item() < 1e-6 and snr[0] > snr[1] > snr[2]
    assert sched().alphas_cumprod[-1] > 1e-3                       # the plain schedule never reaches it


def test_input_perturbation_changes_only_the_noise_the_sample_sees():
    noise = torch.randn(4, 4, 8, 8)
    assert objectives.perturb_noise(noise, 0.0) is noise
    p = objectives.perturb_noise(noise, 0.1, torch.Generator().manual_seed(0))
    torch.testing.assert_close((p - noise).std().item(), 0.1, rtol=0.15, atol=0)


def test_huber_and_smooth_l1_penalties():
    pred, target = torch.tensor([[0.0, 0.1, 3.0]]), torch.zeros(1, 3)
    mse = objectives.elementwise_loss(pred, target, "mse")
    huber = objectives.elementwise_loss(pred, target, "huber", delta=1.0)
    torch.testing.assert_close(huber[0, :2], mse[0, :2])           # quadratic below δ: equals the squared error
    torch.testing.assert_close(huber[0, 2], torch.tensor(2 * (3.0 - 0.5)))   # linear above δ
    sl1 = objectives.elementwise_loss(pred, target, "smooth_l1", delta=1.0)
    torch.testing.assert_close(sl1, torch.tensor([[0.0, 0.005, 2.5]]))
    with pytest.raises(ValueError, match="loss"):
        objectives.elementwise_loss(pred, target, "l7")


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_debiased_estimation_weights(kind):
    s, t = sched(kind), torch.tensor([0, 10, 500, 999])
    w = objectives.debiased_weights(s, t)
    snr = torch.clamp(objectives.compute_snr(s, t), max=1000)
    torch.testing.assert_close(w, 1 / (snr + 1) if kind == "v_prediction" else 1 / snr.sqrt())
    assert torch.isfinite(w).all() and w[0] < w[-1]               # low-noise steps weighted down


def test_masked_loss_ignores_masked_out_elements():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4] = 1                                             # train on the top half only
    base = objectives.weighted_loss(pred, target, mask=mask)
    changed = pred.clone()
    changed[:, :, 4:] += 100 * torch.randn(2, 4, 4, 8, generator=g)  # change only the masked-out half
    assert objectives.weighted_loss(changed, target, mask=mask) == base
    assert objectives.weighted_loss(changed, target) != objectives.weighted_loss(pred, target)
    torch.testing.assert_close(base, objectives.weighted_loss(pred[:, :, :4], target[:, :, :4]))
    pixels = torch.zeros(1, 1, 32, 32)
    pixels[..., :16, :] = 1
    torch.testing.assert_close(objectives.latent_mask(pixels, (8, 8))[0, 0, :4], torch.ones(4, 8))
