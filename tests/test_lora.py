"""LoRA adapters in peft's saved format, built by hand with known factors: task vectors against scaling · B A
computed here in float64, and a model composed with a bank of two adapters against the float64 reference."""
import copy
import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import atlas_fast
from atlas_fast.io.lora import lora_task_vectors, read_lora
from helpers import assert_coef_grad, assert_rel, merged_reference, reference_call

P = "base_model.model."


class TransposedLinear(nn.Module):
    """A linear layer storing its weight (in, out), as GPT-2's Conv1D: LoRA's fan_in_fan_out case."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.2)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.norm = nn.LayerNorm(5)
        self.fc1 = nn.Linear(5, 37)
        self.proj = TransposedLinear(37, 23)
        self.head = nn.Linear(23, 7)
        with torch.no_grad():
            self.norm.weight.add_(torch.randn(5) * 0.1)
            self.norm.bias.add_(torch.randn(5) * 0.1)

    def forward(self, x):
        h = self.conv(x).flatten(2).transpose(1, 2)
        return self.head(self.proj(torch.tanh(self.fc1(self.norm(h)))))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Tiny().eval()


def _factors(seed, ranks=(2, 4, 4)):
    """Known non-zero factors of realistic size for conv (rank 2), fc1 and proj."""
    g = torch.Generator().manual_seed(seed)
    r_conv, r_fc1, r_proj = ranks

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.1
    return {"conv": (rnd(r_conv, 3, 3, 3), rnd(5, r_conv, 1, 1)), "fc1": (rnd(r_fc1, 5), rnd(37, r_fc1)),
            "proj": (rnd(r_proj, 37), rnd(23, r_proj))}


def _write(folder, factors, config, extra=None, file="adapter_model.safetensors"):
    """An adapter as peft saves it: factors under base_model.model.<module>.lora_{A,B}.weight."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"{P}{module}.lora_A.weight"] = a
        tensors[f"{P}{module}.lora_B.weight"] = b
    tensors.update(extra or {})
    if file.endswith(".safetensors"):
        save_file({k: v.clone().contiguous() for k, v in tensors.items()}, folder / file)
    else:
        torch.save(tensors, folder / file)
    if config is not None:
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return folder


CONFIG = {"r": 4, "lora_alpha": 8, "rank_pattern": {"conv": 2}, "alpha_pattern": {"fc1": 3},
          "modules_to_save": ["head"]}


def _expected(model, factors, scalings, full=None):
    """τ in float64, computed here: scaling · B A in each weight's layout, saved − θ0 for full tensors."""
    out = {}
    for module, (a, b) in factors.items():
        w = model.get_parameter(f"{module}.weight")
        a, b = a.double(), b.double()
        prod = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
        if module == "proj":
            prod = prod.t()
        out[f"{module}.weight"] = scalings[module] * prod.reshape(w.shape)
    for name, v in (full or {}).items():
        out[name] = v.double() - model.get_parameter(name).detach().double()
    return out


def _head(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: p.detach() + torch.randn(p.shape, generator=g) * 0.05 for n, p in model.head.named_parameters()}


def test_task_vectors_against_float64(model, tmp_path):
    factors, head = _factors(1), _head(model, 2)
    folder = _write(tmp_path / "ad", factors, CONFIG, {f"{P}head.{k}": v for k, v in head.items()})
    ad = read_lora(folder, model)
    scalings = {"conv": 8 / 2, "fc1": 3 / 4, "proj": 8 / 4}
    assert ad.scaling == {f"{m}.weight": s for m, s in scalings.items()}
    expected = _expected(model, factors, scalings, {f"head.{k}": v for k, v in head.items()})
    tv = ad.task_vector()
    assert set(tv) == set(expected)
    for name, ref in expected.items():
        assert tv[name].dtype == torch.float32
        assert_rel(tv[name], ref, 1e-6, f"τ of {name}")
    # The factors: τ = U V without forming τ; U = scaling · B in the usual layout, V = Aᵀ-side for proj.
    a, b = factors["fc1"]
    u, v = ad.factors["fc1.weight"]
    assert torch.equal(v, a) and torch.equal(u, 0.75 * b)
    u, v = ad.factors["proj.weight"]
    assert u.shape == (37, 4) and v.shape == (4, 23)
    assert_rel(u @ v, expected["proj.weight"], 1e-6, "proj factors")
    u, v = ad.factors["conv.weight"]
    assert_rel((u @ v).reshape(5, 3, 3, 3), expected["conv.weight"], 1e-6, "conv factors")


def test_rslora_lora_bias_and_fan_in_fan_out_square(tmp_path):
    """use_rslora: scaling = alpha / √r; lora_B.bias shifts the layer's bias; a square (in, out) weight is
    transposed only when the config says fan_in_fan_out."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"sq": TransposedLinear(6, 6), "lin": nn.Linear(6, 9)})
    g = torch.Generator().manual_seed(3)
    factors = {"sq": (torch.randn(3, 6, generator=g), torch.randn(6, 3, generator=g)),
               "lin": (torch.randn(3, 6, generator=g), torch.randn(9, 3, generator=g))}
    bias = torch.randn(9, generator=g)
    config = {"r": 3, "lora_alpha": 5, "use_rslora": True, "fan_in_fan_out": True}
    ad = read_lora(_write(tmp_path / "ad", factors, config, {f"{P}lin.lora_B.bias": bias}), model)
    s = 5 / math.sqrt(3)
    assert_rel(ad.delta("sq.weight"), s * (factors["sq"][1].double() @ factors["sq"][0].double()).t(), 1e-6)
    assert_rel(ad.delta("lin.weight"), s * factors["lin"][1].double() @ factors["lin"][0].double(), 1e-6)
    assert_rel(ad.delta("lin.bias"), s * bias.double(), 1e-6)
    config["fan_in_fan_out"] = False
    ad = read_lora(_write(tmp_path / "ad2", factors, config), model.state_dict())
    assert_rel(ad.delta("sq.weight"), s * factors["sq"][1].double() @ factors["sq"][0].double(), 1e-6)


def test_low_precision_file_bin_file_and_passed_settings(model, tmp_path):
    factors = {k: (a.bfloat16(), b.bfloat16()) for k, (a, b) in _factors(4).items()}
    ad = read_lora(_write(tmp_path / "bf16", factors, CONFIG), model)
    u, v = ad.factors["fc1.weight"]
    assert u.dtype == v.dtype == torch.float32 and torch.equal(v, factors["fc1"][0].float())
    # a lone .bin file with no adapter_config.json: alpha passed in, r taken from the factors' shapes
    folder = _write(tmp_path / "bin", _factors(4), None, file="adapter_model.bin")
    ad = read_lora(folder / "adapter_model.bin", model, lora_alpha=8)
    expected = _expected(model, _factors(4), {"conv": 4.0, "fc1": 2.0, "proj": 2.0})
    for name, ref in expected.items():
        assert_rel(ad.delta(name), ref, 1e-6, f"τ of {name}")
    with pytest.raises(ValueError, match="lora_alpha"):
        read_lora(folder, model)
    with pytest.raises(ValueError, match="lora_alpha=8 there, but lora_alpha=16"):
        read_lora(_write(tmp_path / "cfg", _factors(4), CONFIG), model, lora_alpha=16)


def _composed_against_reference(model, bank, dense, granularity="block", partitions=1):
    """A copy of `model` composed with `bank` (strict=False) at random coefficients: output and coefficient gradient
    against the float64 reference of the dense task vectors `dense`. Returns the AtlasModel."""
    atlas = atlas_fast.compose(copy.deepcopy(model), bank, granularity, partitions, backend="torch", seed=3,
                               strict=False)
    with torch.no_grad():
        atlas.coefficients.uniform_(-0.8, 0.8)
    x = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(8))
    y = atlas(x)
    weight = torch.randn_like(y)
    (y * weight).sum().backward()
    c64 = atlas.coefficients.detach().double().requires_grad_()
    ref = reference_call(model, merged_reference(model, dense, c64, granularity, partitions, seed=3), x)
    assert_rel(y, ref, 1e-5, "output")
    assert_coef_grad(atlas.coefficients.grad, torch.autograd.grad((ref * weight.double()).sum(), c64)[0],
                     atlas.block_names, 1e-4, granularity, partitions)
    return atlas


@pytest.mark.parametrize("granularity,partitions", [("block", 1), ("block", 3), ("task", 1)])
def test_compose_with_two_adapters_against_float64_reference(model, tmp_path, granularity, partitions):
    a1 = _write(tmp_path / "a1", _factors(5), CONFIG, {f"{P}head.{k}": v for k, v in _head(model, 6).items()})
    a2 = _write(tmp_path / "a2", {k: v for k, v in _factors(7).items() if k != "conv"}, {"r": 4, "lora_alpha": 4})
    bank = lora_task_vectors(model, [a1, a2])
    assert bank.names == ["conv.weight", "fc1.weight", "proj.weight", "head.weight", "head.bias"]
    assert bank.sources == [str(a1), str(a2)]
    assert torch.count_nonzero(bank["conv.weight"][1]) == 0, "an adapter that leaves conv alone has τ = 0 there"
    atlas = _composed_against_reference(model, bank, bank, granularity, partitions)
    assert set(atlas.report.missing_from_bank) == {"conv.bias", "norm.weight", "norm.bias", "fc1.bias", "proj.bias"}


def test_errors_name_the_file_and_entry(model, tmp_path):
    f = _factors(9)
    cases = [
        ({**f, "fc1": (f["fc1"][0][:3], f["fc1"][1][:, :3])}, {}, r"rank mismatch in 'fc1'.*lora_A.*r=4"),
        ({**f, "fc1": (f["fc1"][0], f["fc1"][1][:, :3])}, {}, r"rank mismatch in 'fc1'.*lora_B"),
        ({**f, "fc9": f["fc1"]}, {}, r"fc9\.lora_A\.weight.*'fc9\.weight'.*lacks"),
        ({**f, "fc1": (f["fc1"][0], torch.randn(36, 4))}, {}, r"does not fit.*'fc1\.weight'"),
        (f, {f"{P}head.weight": torch.randn(7, 22)}, r"head\.weight.*shape \(7, 22\)"),
        (f, {f"{P}nothing.weight": torch.randn(3)}, r"'nothing\.weight', which the base model lacks"),
        (f, {f"{P}fc1.lora_magnitude_vector": torch.randn(37)}, "DoRA"),
        (f, {f"{P}fc1.lora_E.weight": torch.randn(4, 1)}, "lora_E"),
        (f, {f"{P}fc1.lora_A.other.weight": f["fc1"][0]}, "several adapters"),
    ]
    for i, (factors, extra, msg) in enumerate(cases):
        folder = _write(tmp_path / str(i), factors, CONFIG, extra)
        with pytest.raises(ValueError, match=msg) as e:
            read_lora(folder, model)
        assert "adapter_model.safetensors" in str(e.value), str(e.value)
    lone = _write(tmp_path / "lone", {}, CONFIG, {f"{P}fc1.lora_A.weight": f["fc1"][0]})
    with pytest.raises(ValueError, match="no lora_B partner"):
        read_lora(lone, model)
    with pytest.raises(ValueError, match="DoRA"):
        read_lora(_write(tmp_path / "dora", f, {**CONFIG, "use_dora": True}), model)


def test_embedding_factors_and_peft_name_variants(tmp_path):
    """An nn.Embedding's lora_embedding_{A,B} (τ = scaling·(B A)ᵀ); in-memory names with the adapter name;
    a wrapped layer's own bias saved as <module>.base_layer.bias (bias="all"); modules_to_save in both forms,
    and peft's unchanged original_module copy, which is no change."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(11, 6), "lin": nn.Linear(6, 9), "head": nn.Linear(9, 4)})
    g = torch.Generator().manual_seed(5)
    a_emb, b_emb = torch.randn(3, 11, generator=g), torch.randn(6, 3, generator=g)
    a_lin, b_lin = torch.randn(3, 6, generator=g), torch.randn(9, 3, generator=g)
    lin_bias, head_w = torch.randn(9, generator=g), torch.randn(4, 9, generator=g)
    tensors = {f"{P}emb.lora_embedding_A.default": a_emb, f"{P}emb.lora_embedding_B.default": b_emb,
               f"{P}lin.lora_A.default.weight": a_lin, f"{P}lin.lora_B.default.weight": b_lin,
               f"{P}lin.base_layer.bias": lin_bias, f"{P}head.modules_to_save.default.weight": head_w,
               f"{P}head.weight": head_w, f"{P}head.original_module.weight": model.head.weight.detach()}
    folder = tmp_path / "ad"
    folder.mkdir()
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 3, "lora_alpha": 6, "bias": "all"}))
    ad = read_lora(folder, model)
    assert sorted(ad.names) == ["emb.weight", "head.weight", "lin.bias", "lin.weight"]
    assert_rel(ad.delta("emb.weight"), 2 * (b_emb.double() @ a_emb.double()).t(), 1e-6, "embedding τ")
    assert_rel(ad.delta("lin.weight"), 2 * b_lin.double() @ a_lin.double(), 1e-6, "linear τ")
    assert_rel(ad.delta("lin.bias"), lin_bias.double() - model.lin.bias.detach().double(), 1e-6, "bias τ")
    assert_rel(ad.delta("head.weight"), head_w.double() - model.head.weight.detach().double(), 1e-6, "head τ")


def test_low_rank_bank_keeps_the_factors(model, tmp_path):
    """low_rank=True: the adapters' factors as LowRankBlocks (ranks 2 and 4 padded to 4, zero for an adapter that
    leaves conv alone), the whole-stored head dense; composed against the float64 reference of τ computed here."""
    f1, f2 = _factors(5), {k: v for k, v in _factors(7).items() if k != "conv"}
    head = _head(model, 6)
    a1 = _write(tmp_path / "a1", f1, CONFIG, {f"{P}head.{k}": v for k, v in head.items()})
    a2 = _write(tmp_path / "a2", f2, {"r": 4, "lora_alpha": 4})
    bank = lora_task_vectors(model, [a1, a2], low_rank=True)
    assert bank.format == "lowrank" and bank.lowrank_energy == {n: 1.0 for n in ("conv.weight", "fc1.weight",
                                                                                  "proj.weight")}
    assert [bank[n].rank for n in ("conv.weight", "fc1.weight", "proj.weight")] == [2, 4, 4]
    assert isinstance(bank["head.weight"], torch.Tensor)
    e1 = _expected(model, f1, {"conv": 4.0, "fc1": 0.75, "proj": 2.0}, {f"head.{k}": v for k, v in head.items()})
    e2 = _expected(model, f2, {"fc1": 1.0, "proj": 1.0})
    dense = {n: torch.stack([e1[n], e2.get(n, torch.zeros_like(e1[n]))]) for n in bank.names}
    for n in ("conv.weight", "fc1.weight", "proj.weight"):
        assert_rel(bank[n].dense(torch.float64), dense[n], 1e-6, f"factors of {n}")
    _composed_against_reference(model, bank, dense)
