"""compose() on an open_clip ViT's visual tower against the naive paper-style baseline: a tiny ViT in the
default run, the full ViT-B-32 (about 11 GB of peak RSS) under the `slow` marker."""
import copy

import open_clip
import pytest
import torch
from open_clip.transformer import VisionTransformer

import atlas_fast
from atlas_fast.bench.naive import NaiveAtlas
from helpers import assert_rel

T = 3
SIZES = {"tiny": 32, "ViT-B-32": 224}


def _build(which):
    torch.manual_seed(0)
    if which == "tiny":
        return VisionTransformer(image_size=32, patch_size=8, width=48, layers=2, heads=4, mlp_ratio=2.0,
                                 output_dim=24).eval()
    return open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()


@pytest.fixture(scope="module", params=["tiny", pytest.param("ViT-B-32", marks=pytest.mark.slow)])
def which(request):
    return request.param


@pytest.fixture(scope="module")
def vit(which):
    return _build(which)


@pytest.fixture(scope="module")
def bank(vit):
    return atlas_fast.synthetic_task_vectors(vit, T, rel_scale=1e-2, seed=2)


@pytest.fixture(scope="module")
def images(which):
    return torch.randn(2, 3, SIZES[which], SIZES[which], generator=torch.Generator().manual_seed(1))


def _pair(vit, granularity, partitions, bank_dtype=torch.float32):
    bank = atlas_fast.synthetic_task_vectors(vit, T, rel_scale=1e-2, dtype=bank_dtype, seed=2)
    atlas = atlas_fast.compose(copy.deepcopy(vit), bank, granularity, partitions, backend="torch", seed=5)
    naive = NaiveAtlas(copy.deepcopy(vit), bank.to(dtype=torch.float32), granularity, partitions, seed=5)
    with torch.no_grad():
        atlas.coefficients.uniform_(-0.8, 0.8)
        naive.coefficients.copy_(atlas.coefficients)
    return atlas, naive


def _out_and_grad(model, images, weight):
    model.coefficients.grad = None
    y = model(images)
    (y * weight).sum().backward()
    return y.detach(), model.coefficients.grad.clone()


@pytest.mark.parametrize("granularity,partitions", [("block", 1), ("task", 1), ("block", 4)])
def test_matches_naive(vit, images, granularity, partitions):
    atlas, naive = _pair(vit, granularity, partitions)
    assert atlas.coefficients.shape == naive.coefficients.shape
    weight = torch.randn(2, vit.output_dim)
    y, g = _out_and_grad(atlas, images, weight)
    y_ref, g_ref = _out_and_grad(naive, images, weight)
    assert_rel(y, y_ref, 1e-5, "output")
    assert_rel(g, g_ref, 1e-4, "coefficient gradient")


def test_bf16_bank_against_naive_on_upcast_bank(vit, images):
    atlas, naive = _pair(vit, "block", 1, torch.bfloat16)
    assert atlas.model.transformer.resblocks[0].mlp.c_fc.tau_weight.dtype == torch.bfloat16
    weight = torch.randn(2, vit.output_dim)
    y, g = _out_and_grad(atlas, images, weight)
    y_ref, g_ref = _out_and_grad(naive, images, weight)
    assert_rel(y, y_ref, 1e-5, "output")
    assert_rel(g, g_ref, 1e-4, "coefficient gradient")


def test_layout_and_sharing(vit, bank):
    model = copy.deepcopy(vit)
    w0 = model.transformer.resblocks[0].mlp.c_fc.weight
    atlas = atlas_fast.compose(model, bank, partitions=3)
    names = [n for n, _ in vit.named_parameters()]
    assert atlas.block_names == names
    assert atlas.coefficients.shape == (T, len(names), 3)
    assert torch.count_nonzero(atlas.coefficients) == 0
    assert [p for p in atlas.parameters() if p.requires_grad] == [atlas.coefficients]
    assert model.transformer.resblocks[0].mlp.c_fc.weight is w0, "θ0 must be shared, not copied"
    assert type(model.transformer.resblocks[0].attn).__name__ == "AtlasMultiheadAttention"
    assert type(model.conv1).__name__ == "AtlasConv2d"


def test_zero_coefficients_run_the_pretrained_model(vit, bank, images):
    with torch.no_grad():
        y0 = vit(images)
        atlas = atlas_fast.compose(copy.deepcopy(vit), bank)
        assert_rel(atlas(images), y0, 1e-6)


def test_merge_gives_the_naive_models_outputs(vit, images):
    atlas, naive = _pair(vit, "block", 4)
    plain = atlas.merge()
    assert type(plain) is type(vit)
    assert not any("Atlas" in type(m).__name__ for m in plain.modules())
    with torch.no_grad():
        assert_rel(plain(images), naive(images), 1e-5)
    # the composed model still runs its composition after merge()
    weight = torch.randn(2, vit.output_dim)
    y, g = _out_and_grad(atlas, images, weight)
    y_ref, g_ref = _out_and_grad(naive, images, weight)
    assert_rel(y, y_ref, 1e-5, "output after merge()")
    assert_rel(g, g_ref, 1e-4, "coefficient gradient after merge()")


def test_strict_and_report(vit, bank):
    partial = atlas_fast.TaskVectors({k: v for k, v in bank.vectors.items() if "ln_post" not in k})
    with pytest.raises(ValueError, match="ln_post"):
        atlas_fast.compose(copy.deepcopy(vit), partial)
    atlas = atlas_fast.compose(copy.deepcopy(vit), partial, strict=False)
    assert set(atlas.report.missing_from_bank) == {"ln_post.weight", "ln_post.bias"}
    assert "ln_post.weight" not in atlas.block_names
    extra = atlas_fast.TaskVectors({**bank.vectors, "nonexistent.weight": torch.zeros(T, 3)})
    with pytest.raises(ValueError, match="nonexistent.weight"):
        atlas_fast.compose(copy.deepcopy(vit), extra)


def test_buffers_are_reported_not_composed():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 5))
    state = {k: torch.randn(2, *v.shape) * 1e-2 for k, v in model.state_dict().items() if v.is_floating_point()}
    with pytest.warns(UserWarning, match="buffers are not composed"):
        atlas = atlas_fast.compose(model, atlas_fast.TaskVectors(state))
    assert set(atlas.report.buffers_not_composed) == {"1.running_mean", "1.running_var"}
    assert "1.running_mean" in str(atlas.report)
    atlas(torch.randn(2, 3, 8, 8)).sum().backward()


def test_coefficients_save_load(vit, bank, tmp_path):
    atlas, _ = _pair(vit, "block", 1)
    path = tmp_path / "coef.safetensors"
    atlas.save_coefficients(path)
    other = atlas_fast.compose(copy.deepcopy(vit), bank, seed=5)
    other.load_coefficients(path)
    assert torch.equal(other.coefficients, atlas.coefficients)
    wrong = atlas_fast.compose(copy.deepcopy(vit), bank, granularity="task")
    with pytest.raises(ValueError, match="granularity"):
        wrong.load_coefficients(path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="coef.safetensors"):
        other.load_coefficients(path)


def test_bad_arguments(vit, bank):
    for kwargs, msg in [({"granularity": "layer"}, "granularity"), ({"partitions": 0}, "partitions"),
                        ({"backend": "tpu"}, "backend"), ({"granularity": "task", "partitions": 2}, "partitions")]:
        with pytest.raises(ValueError, match=msg):
            atlas_fast.compose(vit, bank, **kwargs)
    assert not any("Atlas" in type(m).__name__ for m in vit.modules()), "a failed compose must not touch the model"
    assert all(p.requires_grad for p in vit.parameters())
