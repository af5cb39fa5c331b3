"""The paper-style baseline (baselines.naive) against the float64 reference: outputs and coefficient gradients.

The benchmarks time every backend against this baseline, so it is checked on its own, not against compose().
"""
import copy

import pytest
import torch
import torch.nn as nn

import atlas_fast
from atlas_fast.bench.naive import NaiveAtlas
from helpers import TOL, assert_coef_grad, assert_rel, composed_block_names, reference_outputs_and_grad


class ConvTokens(nn.Module):
    """Conv2d patches → tokens → LayerNorm → Linear: a weight, a bias and a norm of every kind."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 7)

    def forward(self, x):
        return self.head(self.norm(self.conv(x).flatten(2).transpose(1, 2)))


def _model():
    model = ConvTokens()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-trivial norm scales and biases
    return model


@pytest.mark.parametrize("granularity,K", [("block", 1), ("block", 3), ("task", 1)])
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
def test_naive_matches_float64_reference(granularity, K, bank_dtype):
    model = _model()
    plain = copy.deepcopy(model)
    bank = atlas_fast.synthetic_task_vectors(model, 3, rel_scale=5e-2, dtype=bank_dtype, seed=1)
    naive = NaiveAtlas(model, bank, granularity=granularity, partitions=K, seed=4)
    names = composed_block_names(plain, bank)
    assert naive.block_names == names
    with torch.no_grad():
        naive.coefficients.uniform_(-1, 1)
    x = torch.randn(2, 3, 9, 11)
    out = naive(x)
    g = torch.randn_like(out)
    grad, = torch.autograd.grad(out, naive.coefficients, g)
    ref, ref_grad = reference_outputs_and_grad(plain, bank, naive.coefficients, (x,), grad_out=g,
                                               granularity=granularity, partitions=K, seed=4)
    tol_out, tol_grad = TOL[torch.float32]
    assert_rel(out.detach(), ref, tol_out)
    assert_coef_grad(grad, ref_grad, names, tol_grad, granularity, K)


def test_naive_leaves_theta0_frozen_and_unchanged():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    naive = NaiveAtlas(model, atlas_fast.synthetic_task_vectors(model, 2, rel_scale=5e-2), partitions=3)
    with torch.no_grad():
        naive.coefficients.uniform_(-1, 1)
    naive(torch.randn(2, 3, 9, 11)).sum().backward()
    for n, p in model.named_parameters():
        assert not p.requires_grad and p.grad is None
        assert torch.equal(p, before[n]), n
