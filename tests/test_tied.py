"""Tied parameters (one tensor held by several modules: an output layer sharing its embedding's weight) are one
block: every module using the tensor runs θ0 + Σ c τ with that block's coefficients, forward and backward, and the
coefficient gradient is the sum over the uses. Checked against a float64 reference built here: a float64 copy of
the plain model with every name of each composed tensor set to θ0 + Σ c τ by hand, the coefficient gradient by
autograd there. Models: small torch models with a tied nn.Linear / nn.Embedding, and a tiny GPT-2
(transformers' GPT2LMHeadModel ties lm_head.weight to transformer.wte.weight)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import atlas_fast
from atlas_fast.ops.hashing import block_key
from atlas_fast.ops.reference import merge_ref
from helpers import TOL, assert_coef_grad, assert_rel

T, VOCAB, DIM, SEED = 3, 37, 12, 5


class TiedLM(nn.Module):
    """Embedding → LayerNorm → tanh → output layer whose weight is the embedding's. head_first registers the
    output layer first, so that named_parameters() names the tensor "head.weight" instead of "emb.weight"."""

    def __init__(self, head_first=False, head="linear"):
        super().__init__()
        if head_first:
            self.head = nn.Linear(DIM, VOCAB) if head == "linear" else FunctionalHead()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.norm = nn.LayerNorm(DIM)
        if not head_first:
            self.head = nn.Linear(DIM, VOCAB) if head == "linear" else FunctionalHead()
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.norm(self.emb(ids))))


class FunctionalHead(nn.Module):
    """An output layer that no swap table knows: its tied weight takes the generic merge, as the embedding's."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(VOCAB, DIM))
        self.bias = nn.Parameter(torch.randn(VOCAB) * 0.1)

    def forward(self, h):
        return F.linear(h, self.weight, self.bias)


def tied_lm(**kwargs):
    torch.manual_seed(0)
    model = TiedLM(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def finetuned(model, t):
    """A copy of `model` moved by a random step (ties kept: the copy's modules share what the original's do)."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(100 + t)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return other


def state_dict_bank(model):
    """A bank from state dicts: it names a tied tensor under each of its names, with identical task vectors."""
    return atlas_fast.TaskVectors.from_state_dicts(model.state_dict(), [finetuned(model, t).state_dict()
                                                                         for t in range(T)])


def model_bank(model):
    """A bank from modules: named_parameters() names a tied tensor once."""
    return atlas_fast.TaskVectors.from_models(model, [finetuned(model, t) for t in range(T)])


def reference(plain, bank, ties, coef, args, grad_out, partitions=1, output=lambda out: out):
    """(output, dL/dc) in float64, L = Σ grad_out · output. Block b is the b-th name of plain.named_parameters()
    with a task vector in the bank under that name or one of its tied names `ties[name]`; every one of its names
    is set to merge_ref(θ0, τ, c_b) (functional_call without tying: each name is given explicitly)."""
    c = coef.detach().double().requires_grad_()
    params, b = {}, 0
    for name, p0 in plain.named_parameters():
        names = [name] + ties.get(name, [])
        in_bank = [n for n in names if n in bank]
        if not in_bank:
            continue
        cb = c.reshape(-1, 1) if c.dim() == 1 else (c[:, b:b + 1] if c.dim() == 2 else c[:, b])
        merged = merge_ref(p0.detach(), bank[in_bank[0]], cb, block_key(SEED, b))
        params.update({n: merged for n in names})
        b += 1
    model64 = copy.deepcopy(plain).double()
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    out = output(functional_call(model64, params, args, tie_weights=False))
    grad, = torch.autograd.grad(out, c, grad_out.double())
    return out.detach(), grad


def run(atlas, args, output=lambda out: out):
    out = output(atlas(*args))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    grad, = torch.autograd.grad(out, atlas.coefficients, g)
    return out.detach(), grad, g


def compose_random(model, bank, partitions=1, **kwargs):
    atlas = atlas_fast.compose(model, bank, partitions=partitions, backend="torch", seed=SEED, **kwargs)
    with torch.no_grad():
        atlas.coefficients.copy_(torch.rand(atlas.coefficients.shape, generator=torch.Generator().manual_seed(4))
                                 * 2 - 1)
    return atlas


def check_against_reference(plain, atlas, bank, ties, args, partitions=1, output=lambda out: out,
                            tol=TOL[torch.float32]):
    out, grad, g = run(atlas, args, output)
    ref, ref_grad = reference(plain, bank, ties, atlas.coefficients, args, g, partitions, output)
    tol_out, tol_grad = tol
    assert_rel(out, ref, tol_out, "output")
    assert_coef_grad(grad, ref_grad, atlas.block_names, tol_grad, partitions=partitions)


def ids(n=2, length=7):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------- a tied nn.Linear / nn.Embedding

@pytest.mark.parametrize("partitions", [1, 3])
@pytest.mark.parametrize("head_first", [False, True])
@pytest.mark.parametrize("bank_kind", ["one name", "both names", "the other name only"])
def test_tied_linear_and_embedding_match_the_reference(bank_kind, head_first, partitions):
    plain = tied_lm(head_first=head_first)
    first, other = ("head.weight", "emb.weight") if head_first else ("emb.weight", "head.weight")
    bank = model_bank(plain) if bank_kind == "one name" else state_dict_bank(plain)
    if bank_kind == "both names":
        assert first in bank and other in bank
    if bank_kind == "the other name only":
        bank = atlas_fast.TaskVectors({k: v for k, v in bank.vectors.items() if k != first})
    atlas = compose_random(copy.deepcopy(plain), bank, partitions)
    names = [n for n, _ in plain.named_parameters()]
    assert atlas.block_names == names and first in names and other not in names
    assert atlas.coefficients.shape[1] == len(names), "a tied tensor is one block"
    assert atlas.report.tied == {first: [other]}
    assert atlas.report.fused == {"head.weight": "Linear", "head.bias": "Linear"}
    assert atlas.report.generic == ["emb.weight", "norm.weight", "norm.bias"]
    assert not atlas.report.unused_bank_entries and not atlas.report.missing_from_bank
    check_against_reference(plain, atlas, bank, {first: [other]}, (ids(),), partitions)


@pytest.mark.parametrize("head_first", [False, True])
def test_tied_parameter_with_two_generic_uses(head_first):
    plain = tied_lm(head_first=head_first, head="functional")
    first, other = ("head.weight", "emb.weight") if head_first else ("emb.weight", "head.weight")
    bank = state_dict_bank(plain)
    atlas = compose_random(copy.deepcopy(plain), bank)
    assert not atlas.report.fused
    assert set(atlas.report.generic) == {"emb.weight", "head.weight", "head.bias", "norm.weight", "norm.bias"}
    check_against_reference(plain, atlas, bank, {first: [other]}, (ids(),))
    # an owner called on its own merges the tied block for itself
    with torch.no_grad():
        alone = atlas.model.emb(ids())
        c = atlas.coefficients.double()
        b = atlas.block_names.index(first)
        ref = F.embedding(ids(), merge_ref(plain.emb.weight.detach(), bank[first], c[:, b:b + 1], block_key(SEED, b)))
    assert_rel(alone, ref, TOL[torch.float32][0], "embedding called alone")
    assert atlas.model.emb.weight is atlas.model.head.weight, "θ0 is back on both owners"


def test_different_task_vectors_for_two_names_of_one_tensor_are_refused():
    plain = tied_lm()
    bank = state_dict_bank(plain)
    vectors = dict(bank.vectors)
    vectors["head.weight"] = vectors["head.weight"] + 1e-3
    with pytest.raises(ValueError, match=r"'emb\.weight' and 'head\.weight' name one tied parameter"):
        atlas_fast.compose(plain, atlas_fast.TaskVectors(vectors))
    assert type(plain) is TiedLM and type(plain.head) is nn.Linear, "a refused compose leaves the model alone"


def test_broken_tie_composes_two_blocks():
    plain = tied_lm()
    plain.head.weight = nn.Parameter(plain.emb.weight.detach().clone())
    bank = state_dict_bank(plain)
    atlas = compose_random(copy.deepcopy(plain), bank)
    assert atlas.block_names == [n for n, _ in plain.named_parameters()]
    assert {"emb.weight", "head.weight"} <= set(atlas.block_names) and not atlas.report.tied
    check_against_reference(plain, atlas, bank, {}, (ids(),))


def test_merge_keeps_the_tie_and_unwrap_restores_it():
    plain = tied_lm()
    bank = state_dict_bank(plain)
    model = copy.deepcopy(plain)
    weight, keys = model.emb.weight, list(model.state_dict())
    atlas = compose_random(model, bank)
    assert list(model.state_dict()) == ["atlas_coefficients"] + keys, "the original keys and the coefficients"
    merged = atlas.merge()
    assert type(merged.head) is nn.Linear and merged.head.weight is merged.emb.weight, "merge() keeps the tie"
    assert merged.emb.weight is not weight
    ref, _ = reference(plain, bank, {"emb.weight": ["head.weight"]}, atlas.coefficients, (ids(),),
                       torch.ones(2, 7, VOCAB))
    with torch.no_grad():
        assert_rel(merged(ids()), ref, TOL[torch.float32][0], "merged model")
    unwrapped = atlas.unwrap()
    assert unwrapped.head.weight is unwrapped.emb.weight is weight, "unwrap() gives back the one tensor, tied"
    assert list(unwrapped.state_dict()) == keys


def test_a_move_keeps_the_tied_task_vectors_one_tensor():
    plain = tied_lm()
    bank = state_dict_bank(plain)
    atlas = compose_random(copy.deepcopy(plain), bank)
    atlas.to(torch.float64)
    tied = [t for m in (atlas.model, atlas.atlas.generic) for t in m.buffers() if t.shape == (T, VOCAB, DIM)]
    assert len(tied) == 2 and tied[0] is tied[1], "the fused and the generic use hold one float64 tensor"
    # float64 outputs; the generic merge reduces its coefficient gradient in float32 (the merge_blocks contract)
    check_against_reference(plain, atlas, bank, {"emb.weight": ["head.weight"]}, (ids(),),
                            tol=(TOL[torch.float64][0], TOL[torch.float32][1]))


class TwoLinears(nn.Module):
    """Two nn.Linear layers sharing one weight (each with its own bias): both uses run fused."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("offload", [False, True])
def test_tied_parameter_with_two_fused_uses(offload):
    torch.manual_seed(0)
    plain = TwoLinears()
    bank = state_dict_bank(plain)
    atlas = compose_random(copy.deepcopy(plain), bank, offload=offload)
    assert atlas.report.fused == {n: "Linear" for n in ("a.weight", "a.bias", "b.weight", "b.bias")}
    assert atlas.block_names == ["a.weight", "a.bias", "b.bias"] and atlas.report.tied == {"a.weight": ["b.weight"]}
    if offload:
        off = atlas._offload
        assert off.host[0]["tau_weight"] is off.host[1]["tau_weight"], "one host copy of the tied task vectors"
        assert off.host_bytes == 4 * T * (DIM * DIM + 2 * DIM)
    check_against_reference(plain, atlas, bank, {"a.weight": ["b.weight"]}, (torch.randn(4, DIM),))


# ---------------------------------------------------------------- GPT-2 (transformers)

GPT2_TIES = {"transformer.wte.weight": ["lm_head.weight"]}


def gpt2(tie=True):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    if not tie:
        model.lm_head.weight = nn.Parameter(model.transformer.wte.weight.detach().clone())
    return model


def logits(out):
    return out.logits


@pytest.mark.parametrize("bank_kind", ["one name", "both names"])
def test_gpt2_matches_the_reference(bank_kind):
    plain = gpt2()
    assert plain.lm_head.weight is plain.transformer.wte.weight
    bank = model_bank(plain) if bank_kind == "one name" else state_dict_bank(plain)
    atlas = compose_random(copy.deepcopy(plain), bank)
    assert atlas.report.tied == GPT2_TIES
    assert atlas.report.fused["lm_head.weight"] == "Linear" and "transformer.wte.weight" in atlas.report.generic
    check_against_reference(plain, atlas, bank, GPT2_TIES, (ids(),), output=logits)


def test_gpt2_with_the_tie_broken():
    plain = gpt2(tie=False)
    bank = state_dict_bank(plain)
    atlas = compose_random(copy.deepcopy(plain), bank)
    assert {"lm_head.weight", "transformer.wte.weight"} <= set(atlas.block_names) and not atlas.report.tied
    check_against_reference(plain, atlas, bank, {}, (ids(),), output=logits)


def test_gpt2_merge_keeps_the_tie_and_unwrap_restores_it():
    plain = gpt2()
    bank = state_dict_bank(plain)
    model = copy.deepcopy(plain)
    keys = list(model.state_dict())
    atlas = compose_random(model, bank)
    assert list(model.state_dict()) == ["atlas_coefficients"] + keys, "the original keys and the coefficients"
    merged = atlas.merge()
    assert merged.lm_head.weight is merged.transformer.wte.weight
    ref, _ = reference(plain, bank, GPT2_TIES, atlas.coefficients, (ids(),), torch.ones(2, 7, VOCAB), output=logits)
    with torch.no_grad():
        assert_rel(merged(ids()).logits, ref, TOL[torch.float32][0], "merged GPT-2")
    unwrapped = atlas.unwrap()
    assert unwrapped.lm_head.weight is unwrapped.transformer.wte.weight
    assert list(unwrapped.state_dict()) == keys
