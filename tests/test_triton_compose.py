"""compose(backend="triton") on a tiny open_clip ViT against compose(backend="torch").

The ViT has every swapped module kind: the patch embedding (a patchify nn.Conv2d), nn.MultiheadAttention
and the MLP's nn.Linear layers; its other parameters take the generic merge on both backends.
"""
import copy

import pytest
import torch

import atlas_fast
from helpers import TOL, assert_coef_grad, assert_rel, reference_outputs_and_grad, tiny_vit

T = 3


@pytest.fixture(scope="module")
def vit():
    return tiny_vit()


def _composed(vit, backend, partitions):
    bank = atlas_fast.synthetic_task_vectors(vit, T, rel_scale=1e-2, dtype=torch.bfloat16, seed=2)
    model = atlas_fast.compose(copy.deepcopy(vit), bank, "block", partitions, backend=backend, seed=5)
    with torch.no_grad():
        model.coefficients.copy_(torch.linspace(-0.8, 0.8, model.coefficients.numel()).view_as(model.coefficients))
    return model


def _out_and_grad(model, images, weight):
    y = model(images)
    grad, = torch.autograd.grad((y * weight).sum(), model.coefficients)
    return y.detach(), grad


@pytest.mark.parametrize("partitions", [1, 3])
def test_triton_matches_torch(vit, partitions):
    images = torch.randn(2, 3, 32, 32)
    weight = torch.randn(2, 24)
    model = _composed(vit, "triton", partitions)
    assert model.backend == "triton"
    assert set(model.report.fused.values()) == {"Conv2d", "MultiheadAttention", "Linear"}
    y, g = _out_and_grad(model, images, weight)
    y_ref, g_ref = _out_and_grad(_composed(vit, "torch", partitions), images, weight)
    tol_out, tol_grad = TOL[torch.float32]
    assert_rel(y, y_ref, tol_out, "output")
    assert_rel(g, g_ref, tol_grad, "coefficient gradient")
    # and against the float64 model merged by hand from the same (bfloat16) bank
    bank = atlas_fast.synthetic_task_vectors(vit, T, rel_scale=1e-2, dtype=torch.bfloat16, seed=2)
    y64, g64 = reference_outputs_and_grad(vit, bank, model.coefficients, (images,), grad_out=weight,
                                          partitions=partitions, seed=5)
    assert_rel(y, y64, tol_out, "output against float64")
    assert_coef_grad(g, g64, model.block_names, tol_grad, partitions=partitions)
