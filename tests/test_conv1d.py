"""transformers' Conv1D (GPT-2's linear layer: y = x W + b, W stored (in, out)) takes the fused linear path
(modules.AtlasConv1D) in its stored layout: outputs, coefficient and input gradients against a float64 reference
built here (the plain Conv1D / GPT-2 in float64 with its parameters set to θ0 + Σ c τ by hand, the coefficient
gradient by autograd there), for float, bfloat16, int8, int4 and low-rank banks, with partitions, merge(),
offload and grouped calls, on the torch backend and the Triton one (interpreter)."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

import atlas_fast
from atlas_fast.bank.lowrank import LowRankBlock
from atlas_fast.bank.quant import QuantizedBlock
from atlas_fast.composer.modules import AtlasConv1D
from atlas_fast.ops.hashing import block_key
from atlas_fast.ops.reference import merge_ref
from helpers import TOL, assert_coef_grad, assert_rel

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
Conv1D = transformers.pytorch_utils.Conv1D

T, SEED, VOCAB = 3, 7, 37


class Holder(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def holder(nf=9, nx=13):
    torch.manual_seed(0)
    model = Holder(Conv1D(nf, nx))
    with torch.no_grad():
        model.inner.bias.normal_(0, 0.1)
    return model


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def bank_of(model, fmt):
    bank = atlas_fast.synthetic_task_vectors(model, T, rel_scale=5e-2, seed=3)
    return {"float32": lambda: bank, "bfloat16": lambda: bank.to(dtype=torch.bfloat16),
            "int8": lambda: bank.to(dtype=torch.int8), "int4": lambda: bank.to(dtype="int4", group_size=4),
            "lowrank": lambda: bank.low_rank(rank=2)}[fmt]()


def dense(tau):
    """A bank entry as a float64 tensor (T, *shape), from its stored form."""
    if isinstance(tau, QuantizedBlock):
        return tau.dequantize(torch.float64)
    if isinstance(tau, LowRankBlock):
        return tau.dense(torch.float64)
    return tau.double()


def merged_reference(plain, bank, c, partitions=1):
    """{name: θ0 + Σ c τ} in float64 (merge_ref, block b's key block_key(SEED, b)) for the bank's parameters, in
    named_parameters() order. GPT-2's lm_head.weight, tied to transformer.wte.weight, gets the same tensor."""
    params, b = {}, 0
    for name, p0 in plain.named_parameters():
        if name not in bank:
            continue
        cb = c[:, b:b + 1] if partitions == 1 else c[:, b]
        params[name] = merge_ref(p0.detach(), dense(bank[name]), cb, block_key(SEED, b))
        b += 1
    if "transformer.wte.weight" in params:
        params["lm_head.weight"] = params["transformer.wte.weight"]
    return params


def reference(plain, bank, coef, x, grad_out, partitions=1, output=lambda out: out):
    """(output, dL/dc, dL/dx) in float64; dL/dx only for a floating x."""
    c = coef.detach().double().requires_grad_()
    leaves = [c]
    if x.is_floating_point():
        x = x.detach().double().requires_grad_()
        leaves.append(x)
    out = output(functional_call(copy.deepcopy(plain).double(), merged_reference(plain, bank, c, partitions), (x,),
                                 tie_weights=False))
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_out.double()))


def compose(model, bank, partitions=1, backend="torch", **kwargs):
    atlas = atlas_fast.compose(model, bank, partitions=partitions, backend=backend, seed=SEED, **kwargs)
    with torch.no_grad():
        atlas.coefficients.copy_(torch.rand(atlas.coefficients.shape, generator=torch.Generator().manual_seed(4))
                                 * 2 - 1)
    return atlas


def check(plain, atlas, bank, x, partitions=1, output=lambda out: out, tol=TOL[torch.float32]):
    leaves = [atlas.coefficients]
    if x.is_floating_point():
        x = x.clone().requires_grad_()
        leaves.append(x)
    out = output(atlas(x))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    grads = torch.autograd.grad(out, leaves, g)
    ref, *ref_grads = reference(plain, bank, atlas.coefficients, x, g, partitions, output)
    assert_rel(out.detach(), ref, tol[0], "output")
    assert_coef_grad(grads[0], ref_grads[0], atlas.block_names, tol[1], partitions=partitions)
    if len(grads) > 1:
        assert_rel(grads[1], ref_grads[1], tol[1], "input gradient")


def ids():
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))


def logits(out):
    return out.logits


# ---------------------------------------------------------------- the module

@pytest.mark.parametrize("fmt,partitions", [("float32", 1), ("float32", 3), ("bfloat16", 3), ("int8", 1),
                                            ("int4", 3), ("lowrank", 1)])
def test_conv1d_is_fused_and_matches_the_reference(fmt, partitions):
    plain = holder()
    bank = bank_of(plain, fmt)
    atlas = compose(copy.deepcopy(plain), bank, partitions)
    assert isinstance(atlas.model.inner, AtlasConv1D)
    assert atlas.report.fused == {"inner.weight": "Conv1D", "inner.bias": "Conv1D"} and not atlas.report.generic
    check(plain, atlas, bank, torch.randn(4, 5, 13), partitions)


def test_conv1d_without_a_composed_bias():
    plain = holder()
    bank = atlas_fast.TaskVectors({"inner.weight": bank_of(plain, "float32")["inner.weight"]})
    atlas = compose(copy.deepcopy(plain), bank, 3, strict=False)
    assert atlas.report.missing_from_bank == ["inner.bias"] and isinstance(atlas.model.inner, AtlasConv1D)
    check(plain, atlas, bank, torch.randn(3, 13), partitions=3)


def test_merge_gives_the_plain_conv1d_with_the_same_partitions():
    plain = holder()
    bank = bank_of(plain, "float32")
    atlas = compose(copy.deepcopy(plain), bank, 3)
    merged = atlas.merge()
    assert type(merged.inner) is Conv1D
    x = torch.randn(4, 13)
    with torch.no_grad():
        ref = functional_call(copy.deepcopy(plain).double(),
                              merged_reference(plain, bank, atlas.coefficients.double(), 3), (x.double(),))
        assert_rel(merged(x), ref, TOL[torch.float32][0], "merged")
        assert_rel(atlas(x), ref, TOL[torch.float32][0], "composed")


def test_offloaded_conv1d_equals_the_reference():
    plain = holder()
    bank = bank_of(plain, "float32")
    atlas = compose(copy.deepcopy(plain), bank, offload=True)
    check(plain, atlas, bank, torch.randn(4, 5, 13))


def test_grouped_conv1d_runs_each_group_as_its_own_composition():
    plain = holder()
    bank = bank_of(plain, "float32")
    atlas = compose(copy.deepcopy(plain), bank, 3)
    coef = atlas.group_coefficients(2)
    with torch.no_grad():
        coef[1].mul_(-0.5)
    index = torch.tensor([1, 0, 1])
    x = torch.randn(3, 5, 13)
    with atlas.groups(index, coef):
        out = atlas(x)
    g = torch.randn(out.shape)
    grad, = torch.autograd.grad(out, coef, g)
    for group in (0, 1):
        rows = index == group
        ref, ref_grad, _ = reference(plain, bank, coef[group], x[rows], g[rows], 3)
        assert_rel(out[rows].detach(), ref, TOL[torch.float32][0], f"group {group} output")
        assert_rel(grad[group], ref_grad, TOL[torch.float32][1], f"group {group} coefficient gradient")


def test_triton_backend():
    pytest.importorskip("triton")
    plain = holder(nf=10, nx=7)
    bank = bank_of(plain, "float32")
    for partitions in (1, 3):
        atlas = compose(copy.deepcopy(plain), bank, partitions, backend="triton")
        assert atlas.backend == "triton" and isinstance(atlas.model.inner, AtlasConv1D)
        check(plain, atlas, bank, torch.randn(2, 3, 7), partitions)


def test_torch_compile_fullgraph():
    plain = holder()
    bank = bank_of(plain, "int8")
    atlas = compose(copy.deepcopy(plain), bank, 1)
    x = torch.randn(4, 5, 13)
    check(plain, atlas, bank, x)
    eager = atlas(x)
    g = torch.randn_like(eager)
    grad = torch.autograd.grad(eager, atlas.coefficients, g)[0]
    compiled = torch.compile(atlas, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert_rel(out.detach(), eager.detach(), 1e-6, "compiled output")
    assert_rel(torch.autograd.grad(out, atlas.coefficients, g)[0], grad, 1e-6, "compiled coefficient gradient")


def test_importing_atlas_fast_does_not_import_transformers():
    code = "import sys, atlas_fast; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------- GPT-2

def test_gpt2_runs_its_conv1d_layers_fused():
    plain = gpt2()
    bank = bank_of(plain, "float32")
    atlas = compose(copy.deepcopy(plain), bank)
    conv1d = [n for n, m in plain.named_modules() if isinstance(m, Conv1D)]
    assert len(conv1d) == 2 * 4
    assert all(isinstance(atlas.model.get_submodule(n), AtlasConv1D) for n in conv1d)
    expected = {f"{n}.{p}": "Conv1D" for n in conv1d for p in ("weight", "bias")}
    assert {k: v for k, v in atlas.report.fused.items() if v == "Conv1D"} == expected
    assert set(atlas.report.fused) == set(expected) | {"lm_head.weight"}
    assert "Conv1D" not in str(atlas.report.generic)


@pytest.mark.parametrize("fmt,partitions", [("float32", 1), ("float32", 3), ("int8", 1)])
def test_gpt2_matches_the_reference(fmt, partitions):
    plain = gpt2()
    bank = bank_of(plain, fmt)
    atlas = compose(copy.deepcopy(plain), bank, partitions)
    check(plain, atlas, bank, ids(), partitions, output=logits)


def test_gpt2_merge():
    plain = gpt2()
    bank = bank_of(plain, "float32")
    atlas = compose(copy.deepcopy(plain), bank, 3)
    merged = atlas.merge()
    assert not any("Atlas" in type(m).__name__ for m in merged.modules())
    with torch.no_grad():
        ref = functional_call(copy.deepcopy(plain).double(),
                              merged_reference(plain, bank, atlas.coefficients.double(), 3), (ids(),),
                              tie_weights=False).logits
        assert_rel(merged(ids()).logits, ref, TOL[torch.float32][0], "merged GPT-2")


@pytest.mark.filterwarnings("ignore:There is a performance drop")   # CPU flash attention under vmap
def test_gpt2_groups():
    """Each sample of a grouped call runs its group's composition: the Conv1D layers merged per group, the tied
    lm_head fused on θ0 while the embedding gets its group's merged weight."""
    plain = gpt2()
    bank = bank_of(plain, "float32")
    atlas = compose(copy.deepcopy(plain), bank)
    coef = atlas.group_coefficients(2)
    with torch.no_grad():
        coef[1].mul_(-0.5)
    index = torch.tensor([1, 0, 1])
    x = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(3))
    with atlas.groups(index, coef):
        out = atlas(x, use_cache=False).logits
    g = torch.randn(out.shape)
    grad, = torch.autograd.grad(out, coef, g)
    for group in (0, 1):
        rows = index == group
        ref, ref_grad = reference(plain, bank, coef[group], x[rows], g[rows], output=logits)
        assert_rel(out[rows].detach(), ref, TOL[torch.float32][0], f"group {group} output")
        assert_rel(grad[group], ref_grad, TOL[torch.float32][1], f"group {group} coefficient gradient")
