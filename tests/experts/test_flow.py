"""Rectified flow and samplers: path endpoints, logit-normal t, a loss that trains, exact/accurate ODE steps, CFG."""
from __future__ import annotations

import math

import pytest
import torch

from archipelago.experts.dit import DiT
from archipelago.experts.flow import flow_matching_loss, interpolate, sample_t, velocity_target
from archipelago.experts.sampling import euler_step, guided_velocity, heun_step, sample, timesteps

# ----------------------------------------------------------------------------------------------------
# The path and the loss
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 3), (4, 1, 8, 8), (4, 2, 3, 8, 8)])
def test_interpolate_endpoints_and_velocity_for_any_rank(shape):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    assert torch.equal(interpolate(x0, eps, torch.zeros(4)), x0)
    assert torch.equal(interpolate(x0, eps, torch.ones(4)), eps)
    torch.testing.assert_close(interpolate(x0, eps, 0.25), 0.75 * x0 + 0.25 * eps)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0])
    xt = interpolate(x0, eps, t)
    torch.testing.assert_close(xt[1], 0.7 * x0[1] + 0.3 * eps[1])
    # d x_t / dt is the target velocity eps - x0 (finite difference along the straight path)
    h = 1e-2
    fd = (interpolate(x0, eps, t * 0.5 + h) - interpolate(x0, eps, t * 0.5)) / h
    torch.testing.assert_close(fd, velocity_target(x0, eps), atol=1e-4, rtol=1e-4)


def test_sample_t_logit_normal():
    t = sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.shape == (20000,)
    assert ((t > 0) & (t < 1)).all()
    assert abs(t.mean().item() - 0.5) < 0.01
    logit = torch.log(t / (1 - t))
    assert abs(logit.std().item() - 1.0) < 0.03          # it is the logistic of a standard normal
    shifted = sample_t(20000, generator=torch.Generator().manual_seed(0), mean=1.0, std=0.5)
    assert abs(torch.log(shifted / (1 - shifted)).mean().item() - 1.0) < 0.02
    same = sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, same)


def test_flow_matching_loss_draws_eps_then_t_from_the_generator():
    x0 = torch.randn(8, 1, 4, 4)
    zero_model = lambda x, t, y: torch.zeros_like(x)
    loss = flow_matching_loss(zero_model, x0, torch.zeros(8, dtype=torch.long), torch.Generator().manual_seed(5))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(loss, ((eps - x0) ** 2).mean())
    seen = {}

    def recording_model(x, t, y):   # predicts v = x_t: the loss must compare it with eps - x0
        seen["x"], seen["t"] = x, t
        return x

    g = torch.Generator().manual_seed(5)
    loss = flow_matching_loss(recording_model, x0, torch.zeros(8, dtype=torch.long), g)
    g2 = torch.Generator().manual_seed(5)
    eps2 = torch.randn(x0.shape, generator=g2)
    t2 = sample_t(8, generator=g2)
    assert torch.equal(seen["t"], t2)
    x_t = interpolate(x0, eps2, t2)
    torch.testing.assert_close(seen["x"], x_t)
    torch.testing.assert_close(loss, ((x_t - (eps2 - x0)) ** 2).mean())


def _fixed_images() -> tuple[torch.Tensor, torch.Tensor]:
    """16 fixed 8x8 images in [-1, 1]: 4 binary templates (one per class) at 4 contrasts."""
    i = torch.arange(8)
    rows, cols = i[:, None].expand(8, 8), i[None, :].expand(8, 8)
    templates = [
        ((rows // 2 + cols // 2) % 2 == 0),       # checkerboard
        ((rows // 2 + cols // 2) % 2 == 1),       # inverted checkerboard
        rows < 4,                                  # top half
        cols < 4,                                  # left half
    ]
    x0 = torch.stack([(templates[k % 4].float() * 2 - 1) * (0.6 + 0.1 * (k // 4)) for k in range(16)])
    return x0[:, None], torch.arange(16) % 4


def test_loss_is_finite_and_decreases_when_overfitting_a_tiny_dit():
    torch.manual_seed(0)
    x0, y = _fixed_images()
    model = DiT(input_size=8, in_channels=1, patch_size=4, hidden_size=32, depth=2, num_heads=4,
                num_classes=4, class_dropout=0.0)

    def eval_loss() -> float:   # fixed noise and t: a measurement, not a noisy training loss
        with torch.no_grad():
            return sum(flow_matching_loss(model, x0, y, torch.Generator().manual_seed(100 + s)).item()
                       for s in range(4)) / 4

    initial = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss = flow_matching_loss(model, x0, y, g)
        assert loss.ndim == 0 and math.isfinite(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = eval_loss()
    assert final < 0.5 * initial, (initial, final)


# ----------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------

def test_timesteps_and_steps_formulas():
    torch.testing.assert_close(timesteps(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError):
        timesteps(0)
    x, v = torch.ones(3, dtype=torch.bfloat16), torch.full((3,), 2.0)
    out = euler_step(x, v, 0.75, 0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((3,), 0.5))
    torch.testing.assert_close(heun_step(torch.ones(3), v, torch.zeros(3), 1.0, 0.5), torch.full((3,), 0.5))


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_sampling_an_exact_straight_path_recovers_x0(sampler):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    y = torch.zeros(3, dtype=torch.long)
    # The true conditional velocity of the straight path through x0: (x_t - x0) / t = eps - x0.
    field = lambda x, t, y: (x - x0) / t.view(-1, 1, 1, 1)
    torch.testing.assert_close(sample(field, noise, y, steps=7, sampler=sampler), x0, atol=1e-5, rtol=1e-5)
    constant = lambda x, t, y: noise - x0
    torch.testing.assert_close(sample(constant, noise, y, steps=3, sampler=sampler), x0, atol=1e-5, rtol=1e-5)


def test_heun_is_more_accurate_than_euler_on_a_curved_field():
    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(2, dtype=torch.long)
    calls = []

    def field(x, t, y):   # dx/dt = x  =>  x(0) = x(1) * exp(-1)
        calls.append(1)
        return x

    exact = noise * math.exp(-1.0)
    euler_err = (sample(field, noise, y, steps=8, sampler="euler") - exact).abs().max()
    assert len(calls) == 8
    calls.clear()
    heun_err = (sample(field, noise, y, steps=8, sampler="heun") - exact).abs().max()
    assert len(calls) == 2 * 8 - 1      # last step to t=0 is Euler
    assert heun_err < 0.2 * euler_err, (heun_err, euler_err)


def test_cfg_scale_one_is_conditional_only_and_guidance_combines_branches():
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2, 3])
    batch_sizes = []

    def field(x, t, y):   # v depends on the label: cond -> y, null (7) -> 7
        batch_sizes.append(x.shape[0])
        return -x + y.float().view(-1, 1, 1, 1)

    plain = sample(field, noise, y, steps=4)
    assert batch_sizes == [3] * 4
    batch_sizes.clear()
    assert torch.equal(sample(field, noise, y, steps=4, cfg_scale=1.0, null_class=7), plain)
    assert batch_sizes == [3] * 4
    batch_sizes.clear()
    v = guided_velocity(field, noise, 0.5, y, cfg_scale=2.5, null_class=7)
    assert batch_sizes == [6]           # one batched call [cond; null]
    expected = (-noise + 7) + 2.5 * ((-noise + y.float().view(-1, 1, 1, 1)) - (-noise + 7))
    torch.testing.assert_close(v, expected)
    with pytest.raises(ValueError, match="null_class"):
        sample(field, noise, y, steps=2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="unknown sampler 'ddim'"):
        sample(field, noise, y, sampler="ddim")


def test_sample_with_a_dit_uses_its_null_class_for_cfg():
    torch.manual_seed(0)
    model = DiT(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=1, num_heads=4, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    noise = torch.randn(2, 1, 8, 8)
    y = torch.tensor([3, 4])
    out = sample(model, noise, y, steps=3, cfg_scale=2.0)
    x = noise.clone()
    with torch.no_grad():
        for t, t_next in [(1.0, 2 / 3), (2 / 3, 1 / 3), (1 / 3, 0.0)]:
            x = x + (t_next - t) * model.forward_with_cfg(x, torch.full((2,), t), y, 2.0)
    torch.testing.assert_close(out, x, atol=1e-4, rtol=1e-4)
    assert not out.requires_grad
