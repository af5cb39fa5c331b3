"""Hugging Face CLIP vision folders written by transformers itself (safetensors, sharded) as the θ0 of every
command, and the merged model written back as a folder that CLIPVisionModel.from_pretrained loads, against a
float64 reference of θ0 + Σ c τ built from the folders' own tensors."""
import copy
import json

import pytest
import torch

import adapt_world
from atlas_fast.cli import main

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=16,
              patch_size=4, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def _hf_state(folder):
    model = transformers.CLIPVisionModel.from_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def hf(world, tmp_path_factory):
    """θ0 (saved sharded) and two fine-tuned CLIPVisionModels (θ0 + seeded noise), saved by transformers; the
    commands bank, adapt, eval and merge run on them with θ0 given only as the folder (no --model)."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    base = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CONFIG)).eval()
    with torch.no_grad():       # no zero biases or unit LayerNorm scales, as in a trained tower
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    base.save_pretrained(root / "theta0", max_shard_size="40KB")
    assert (root / "theta0" / "model.safetensors.index.json").is_file(), "θ0 is saved in shards"
    for t in range(2):
        tuned = copy.deepcopy(base)
        g = torch.Generator().manual_seed(10 + t)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.abs().mean())
        tuned.save_pretrained(root / f"ft{t}")
    w, theta0 = world, str(root / "theta0")
    bank, run = str(root / "bank.safetensors"), root / "run"
    coef = str(run / "coefficients.safetensors")
    assert main(["bank", "--pretrained", theta0, "--finetuned", str(root / "ft0"), str(root / "ft1"),
                 "--out", bank]) == 0
    assert main(["adapt", "--pretrained", theta0, "--bank", bank, "--data", w["upright"], "--head", "linear",
                 "--granularity", "task", "--select", "last", "--shots", "5", "--epochs", "1", "--steps-per-epoch",
                 "3", "--batch-size", "20", "--lr", "0.3", "--workers", "0", "--out", str(run), "--no-progress"]) == 0
    assert main(["eval", "--pretrained", theta0, "--data", w["upright"], "--heads", str(run / "heads.pt"),
                 "--bank", bank, "--coefficients", coef, "--json", str(root / "rows.json")]) == 0
    assert main(["merge", "--pretrained", theta0, "--bank", bank, "--coefficients", coef,
                 "--out", str(root / "merged")]) == 0
    assert main(["eval", "--pretrained", str(root / "merged"), "--data", w["upright"], "--heads",
                 str(run / "heads.pt"), "--json", str(root / "rows_merged.json")]) == 0
    return root


def test_bank_of_hf_folders_is_in_open_clip_names(hf):
    from safetensors.torch import load_file
    bank = load_file(str(hf / "bank.safetensors"))
    base, fts = _hf_state(hf / "theta0"), [_hf_state(hf / f"ft{t}") for t in range(2)]
    # transformers 4 names the tower's entries vision_model.*, transformers 5 without the prefix
    top = "vision_model." if "vision_model.embeddings.patch_embedding.weight" in base else ""
    layer = f"{top}encoder.layers.1."
    expected = {
        "conv1.weight": lambda s: s[f"{top}embeddings.patch_embedding.weight"],
        "positional_embedding": lambda s: s[f"{top}embeddings.position_embedding.weight"],
        "transformer.resblocks.1.attn.in_proj_weight":
            lambda s: torch.cat([s[f"{layer}self_attn.{c}_proj.weight"] for c in "qkv"]),
        "transformer.resblocks.1.attn.in_proj_bias":
            lambda s: torch.cat([s[f"{layer}self_attn.{c}_proj.bias"] for c in "qkv"]),
        "transformer.resblocks.1.mlp.c_fc.weight": lambda s: s[f"{layer}mlp.fc1.weight"],
        "ln_post.bias": lambda s: s[f"{top}post_layernorm.bias"],
    }
    # every tensor of the tower, q, k and v of each layer stacked into one
    assert "proj" not in bank and len(bank) == len(base) - 2 * 2 * CONFIG["num_hidden_layers"]
    for name, get in expected.items():
        assert torch.equal(bank[name], torch.stack([get(ft) - get(base) for ft in fts])), name


def _reference(hf):
    """θ0 + Σ_t c_t τ_t over every tensor of the HF folders, float64 (task-wise coefficients)."""
    from safetensors import safe_open
    with safe_open(str(hf / "run" / "coefficients.safetensors"), framework="pt") as f:
        c = f.get_tensor("coefficients").double().reshape(2, -1)
    assert c.shape[1] == 1 and c.abs().min() > 0
    base, fts = _hf_state(hf / "theta0"), [_hf_state(hf / f"ft{t}") for t in range(2)]
    return {k: v.double() + sum(c[t, 0] * (ft[k].double() - v.double()) for t, ft in enumerate(fts))
            for k, v in base.items()}


def test_merge_writes_a_folder_transformers_loads_as_theta0_plus_c_tau(hf):
    ref_state = _reference(hf)
    merged = transformers.CLIPVisionModel.from_pretrained(hf / "merged").eval()
    assert json.loads((hf / "merged" / "config.json").read_text())["hidden_act"] == "quick_gelu"
    state = merged.state_dict()
    assert set(state) == set(ref_state)
    for k, want in ref_state.items():
        assert state[k].dtype == torch.float32
        assert ((state[k].double() - want).norm() / want.norm()).item() < 1e-6, k
    ref_model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CONFIG)).double().eval()
    ref_model.load_state_dict(ref_state)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out, want = merged(pixel_values=x).pooler_output, ref_model(pixel_values=x.double()).pooler_output
    assert ((out.double() - want).norm() / want.norm()).item() < 1e-5


def test_merged_folder_evaluates_as_the_composed_model(hf):
    rows = {r["model"]: r["accuracy"] for r in json.loads((hf / "rows.json").read_text())}
    coef = str(hf / "run" / "coefficients.safetensors")
    summary = json.loads((hf / "run" / "summary.json").read_text())
    assert rows[coef] == pytest.approx(summary["selected"][0]["accuracy"], abs=1e-9)
    assert json.loads((hf / "rows_merged.json").read_text())[0]["accuracy"] == pytest.approx(rows[coef], abs=1e-9)


def test_hf_theta0_errors(hf, world, tmp_path, capsys):
    def error(*args):
        with pytest.raises(SystemExit):
            main(list(args))
        return capsys.readouterr().err.strip().splitlines()[-1]
    theta0, bank = str(hf / "theta0"), str(hf / "bank.safetensors")
    coef = str(hf / "run" / "coefficients.safetensors")
    line = error("merge", "--pretrained", theta0, "--bank", bank, "--coefficients", coef, "--out",
                 str(tmp_path / "merged.safetensors"))
    assert "merged.safetensors: θ0" in line and "Hugging Face folder" in line and "give a folder path" in line
    line = error("eval", "--pretrained", theta0, "--data", world["upright"])
    assert "theta0 is a Hugging Face CLIP vision tower, with no text tower" in line and "--heads" in line
    line = error("adapt", "--pretrained", theta0, "--bank", bank, "--data", world["upright"], "--workers", "0")
    assert "no text tower" in line and "--head linear" in line
    # --model, if given, must have the folder's shapes: the tiny CLIP's image tower has them, a deeper one not
    assert main(["eval", "--model", world["config"], "--pretrained", theta0, "--data", world["upright"],
                 "--heads", str(hf / "run" / "heads.pt")]) == 0
    deeper = tmp_path / "deeper.json"
    deeper.write_text(json.dumps({**adapt_world.CONFIG, "vision_cfg": {**adapt_world.CONFIG["vision_cfg"],
                                                                        "layers": 3}}))
    line = error("eval", "--model", str(deeper), "--pretrained", theta0, "--data", world["upright"],
                 "--heads", str(hf / "run" / "heads.pt"))
    assert "model=" in line and "differs from the Hugging Face checkpoint" in line and "transformer.resblocks.2" in line
    line = error("eval", "--data", world["upright"])
    assert "--model" in line


@pytest.mark.parametrize("cls", ["CLIPVisionModelWithProjection", "CLIPModel"])
def test_merged_tower_back_into_its_class(tmp_path, cls):
    """A tower read from a CLIPVisionModelWithProjection / CLIPModel folder, changed, and written back: the
    class's from_pretrained loads it, its image features are the open_clip tower's (computed by transformers),
    and a CLIPModel keeps its text side bit for bit. A second write replaces the folder."""
    from atlas_fast.adapt import load_model
    from atlas_fast.io.hf_clip import save_hf_clip_vision
    torch.manual_seed(1)
    vision = transformers.CLIPVisionConfig(**CONFIG)
    if cls == "CLIPModel":
        text = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, vocab_size=99, max_position_embeddings=16)
        config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                         projection_dim=24)
    else:
        config = transformers.CLIPVisionConfig(**CONFIG, projection_dim=24)
    model_cls = getattr(transformers, cls)
    model_cls(config).eval().save_pretrained(tmp_path / "theta0")
    theta0 = {k: v.clone() for k, v in model_cls.from_pretrained(tmp_path / "theta0").state_dict().items()}
    tower = load_model(None, pretrained=str(tmp_path / "theta0"), device="cpu").encoder
    # the weights file alone (config.json beside it) is recognised by its names
    from_file = load_model(None, pretrained=str(tmp_path / "theta0" / "model.safetensors"), device="cpu")
    assert from_file.hf_pretrained is not None
    assert all(torch.equal(v, tower.state_dict()[k]) for k, v in from_file.encoder.state_dict().items())
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    for _ in range(2):
        save_hf_clip_vision(tmp_path / "merged", tower.state_dict(), tmp_path / "theta0")
    merged = model_cls.from_pretrained(tmp_path / "merged").eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = merged.get_image_features(pixel_values=x) if cls == "CLIPModel" else \
            merged(pixel_values=x).image_embeds
        ours = tower(x)
    theirs = getattr(theirs, "pooler_output", theirs)
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5
    for k, v in merged.state_dict().items():
        if k.startswith("text_model.") or k in ("text_projection.weight", "logit_scale"):
            assert torch.equal(v, theta0[k]), k
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="other: a folder with other files and no config.json"):
        save_hf_clip_vision(tmp_path / "other", tower.state_dict(), tmp_path / "theta0")
