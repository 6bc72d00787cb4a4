"""sample-once routing: one expert per sample drawn from p(k | y) (the shards' class counts), kept for the
whole trajectory, the router never asked; refused without class counts."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from archipelago.ensemble import Ensemble, class_prior, parse_mode
from archipelago.errors import EnsembleError
from archipelago.experts.sampling import sample

# [K=3][C=4] class counts: class 0 lives in shard 0; class 1 is split 1:3 over shards 1 and 2; class 2 is
# split 1:1:2; class 3 is in no shard (falls back to the marginal).
COUNTS = [[40, 0, 10, 0], [0, 25, 10, 0], [0, 75, 20, 0]]


class TaggedExpert(nn.Module):
    """v = its own index everywhere: the output tells which expert produced each sample."""

    def __init__(self, k: int, num_classes: int = 4):
        super().__init__()
        self.k, self.num_classes, self.in_channels, self.input_size = k, num_classes, 1, 4
        self.w = nn.Parameter(torch.zeros(()))
        self.calls: list[int] = []

    def forward(self, x, t, y):
        self.calls.append(x.shape[0])
        return torch.full_like(x, float(self.k)) + 0 * self.w


class ExplodingRouter(nn.Module):
    num_experts = 3

    def forward(self, *args):
        raise AssertionError("sample-once must not call the router")


def _ensemble(seed: int = 0) -> Ensemble:
    ens = Ensemble([TaggedExpert(k) for k in range(3)], ExplodingRouter(), class_counts=COUNTS, sample_seed=seed)
    ens.mode = "sample-once"
    return ens.eval()


def test_prior_table():
    p = class_prior(COUNTS, 4)
    assert p.shape == (5, 3)
    assert torch.allclose(p[0], torch.tensor([1.0, 0, 0], dtype=torch.float64))
    assert torch.allclose(p[1], torch.tensor([0, 0.25, 0.75], dtype=torch.float64))
    marginal = torch.tensor([50, 35, 95], dtype=torch.float64) / 180
    assert torch.allclose(p[3], marginal) and torch.allclose(p[4], marginal)   # unseen class, null label
    assert parse_mode("sample-once") == 1


def test_choice_follows_p_k_given_y_over_many_draws():
    n = 6000
    y = torch.tensor([0, 1, 2]).repeat(n // 3)
    ens = _ensemble()
    w = ens.route(torch.zeros(n, 1, 4, 4), torch.ones(n), y)
    assert torch.equal(w.sum(1), torch.ones(n)) and set(w.unique().tolist()) == {0.0, 1.0}   # one-hot
    k = w.argmax(1)
    prior = class_prior(COUNTS, 4)
    for c in range(3):
        freq = torch.bincount(k[y == c], minlength=3).double() / (n // 3)
        # 2000 draws per class: binomial std <= 0.011; 4 sigma
        assert torch.allclose(freq, prior[c], atol=0.045), (c, freq, prior[c])
    assert (k[y == 0] == 0).all()                          # a class held by one shard always goes there


def test_one_expert_per_sample_for_the_whole_trajectory_under_cfg():
    n = 64
    y = torch.arange(n) % 3
    ens = _ensemble(seed=3)
    ens.record_routing = True
    noise = torch.randn(n, 1, 4, 4)
    x = sample(ens, noise, y, steps=6, sampler="heun", cfg_scale=2.0, null_class=4)
    log = torch.stack(ens.routing_log)                     # [calls, n]
    assert len(ens.routing_log) >= 6 and (log == log[0]).all()   # the same expert at every call
    # Every step's velocity came from that expert alone: x_0 = noise - sum dt * k = noise - k.
    assert torch.allclose(noise - x, log[0].float().view(n, 1, 1, 1).expand_as(x), atol=1e-5)
    # Cost: each sample evaluated by exactly one expert per call (both CFG halves), never the router.
    assert sum(ens.expert_samples) == 2 * n * len(ens.routing_log) and ens.router_calls == 0
    # Another seed draws other experts; the same seed the same ones.
    other, again = _ensemble(seed=4), _ensemble(seed=3)
    z = torch.zeros(n, 1, 4, 4), torch.ones(n), y
    assert torch.equal(again.route(*z), ens.route(*z)) and not torch.equal(other.route(*z), ens.route(*z))


def test_refused_without_class_counts():
    ens = Ensemble([TaggedExpert(k) for k in range(3)], ExplodingRouter())
    with pytest.raises(EnsembleError, match="class counts"):
        ens.mode = "sample-once"
    with pytest.raises(EnsembleError, match="4 classes"):
        Ensemble([TaggedExpert(k, num_classes=5) for k in range(3)], ExplodingRouter(), class_counts=COUNTS)
