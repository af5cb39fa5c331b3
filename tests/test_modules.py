"""The swapped-in modules behave as the modules they replace, against a float64 reference built without
compose(): the plain module in float64 on θ0 + Σ c τ from reference.merge_ref (outputs and coefficient gradients)."""
import copy

import pytest
import torch
import torch.nn as nn

import atlas_fast
from atlas_fast.composer.modules import AtlasConv2d, AtlasLinear, AtlasMultiheadAttention
from helpers import (
    TOL,
    assert_coef_grad,
    assert_rel,
    composed_block_names,
    input_leaves,
    merged_reference,
    reference_call,
    reference_outputs_and_grad,
)

SEED = 7


class Holder(nn.Module):
    """Wraps one module so compose() swaps it as a child, as it does inside a real model."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


class Composed:
    """A composed copy of a module, with what the reference needs: the plain module, the bank, the layout."""

    def __init__(self, module, T=3, K=1):
        self.plain = Holder(module)
        with torch.no_grad():
            for p in self.plain.parameters():
                p.add_(torch.randn_like(p) * 0.05)  # zero-initialised biases off zero
        self.bank = atlas_fast.synthetic_task_vectors(self.plain, T, rel_scale=5e-2, seed=3)
        self.K = K
        self.atlas = atlas_fast.compose(copy.deepcopy(self.plain), self.bank, partitions=K, backend="torch",
                                        seed=SEED)
        assert self.atlas.block_names == composed_block_names(self.plain, self.bank)
        with torch.no_grad():
            self.atlas.coefficients.uniform_(-1, 1)

    def reference(self, args, kwargs=None, grad_out=None, input_grads=False):
        return reference_outputs_and_grad(self.plain, self.bank, self.atlas.coefficients, args, kwargs, grad_out,
                                          partitions=self.K, seed=SEED, input_grads=input_grads)

    def check(self, *args, **kwargs):
        """Every output, and the coefficient and input gradients of the first one, against the float64 reference."""
        args, leaves = input_leaves(args)
        out = self.atlas(*args, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        g = torch.randn_like(outs[0])
        grad, *input_grads = torch.autograd.grad(outs[0], [self.atlas.coefficients] + leaves, g)
        ref, ref_grad, *ref_input_grads = self.reference(args, kwargs, g, input_grads=True)
        refs = ref if isinstance(ref, tuple) else (ref,)
        tol_out, tol_grad = TOL[torch.float32]
        assert len(outs) == len(refs)
        for i, (o, r) in enumerate(zip(outs, refs)):
            if r is None:
                assert o is None
            else:
                assert_rel(o.detach(), r, tol_out, f"output {i}")
        assert_coef_grad(grad, ref_grad, self.atlas.block_names, tol_grad, partitions=self.K)
        assert len(input_grads) == len(ref_input_grads) == len(leaves)
        for i, (d, r) in enumerate(zip(input_grads, ref_input_grads)):
            assert_rel(d, r, tol_grad, f"gradient of input {i}")


@pytest.mark.parametrize("K", [1, 3])
def test_linear(K):
    c = Composed(nn.Linear(13, 9), K=K)
    assert isinstance(c.atlas.model.inner, AtlasLinear)
    c.check(torch.randn(4, 5, 13))


@pytest.mark.parametrize("kwargs", [dict(stride=2, padding=1), dict(padding="same", dilation=2), dict(groups=2),
                                    dict(bias=False, stride=(1, 2))])
@pytest.mark.parametrize("K", [1, 3])
def test_conv2d(kwargs, K):
    c = Composed(nn.Conv2d(4, 6, 3, **kwargs), K=K)
    assert isinstance(c.atlas.model.inner, AtlasConv2d)
    c.check(torch.randn(2, 4, 11, 9))


def test_conv2d_reflect_padding_takes_the_generic_merge():
    c = Composed(nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), K=3)
    assert isinstance(c.atlas.model.inner, nn.Conv2d)
    assert set(c.atlas.report.generic) == {"inner.weight", "inner.bias"}
    c.check(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_self_attention(batch_first, need_weights, average):
    c = Composed(nn.MultiheadAttention(24, 4, batch_first=batch_first).eval())
    assert isinstance(c.atlas.model.inner, AtlasMultiheadAttention)
    x = torch.randn(3, 7, 24)
    c.check(x, x, x, need_weights=need_weights, average_attn_weights=average)


@pytest.mark.parametrize("mask", ["bool", "float", "padding", "causal"])
def test_attention_masks(mask):
    c = Composed(nn.MultiheadAttention(16, 2, batch_first=True).eval(), K=3)
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
    c.check(x, x, x, **kwargs)


def test_cross_attention():
    c = Composed(nn.MultiheadAttention(16, 4, batch_first=True).eval())
    q, kv = torch.randn(2, 3, 16), torch.randn(2, 6, 16)
    c.check(q, kv, kv, need_weights=False)


def test_unsupported_attention_takes_the_generic_merge():
    c = Composed(nn.MultiheadAttention(16, 4, kdim=8, vdim=8, batch_first=True).eval())
    assert isinstance(c.atlas.model.inner, nn.MultiheadAttention)
    q, k, v = torch.randn(2, 3, 16), torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    # called on its own first, outside the composed model, it must merge all its blocks (out_proj's too)
    with torch.no_grad():
        alone = c.atlas.model.inner(q, k, v, need_weights=False)[0]
        merged = merged_reference(c.plain, c.bank, c.atlas.coefficients.double(), partitions=c.K, seed=SEED)
        ref = reference_call(c.plain.inner, {n[len("inner."):]: t for n, t in merged.items()}, q, k, v,
                             need_weights=False)[0]
    assert_rel(alone, ref, TOL[torch.float32][0])
    c.check(q, k, v, need_weights=False)


def test_torch_compile_fullgraph():
    from open_clip.transformer import VisionTransformer
    vit = VisionTransformer(image_size=32, patch_size=8, width=48, layers=2, heads=4, mlp_ratio=2.0,
                            output_dim=24).eval()
    plain = copy.deepcopy(vit)
    bank = atlas_fast.synthetic_task_vectors(vit, 2)
    atlas = atlas_fast.compose(vit, bank, partitions=2, backend="torch", seed=SEED)
    with torch.no_grad():
        atlas.coefficients.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 32, 32)
    eager = atlas(x)
    g = torch.randn_like(eager)
    grad = torch.autograd.grad(eager, atlas.coefficients, g)[0]
    ref, ref_grad = reference_outputs_and_grad(plain, bank, atlas.coefficients, (x,), grad_out=g, partitions=2,
                                               seed=SEED)
    assert_rel(eager.detach(), ref, TOL[torch.float32][0])
    assert_rel(grad, ref_grad, TOL[torch.float32][1], "coefficient gradient")
    compiled = torch.compile(atlas, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert_rel(out.detach(), eager.detach(), 1e-6)
    assert_rel(torch.autograd.grad(out, atlas.coefficients, g)[0], grad, 1e-6)


def test_merge_after_to():
    """After .to(), merge() gives a plain copy in the new dtype with the composed model's outputs."""
    c = Composed(nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5)), K=3)
    c.atlas.to(torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64)
    merged = c.atlas.merge()
    assert merged.inner[0].weight.dtype == torch.float64
    with torch.no_grad():
        ref, _ = c.reference((x,))
        assert_rel(merged(x), ref, TOL[torch.float64][0], "merged model")
        assert_rel(c.atlas(x), ref, TOL[torch.float64][0], "composed model")
