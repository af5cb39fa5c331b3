"""LoRA adapters written by peft itself: read_lora / lora_task_vectors against peft's own merge_and_unload()
minus the base, in float64; adapters whose initialisation rewrites the base weights are refused unless saved
converted."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from atlas_fast.io.lora import lora_task_vectors, read_lora

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc1 = nn.Linear(6, 13)
        self.fc2 = nn.Linear(13, 5)

    def forward(self, x, ids):
        h = self.conv(x).mean((2, 3)) + self.emb(ids)
        return self.fc2(torch.tanh(self.fc1(h)))


def _base(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def _trained(peft_model, seed):
    """Stand-in for training: every LoRA factor moved by seeded noise (so that B A is far from its init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return peft_model


def _peft_adapter(base, folder, seed=1, safe=True, **config):
    """(folder, τ of merge_and_unload() − base in float64) for an adapter peft makes on a copy of `base`."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["emb", "conv", "fc1", "fc2"], **config}
    model = _trained(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config)), seed)
    model.save_pretrained(folder, safe_serialization=safe)
    merged = model.merge_and_unload().state_dict()
    return folder, _deltas(base, merged)


def _deltas(base, merged):
    return {k: merged[k].double() - v.double() for k, v in base.state_dict().items()
            if not torch.equal(merged[k], v)}


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("config", [
    {},
    {"init_lora_weights": False, "lora_bias": True, "target_modules": ["conv", "fc1", "fc2"]},
    {"use_rslora": True, "rank_pattern": {"fc1": 2}, "alpha_pattern": {"fc2": 3}},
    {"init_lora_weights": "gaussian", "safe": False},
], ids=["default", "lora_bias", "rslora_patterns", "gaussian_bin"])
def test_read_lora_is_peft_merge_minus_base(tmp_path, config):
    base = _base()
    config = dict(config)
    folder, ref = _peft_adapter(base, tmp_path / "adapter", safe=config.pop("safe", True), **config)
    adapter = read_lora(folder, base)
    assert set(adapter.names) == set(ref), "every tensor peft's merge changes, and no other"
    for name, tau in ref.items():
        assert _rel(adapter.delta(name), tau) < 1e-6, name


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    """GPT-2's Conv1D stores its weight (in, out): peft transposes B A there (fan_in_fan_out)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    base = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50,
                                                          n_positions=8)).eval()
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=6, fan_in_fan_out=True,
                                                                     target_modules=["c_attn", "c_proj"]))
    _trained(model, 3).save_pretrained(tmp_path / "gpt2")
    ref = _deltas(base, model.merge_and_unload().state_dict())
    adapter = read_lora(tmp_path / "gpt2", base)
    assert set(adapter.names) == set(ref) and ref
    for name, tau in ref.items():
        assert _rel(adapter.delta(name), tau) < 1e-6, name


def test_bank_of_two_peft_adapters(tmp_path):
    base = _base()
    refs, folders = [], []
    for t, targets in enumerate((["conv", "fc1"], ["fc1", "fc2", "emb"])):
        folder, ref = _peft_adapter(base, tmp_path / f"a{t}", seed=10 + t, target_modules=targets)
        folders.append(folder)
        refs.append(ref)
    for low_rank in (False, True):
        bank = lora_task_vectors(base, folders, low_rank=low_rank)
        assert set(bank.names) == set(refs[0]) | set(refs[1])
        for name in bank.names:
            dense = bank[name].dense() if hasattr(bank[name], "dense") else bank[name]
            for t, ref in enumerate(refs):
                if name in ref:
                    assert _rel(dense[t], ref[name]) < 1e-6, (name, t, low_rank)
                else:
                    assert torch.count_nonzero(dense[t]) == 0, (name, t, low_rank)


@pytest.mark.parametrize("init", ["orthogonal", "mica"])
def test_inits_that_keep_the_base_are_read(tmp_path, init):
    base = _base()
    folder, ref = _peft_adapter(base, tmp_path / init, init_lora_weights=init, target_modules=["fc1", "fc2"])
    adapter = read_lora(folder, base)
    for name, tau in ref.items():
        assert _rel(adapter.delta(name), tau) < 1e-6, name


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_inits_that_rewrite_the_base_are_refused_unless_converted(tmp_path, init):
    """PiSSA / OLoRA replace W by a residual: τ against the original base needs the initial factors, which
    peft's converted save folds in (a LoRA of rank 2r)."""
    original = _base()
    model = peft.get_peft_model(copy.deepcopy(original), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                                                         target_modules=["fc1", "fc2"]))
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "initial")
    model.peft_config["default"].init_lora_weights = init
    _trained(model, 5)
    model.save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ref = _deltas(original, model.merge_and_unload().state_dict())

    with pytest.raises(ValueError, match=rf"plain/adapter_model.safetensors: init_lora_weights='{init}'.*converted"):
        read_lora(tmp_path / "plain", original)
    adapter = read_lora(tmp_path / "converted", original)
    assert json.loads((tmp_path / "converted" / "adapter_config.json").read_text())["r"] == 8
    assert set(adapter.names) == set(ref)
    for name, tau in ref.items():
        assert _rel(adapter.delta(name), tau) < 1e-6, name


@pytest.mark.parametrize("init", ["corda", "loftq", "lora_ga", "pissa_niter_4", "eva"])
def test_other_base_changing_or_unchecked_inits_are_refused(tmp_path, init):
    base = _base()
    folder, _ = _peft_adapter(base, tmp_path / "a", target_modules=["fc1"])
    config = json.loads((folder / "adapter_config.json").read_text())
    config["init_lora_weights"] = init
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors: init_lora_weights='{init}'"):
        read_lora(folder, base)
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}'"):
        lora_task_vectors(base, [folder])
