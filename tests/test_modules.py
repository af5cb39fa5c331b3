"""The swapped-in modules behave as the modules they replace, on the merged weights."""
import copy

import pytest
import torch
import torch.nn as nn

import atlas_fast
from atlas_fast.modules import AtlasConv2d, AtlasLinear, AtlasMultiheadAttention

from helpers import assert_rel


class Holder(nn.Module):
    """Wraps one module so compose() swaps it as a child, as it does inside a real model."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def _composed(module, T=3, K=1):
    holder = Holder(module)
    bank = atlas_fast.synthetic_task_vectors(holder, T, rel_scale=5e-2, seed=3)
    atlas = atlas_fast.compose(copy.deepcopy(holder), bank, partitions=K, backend="torch")
    with torch.no_grad():
        atlas.coefficients.uniform_(-1, 1)
    return atlas, atlas.merge()


def _check(atlas, plain, *args, **kwargs):
    out = atlas(*args, **kwargs)
    with torch.no_grad():
        ref = plain(*args, **kwargs)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for o, r in zip(outs, refs):
        if r is None:
            assert o is None
        else:
            assert_rel(o.detach(), r, 1e-5)
    outs[0].sum().backward()
    assert atlas.coefficients.grad.abs().sum() > 0


@pytest.mark.parametrize("K", [1, 3])
def test_linear(K):
    atlas, plain = _composed(nn.Linear(13, 9), K=K)
    assert isinstance(atlas.model.inner, AtlasLinear)
    _check(atlas, plain, torch.randn(4, 5, 13))


@pytest.mark.parametrize("kwargs", [dict(stride=2, padding=1), dict(padding="same", dilation=2), dict(groups=2),
                                    dict(bias=False, stride=(1, 2))])
def test_conv2d(kwargs):
    atlas, plain = _composed(nn.Conv2d(4, 6, 3, **kwargs))
    assert isinstance(atlas.model.inner, AtlasConv2d)
    _check(atlas, plain, torch.randn(2, 4, 11, 9))


def test_conv2d_reflect_padding_takes_the_generic_merge():
    atlas, plain = _composed(nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"))
    assert isinstance(atlas.model.inner, nn.Conv2d)
    assert set(atlas.report.generic) == {"inner.weight", "inner.bias"}
    _check(atlas, plain, torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_self_attention(batch_first, need_weights, average):
    atlas, plain = _composed(nn.MultiheadAttention(24, 4, batch_first=batch_first).eval())
    assert isinstance(atlas.model.inner, AtlasMultiheadAttention)
    x = torch.randn(3, 7, 24)
    _check(atlas, plain, x, x, x, need_weights=need_weights, average_attn_weights=average)


@pytest.mark.parametrize("mask", ["bool", "float", "padding", "causal"])
def test_attention_masks(mask):
    atlas, plain = _composed(nn.MultiheadAttention(16, 2, batch_first=True).eval())
    x = torch.randn(2, 5, 16)
    kwargs = {"need_weights": False}
    if mask == "bool":
        kwargs["attn_mask"] = torch.rand(5, 5) > 0.7
        kwargs["attn_mask"].fill_diagonal_(False)
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(2 * 2, 5, 5)
    elif mask == "padding":
        kwargs["key_padding_mask"] = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    else:
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(5)
        kwargs["is_causal"] = True
    _check(atlas, plain, x, x, x, **kwargs)


def test_cross_attention():
    atlas, plain = _composed(nn.MultiheadAttention(16, 4, batch_first=True).eval())
    q, kv = torch.randn(2, 3, 16), torch.randn(2, 6, 16)
    _check(atlas, plain, q, kv, kv, need_weights=False)


def test_unsupported_attention_takes_the_generic_merge():
    atlas, plain = _composed(nn.MultiheadAttention(16, 4, kdim=8, vdim=8, batch_first=True).eval())
    assert isinstance(atlas.model.inner, nn.MultiheadAttention)
    q, k, v = torch.randn(2, 3, 16), torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    # called on its own first, outside the composed model, it must merge all its blocks (out_proj's too)
    with torch.no_grad():
        alone = atlas.model.inner(q, k, v, need_weights=False)[0]
        assert_rel(alone, plain.inner(q, k, v, need_weights=False)[0], 1e-5)
    _check(atlas, plain, q, k, v, need_weights=False)


def test_torch_compile_fullgraph():
    from open_clip.transformer import VisionTransformer
    vit = VisionTransformer(image_size=32, patch_size=8, width=48, layers=2, heads=4, mlp_ratio=2.0,
                            output_dim=24).eval()
    atlas = atlas_fast.compose(vit, atlas_fast.synthetic_task_vectors(vit, 2), partitions=2, backend="torch")
    with torch.no_grad():
        atlas.coefficients.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 32, 32)
    eager = atlas(x)
    grad = torch.autograd.grad(eager.sum(), atlas.coefficients)[0]
    compiled = torch.compile(atlas, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert_rel(out.detach(), eager.detach(), 1e-6)
    assert_rel(torch.autograd.grad(out.sum(), atlas.coefficients)[0], grad, 1e-6)


def test_merge_after_to():
    """After .to(), merge() gives a plain copy in the new dtype with the composed model's outputs."""
    atlas, _ = _composed(nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5)))
    atlas.to(torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64)
    plain = atlas.merge()
    assert plain.inner[0].weight.dtype == torch.float64
    with torch.no_grad():
        assert_rel(plain(x), atlas(x), 1e-12)
