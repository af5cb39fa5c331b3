"""Heads: the zero-shot head against CLIP's own scoring of prompts, its cache, and the linear probe."""
import pytest
import torch
import torch.nn.functional as F

import adapt_world
from atlas_fast.adapt import heads as heads_mod
from atlas_fast.adapt.heads import LinearHead, ZeroShotHead, fit_linear_probe, read_templates, zero_shot_head
from atlas_fast.adapt.models import load_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    torch.manual_seed(0)
    model, _, tok = load_clip(adapt_world.write_config(str(tmp_path_factory.mktemp("cfg"))))
    return model, tok


def test_zero_shot_head_is_the_normalised_mean_of_prompt_embeddings(clip):
    model, tok = clip
    names, templates = ["cat", "dog", "tree"], ["a photo of a {}.", "a drawing of a {}."]
    head = zero_shot_head(model, tok, names, templates, progress=False)
    with torch.no_grad():
        for c, name in enumerate(names):   # one prompt at a time, as CLIP scores text
            e = torch.stack([F.normalize(model.encode_text(tok([t.format(name)]))[0], dim=0) for t in templates])
            want = F.normalize(e.mean(0), dim=0)
            torch.testing.assert_close(head.weight[c], want, rtol=1e-5, atol=1e-6)
        images = torch.randn(4, 3, 16, 16)
        feats = model.encode_image(images)
        want = model.logit_scale.exp() * F.normalize(feats, dim=-1) @ head.weight.t()
        torch.testing.assert_close(head(feats), want, rtol=1e-5, atol=1e-5)


def test_zero_shot_head_cache_is_keyed_by_templates_and_classes(clip, tmp_path, monkeypatch):
    model, tok = clip
    first = zero_shot_head(model, tok, ["cat", "dog"], ["a {}."], cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("head-*.pt"))) == 1

    def no_text_pass(*args, **kwargs):
        raise AssertionError("the text tower ran although the head was cached")
    monkeypatch.setattr(heads_mod, "text_embeddings", no_text_pass)
    cached = zero_shot_head(model, tok, ["cat", "dog"], ["a {}."], cache_dir=tmp_path, progress=False)
    assert torch.equal(cached.weight, first.weight)
    with pytest.raises(AssertionError, match="text tower ran"):
        zero_shot_head(model, tok, ["cat", "dog"], ["the {}."], cache_dir=tmp_path, progress=False)
    with pytest.raises(AssertionError, match="text tower ran"):
        zero_shot_head(model, tok, ["dog", "cat"], ["a {}."], cache_dir=tmp_path, progress=False)


def test_templates_need_one_placeholder(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a photo of a {}.\nno placeholder\n")
    with pytest.raises(ValueError, match=r"t.txt: template 'no placeholder' needs exactly one"):
        read_templates(path)


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    labels = torch.arange(4).repeat_interleave(25)
    feats = centres[labels] + torch.randn(100, 16, generator=g) * 0.3
    head = fit_linear_probe(feats, labels, 4)
    assert isinstance(head, LinearHead)
    assert (head(feats).argmax(1) == labels).float().mean().item() == 1.0
    test_labels = torch.arange(4).repeat_interleave(10)
    test = centres[test_labels] + torch.randn(40, 16, generator=g) * 0.3
    assert (head(test).argmax(1) == test_labels).float().mean().item() >= 0.95


def test_zero_shot_head_scores_cosine_similarity():
    w = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    head = ZeroShotHead(w, 10.0)
    out = head(torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(out, torch.tensor([[6.0, 8.0]]))
