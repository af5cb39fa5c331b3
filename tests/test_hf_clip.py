"""Hugging Face CLIP vision models: compose() on transformers' own classes against the float64 reference, and
the conversion to open_clip's VisionTransformer (equal outputs, task vectors, a composed open_clip model)."""
import copy
import subprocess
import sys

import pytest
import torch

import atlas_fast
from atlas_fast.io import hf_clip as convert
from helpers import assert_rel, merged_reference, reference_call

transformers = pytest.importorskip("transformers")
T = 3


def _config(**kw):
    base = dict(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8, projection_dim=20)
    return transformers.CLIPVisionConfig(**{**base, **kw})


@torch.no_grad()
def _randomize(model, seed):
    """Every parameter random and non-zero (transformers initialises LayerNorms to 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _hf(cls="CLIPVisionModelWithProjection", seed=0, **kw):
    torch.manual_seed(seed)
    return _randomize(getattr(transformers, cls)(_config(**kw)), seed).eval()


def _clip_model(seed=3):
    """A tiny full CLIPModel (text side included), every parameter random."""
    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
                max_position_embeddings=8, bos_token_id=0, eos_token_id=1)
    cfg = transformers.CLIPConfig(vision_config=_config().to_dict(), text_config=text, projection_dim=20)
    return _randomize(transformers.CLIPModel(cfg), seed).eval()


def _image_features(clip, images):
    out = clip.get_image_features(pixel_values=images)
    return out.pooler_output if hasattr(out, "pooler_output") else out     # a model output from transformers 5


def _hf_out(model, x):
    out = model(pixel_values=x)
    return out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------- compose() on transformers' classes

@pytest.mark.parametrize("cls,partitions", [("CLIPVisionModelWithProjection", 1), ("CLIPVisionModel", 3)])
def test_compose_transformers_model_against_float64_reference(cls, partitions, images):
    model = _hf(cls)
    bank = atlas_fast.synthetic_task_vectors(model, T, rel_scale=1e-2, seed=2)
    atlas = atlas_fast.compose(copy.deepcopy(model), bank, partitions=partitions, backend="torch", seed=4)
    # Linear layers (q/k/v/out_proj, fc1/fc2, visual_projection) and the patch Conv2d run fused.
    assert type(atlas.model.get_submodule("embeddings.patch_embedding" if cls == "CLIPVisionModel" else
                                          "vision_model.encoder.layers.1.self_attn.q_proj")).__name__ in (
        "AtlasConv2d", "AtlasLinear")
    assert len(atlas.report.fused) > len(atlas.report.generic) > 0
    with torch.no_grad():
        atlas.coefficients.uniform_(-0.8, 0.8)
    y = _hf_out(atlas, images)
    weight = torch.randn_like(y)
    (y * weight).sum().backward()

    c64 = atlas.coefficients.detach().double().requires_grad_()
    ref = _hf_out_ref(model, merged_reference(model, bank, c64, partitions=partitions, seed=4), images)
    grad_ref = torch.autograd.grad((ref * weight.double()).sum(), c64)[0]
    assert_rel(y, ref, 1e-5, "output")
    assert_rel(atlas.coefficients.grad, grad_ref, 1e-4, "coefficient gradient")
    for b, name in enumerate(atlas.block_names):
        if name.endswith("k_proj.bias"):
            # softmax is blind to a shift of every key by one vector: this gradient is exactly zero
            assert atlas.coefficients.grad[:, b].norm() < 1e-6 * grad_ref.norm(), name
        else:
            assert_rel(atlas.coefficients.grad[:, b], grad_ref[:, b], 1e-4, f"coefficient gradient of {name}")
    plain = atlas.merge()
    assert type(plain) is type(model)
    with torch.no_grad():
        assert_rel(_hf_out(plain, images), ref, 1e-5, "merged transformers model")


def _hf_out_ref(model, merged, images):
    out = reference_call(model, merged, pixel_values=images)
    return out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output


# ------------------------------------------------------------- conversion to open_clip

@pytest.mark.parametrize("cls", ["CLIPVisionModelWithProjection", "CLIPVisionModel"])
def test_converted_open_clip_model_gives_the_same_outputs(cls, images, tmp_path):
    hf = _hf(cls)
    hf.save_pretrained(tmp_path / "m")
    visual = convert.load_hf_clip_vision(tmp_path / "m")
    assert type(visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert (visual.proj is None) == (cls == "CLIPVisionModel")
    with torch.no_grad():
        assert_rel(visual(images), _hf_out(hf, images), 1e-5, "open_clip output vs transformers output")


def test_activation_matters(images, tmp_path):
    """The check above can tell QuickGELU from GELU: built with GELU the outputs differ far beyond 1e-5."""
    hf = _hf()
    sd = convert.hf_clip_vision_state_dict(hf.state_dict())
    visual = convert.open_clip_vision_model(sd, heads=4, hidden_act="gelu")
    visual.load_state_dict(sd)
    with torch.no_grad():
        from helpers import rel_err
        assert rel_err(visual(images), _hf_out(hf, images)) > 1e-3


def test_names_and_layout():
    hf = _hf()
    sd = hf.state_dict()
    out = convert.hf_clip_vision_state_dict(sd)
    visual = convert.open_clip_vision_model(out, heads=4)
    assert list(out) == [n for n, _ in visual.named_parameters()]
    p = "vision_model.encoder.layers.1.self_attn."
    for param in ("weight", "bias"):
        stacked = out[f"transformer.resblocks.1.attn.in_proj_{param}"]
        for i, c in enumerate("qkv"):
            assert torch.equal(stacked[48 * i:48 * (i + 1)], sd[f"{p}{c}_proj.{param}"])
    assert torch.equal(out["proj"], sd["visual_projection.weight"].t())
    assert torch.equal(out["positional_embedding"], sd["vision_model.embeddings.position_embedding.weight"])
    assert out["transformer.resblocks.0.mlp.c_fc.weight"] is sd["vision_model.encoder.layers.0.mlp.fc1.weight"]
    half = convert.hf_clip_vision_state_dict({k: v.to(torch.bfloat16) for k, v in sd.items()})
    assert {v.dtype for v in half.values()} == {torch.bfloat16}
    assert "proj" not in convert.hf_clip_vision_state_dict(sd, projection=False)


@pytest.mark.parametrize("name,config", [
    ("ViT-B-32-quickgelu", {}),
    ("ViT-L-14-quickgelu", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, patch_size=14, projection_dim=768))])
def test_names_and_shapes_match_open_clip_configs(name, config):
    """Full-size models on the meta device (no memory): the converted transformers checkpoint has exactly the
    names and shapes of open_clip's own quick_gelu model, in its parameter order."""
    import open_clip
    with torch.device("meta"):
        hf = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**{"projection_dim": 512,
                                                                                          **config}))
        visual = open_clip.create_model(name, pretrained=None, device="meta").visual
    sd = convert.hf_clip_vision_state_dict(hf.state_dict())
    assert list(sd) == [n for n, _ in visual.named_parameters()]
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in visual.state_dict().items()}
    assert type(visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_clip_model_and_sharded_checkpoints(images, tmp_path):
    """A full CLIPModel: its text side is skipped, its visual_projection becomes proj; sharded files read."""
    clip = _clip_model()
    clip.save_pretrained(tmp_path / "clip", max_shard_size="20KB")
    assert (tmp_path / "clip" / "model.safetensors.index.json").is_file()
    visual = convert.load_hf_clip_vision(tmp_path / "clip")
    with torch.no_grad():
        assert_rel(visual(images), _image_features(clip, images), 1e-5, "open_clip output vs CLIPModel image features")


def test_errors(tmp_path):
    sd = _hf().state_dict()
    with pytest.raises(ValueError, match="classifier.weight"):
        convert.hf_clip_vision_state_dict({**sd, "classifier.weight": torch.ones(2, 48)})
    with pytest.raises(ValueError, match=r"k_proj\.bias"):
        convert.hf_clip_vision_state_dict({k: v for k, v in sd.items() if "layers.1.self_attn.k_proj.bias" not in k})
    with pytest.raises(ValueError, match="mlp.c_fc.weight"):
        convert.hf_clip_vision_state_dict({k: v for k, v in sd.items() if "layers.0.mlp.fc1.weight" not in k})
    with pytest.raises(ValueError, match="patch_embedding"):
        convert.hf_clip_vision_state_dict({"a.weight": torch.ones(2)})
    vision_only = _hf("CLIPVisionModel").state_dict()
    with pytest.raises(ValueError, match="projection=False"):
        convert.hf_clip_vision_state_dict(vision_only, projection=True)
    with pytest.raises(ValueError, match="hidden_act"):
        convert.open_clip_vision_model(convert.hf_clip_vision_state_dict(sd), heads=4, hidden_act="relu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="model.safetensors"):
        convert.read_hf_checkpoint(tmp_path / "empty")


def test_transformers_is_optional(monkeypatch, tmp_path):
    code = "import sys, atlas_fast; assert 'transformers' not in sys.modules, 'atlas_fast imported transformers'"
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setitem(sys.modules, "transformers", None)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ImportError, match=r"pip install atlas_fast\[hf\]"):
        convert.hf_clip_vision_config(tmp_path)


# ------------------------------------------------------------- a bank of converted checkpoints

@torch.no_grad()
def _finetuned(model, seed):
    """A 'fine-tuned' copy: every parameter moved by about 1e-2 of its RMS."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    for p in out.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 1e-2 * p.pow(2).mean().sqrt())
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A pretrained model and two fine-tuned ones saved as transformers does (folders), one also as a .bin."""
    root = tmp_path_factory.mktemp("hf")
    pre = _hf()
    tuned = [_finetuned(pre, 10), _finetuned(pre, 11)]
    pre.save_pretrained(root / "pre")
    tuned[0].save_pretrained(root / "a")
    torch.save(tuned[1].state_dict(), root / "b.bin")
    return pre, tuned, [root / "pre", root / "a", root / "b.bin"]


def test_bank_from_converted_checkpoints(checkpoints):
    pre, tuned, paths = checkpoints
    bank = convert.hf_clip_task_vectors(paths[0], paths[1:])
    assert bank.sources == [str(p) for p in paths[1:]]
    p0 = pre.state_dict()
    for t, m in enumerate(tuned):
        sd = m.state_dict()
        layer = "vision_model.encoder.layers.0.self_attn."
        expected = torch.cat([sd[f"{layer}{c}_proj.weight"] - p0[f"{layer}{c}_proj.weight"] for c in "qkv"])
        assert_rel(bank["transformer.resblocks.0.attn.in_proj_weight"][t], expected, 1e-6, "in_proj τ")
        assert_rel(bank["proj"][t], (sd["visual_projection.weight"] - p0["visual_projection.weight"]).t(), 1e-6)


@pytest.mark.parametrize("granularity", ["block", "task"])
def test_composed_open_clip_model_from_hf_bank(checkpoints, images, granularity):
    pre, tuned, paths = checkpoints
    bank = convert.hf_clip_task_vectors(paths[0], paths[1:])
    visual = convert.load_hf_clip_vision(paths[0])
    atlas = atlas_fast.compose(copy.deepcopy(visual), bank, granularity, backend="torch")
    with torch.no_grad():
        atlas.coefficients.uniform_(-0.8, 0.8)
    y = atlas(images)
    weight = torch.randn_like(y)
    (y * weight).sum().backward()
    c64 = atlas.coefficients.detach().double().requires_grad_()
    ref = reference_call(visual, merged_reference(visual, bank, c64, granularity), images)
    assert_rel(y, ref, 1e-5, "output")
    assert_rel(atlas.coefficients.grad, torch.autograd.grad((ref * weight.double()).sum(), c64)[0], 1e-4,
               "coefficient gradient")
    if granularity == "task":
        # One coefficient per task vector means the same model in either naming: the transformers model
        # composed with its own task vectors gives the same outputs.
        hf_bank = atlas_fast.TaskVectors.from_models(pre, tuned)
        hf_atlas = atlas_fast.compose(copy.deepcopy(pre), hf_bank, "task", backend="torch")
        with torch.no_grad():
            hf_atlas.coefficients.copy_(atlas.coefficients)
            assert_rel(y.detach(), _hf_out(hf_atlas, images), 1e-5, "open_clip vs transformers, composed")


def test_model_pool_of_a_clip_model_and_vision_only_checkpoints(images, tmp_path):
    """The layout of the public CLIP model pools: the pretrained model is a full CLIPModel, the fine-tuned ones
    are CLIPVisionModels saved with their "vision_model." names and no projection."""
    from safetensors.torch import load_file, save_file
    clip = _clip_model()
    clip.save_pretrained(tmp_path / "pre")
    vision = {k: v for k, v in clip.state_dict().items() if k.startswith("vision_model.")}
    paths = []
    for t in range(2):
        g = torch.Generator().manual_seed(20 + t)
        tuned = {k: v + torch.randn(v.shape, generator=g) * 1e-3 for k, v in vision.items()}
        paths.append(tmp_path / f"task{t}.safetensors")
        save_file(tuned, paths[-1])
    with pytest.raises(ValueError, match="projection=False"):
        convert.hf_clip_task_vectors(tmp_path / "pre", paths)
    bank = convert.hf_clip_task_vectors(tmp_path / "pre", paths, projection=False)
    assert "proj" not in bank
    visual = convert.load_hf_clip_vision(tmp_path / "pre")
    atlas = atlas_fast.compose(visual, bank, strict=False, backend="torch")
    assert atlas.report.missing_from_bank == ["proj"]
    with torch.no_grad():
        atlas.coefficients.fill_(1.0)
        tuned = [load_file(p) for p in paths]
        merged = copy.deepcopy(clip)
        merged.load_state_dict({**clip.state_dict(), **{k: v + sum(sd[k] - v for sd in tuned)
                                                        for k, v in vision.items()}})
        assert_rel(atlas(images), _image_features(merged, images), 1e-5,
                   "composed with all coefficients 1 vs the summed CLIPModel")
