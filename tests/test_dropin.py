"""A composed model behaves like the module it replaced: state dicts, deepcopy, undo, dtype and device moves,
coefficient files that do not fit, errors at the call that caused them, and the edge cases plain torch
handles. Outputs are checked against the float64 reference of the merged weights (atlas_fast.ops.reference)."""
import copy
import json

import open_clip
import pytest
import torch
import torch.nn as nn
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from torch.func import functional_call

import atlas_fast
from atlas_fast.bench.naive import NaiveAtlas
from atlas_fast.ops.reference import merge_ref
from helpers import assert_rel

T = 3


def tiny_clip():
    torch.manual_seed(0)
    return open_clip.model.CLIP(
        embed_dim=24, vision_cfg=CLIPVisionCfg(layers=2, width=48, head_width=12, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=4, layers=1)).eval()


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 5), nn.LayerNorm(5)).eval()


def images(n=2, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def random_coefficients(atlas, seed=4):
    with torch.no_grad():
        atlas.coefficients.copy_(torch.rand(atlas.coefficients.shape, generator=torch.Generator().manual_seed(seed))
                                 * 1.6 - 0.8)


def reference_output(plain, bank, atlas, x, names_prefix=""):
    """The float64 model with every composed block set to merge_ref(θ0, τ, c): independent of compose()."""
    model = copy.deepcopy(plain).double()
    c = atlas.coefficients.detach()
    params = {}
    for b, name in enumerate(atlas.block_names):
        coef = c.unsqueeze(1) if c.dim() == 1 else (c[:, b:b + 1] if c.dim() == 2 else c[:, b])
        p0 = dict(plain.named_parameters())[name]
        params[name] = merge_ref(p0.detach(), bank[names_prefix + name], coef, atlas.atlas.keys[b])
    with torch.no_grad():
        return functional_call(model, params, (x.double(),))


# ---------------------------------------------------------------- 1. state_dict keeps the model's own keys

def test_state_dict_holds_the_original_keys_and_the_coefficients():
    clip = tiny_clip()
    before = clip.state_dict()
    bank = atlas_fast.synthetic_task_vectors(clip.visual, T, rel_scale=5e-2)
    atlas = atlas_fast.compose(clip.visual, bank)
    after = clip.state_dict()
    assert set(after) == set(before) | {"visual.atlas_coefficients"}
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert set(atlas.state_dict()) == set(clip.visual.state_dict())
    assert torch.equal(atlas.state_dict()["atlas_coefficients"], atlas.coefficients.detach())


def test_load_state_dict_of_an_original_checkpoint_updates_theta0():
    clip = tiny_clip()
    other = tiny_clip()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    bank = atlas_fast.synthetic_task_vectors(clip.visual, T, rel_scale=5e-2)
    atlas = atlas_fast.compose(clip.visual, bank)
    random_coefficients(atlas)
    coef = atlas.coefficients.detach().clone()
    clip.load_state_dict(other.state_dict())          # strict, no coefficients key in it
    assert torch.equal(atlas.coefficients.detach(), coef), "loading θ0 must keep the coefficients"
    x = images()
    with torch.no_grad():
        y = clip.encode_image(x)
    ref = reference_output(other.visual, bank, atlas, x)
    assert_rel(y, ref, 1e-5, "composed output on the loaded θ0")
    # and the coefficients load from the composed model's own state dict
    state = {k: v.clone() for k, v in clip.state_dict().items()}
    with torch.no_grad():
        atlas.coefficients.zero_()
    clip.load_state_dict(state)
    assert torch.equal(atlas.coefficients.detach(), coef)


# ---------------------------------------------------------------- 2. no merged tensor outlives its forward

def test_owners_hold_theta0_after_every_forward():
    clip = tiny_clip()
    params_before = dict(clip.named_parameters())
    atlas = atlas_fast.compose(clip.visual, atlas_fast.synthetic_task_vectors(clip.visual, T))
    random_coefficients(atlas)
    clip.encode_image(images()).sum().backward()
    for name, p in clip.named_parameters():
        if name != "visual.atlas_coefficients":
            assert p is params_before[name], f"{name} is not θ0 after the forward"
            assert p.grad_fn is None
    with pytest.raises(RuntimeError):
        clip.encode_image(torch.randn(2, 3, 31, 31))       # raises inside the forward
    for name, p in clip.named_parameters():
        if name != "visual.atlas_coefficients":
            assert p is params_before[name], f"{name} is not θ0 after a forward that raised"


@pytest.mark.parametrize("what", ["atlas", "clip"])
def test_deepcopy_gives_an_independent_composed_model(what):
    clip = tiny_clip()
    bank = atlas_fast.synthetic_task_vectors(clip.visual, T, rel_scale=5e-2)
    atlas = atlas_fast.compose(clip.visual, bank)
    random_coefficients(atlas)
    x = images()
    atlas(x).sum().backward()                        # after a forward with gradients, as in training
    if what == "atlas":
        twin = copy.deepcopy(atlas)
        run, twin_run, twin_coef = atlas, twin, twin.coefficients
    else:
        twin = copy.deepcopy(clip)
        run, twin_run = clip.encode_image, twin.encode_image
        twin_coef = twin.visual.atlas_coefficients
    assert twin_coef is not atlas.coefficients
    ref = reference_output(tiny_clip().visual, bank, atlas, x)
    with torch.no_grad():
        assert_rel(twin_run(x) if what == "atlas" else twin.visual(x), ref, 1e-5, "copy")
        twin_coef.mul_(-1)
        assert_rel(atlas(x), ref, 1e-5, "original after changing the copy's coefficients")
        assert (twin_run(x) - run(x)).abs().max() > 1e-3, "the copy must run its own coefficients"


# ---------------------------------------------------------------- 3. undo

def test_unwrap_restores_the_model_exactly():
    model = conv_net()
    model[0].bias.requires_grad_(False)
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    modules = dict(model.named_modules())
    keys = list(model.state_dict())
    x = images(size=8)
    with torch.no_grad():
        y0 = model(x)
    atlas = atlas_fast.compose(model, atlas_fast.TaskVectors.from_models(model, [conv_net(), conv_net()]))
    random_coefficients(atlas)
    atlas(x)
    plain = atlas.unwrap()
    assert plain is model and type(model) is nn.Sequential
    assert dict(model.named_modules()) == modules
    assert dict(model.named_parameters()) == params, "the same parameter tensors"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(x), y0)
    with pytest.raises(RuntimeError, match="unwrapped"):
        atlas(x)
    atlas_fast.compose(model, atlas_fast.synthetic_task_vectors(model, T))     # composes again


# ---------------------------------------------------------------- 4. dtype and device moves

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_moves_keep_float32_coefficients(dtype):
    vit = tiny_clip().visual
    plain = copy.deepcopy(vit)
    bank = atlas_fast.synthetic_task_vectors(vit, T, rel_scale=5e-2)
    atlas = atlas_fast.compose(vit, bank)
    random_coefficients(atlas)
    coef = atlas.coefficients.detach().clone()
    x = images()
    atlas(x).sum().backward()
    grad = atlas.coefficients.grad.clone()
    (atlas.half() if dtype == torch.float16 else atlas.bfloat16())
    assert atlas.coefficients.dtype == torch.float32 and torch.equal(atlas.coefficients.detach(), coef)
    assert atlas.coefficients.grad.dtype == torch.float32 and torch.equal(atlas.coefficients.grad, grad)
    assert vit.conv1.weight.dtype == dtype and vit.ln_pre.weight.dtype == dtype
    taus = [tau for _, _, tau in atlas._theta0_and_tau()]
    assert {t.dtype for t in taus} == {dtype}, "the bank follows the move"
    if dtype == torch.float16 and not _cpu_half_matmul():
        return
    y = atlas(x.to(dtype))
    assert y.dtype == dtype
    ref = reference_output(plain, bank, atlas, x)
    assert_rel(y.float(), ref.float(), 5e-2, f"{dtype} composed output")


def _cpu_half_matmul():
    try:
        torch.ones(2, 2, dtype=torch.float16) @ torch.ones(2, 2, dtype=torch.float16)
        return True
    except RuntimeError:
        return False


def test_to_float64_and_device_moves_move_everything():
    model = conv_net()
    bank = atlas_fast.synthetic_task_vectors(model, T)
    atlas = atlas_fast.compose(model, bank)
    atlas.to(torch.float64)
    assert atlas.coefficients.dtype == torch.float64, "float64 (gradcheck) is a widening, kept"
    atlas.to(torch.float32).to("meta")
    tensors = [atlas.coefficients] + [t for _, p0, t in atlas._theta0_and_tau() for t in (p0, t)]
    assert all(t.device.type == "meta" for t in tensors)
    assert atlas.coefficients.dtype == torch.float32


@pytest.mark.gpu
def test_cuda_move_runs_on_the_gpu():
    vit = tiny_clip().visual
    plain = copy.deepcopy(vit)
    bank = atlas_fast.synthetic_task_vectors(vit, T, rel_scale=5e-2)
    atlas = atlas_fast.compose(vit, bank, backend="torch")
    random_coefficients(atlas)
    atlas.cuda()
    assert all(t.is_cuda for _, p0, tau in atlas._theta0_and_tau() for t in (p0, tau))
    y = atlas(images().cuda())
    assert_rel(y.double().cpu(), reference_output(plain, bank, atlas, images()), 1e-5)


# ---------------------------------------------------------------- 5. coefficients that do not fit

def test_coefficient_files_refuse_another_bank(tmp_path):
    model = conv_net()
    bank = atlas_fast.synthetic_task_vectors(model, T, seed=1)
    atlas = atlas_fast.compose(copy.deepcopy(model), bank)
    random_coefficients(atlas)
    path = tmp_path / "coef.safetensors"
    atlas.save_coefficients(path)

    order = [2, 0, 1]
    reordered = atlas_fast.TaskVectors({k: v[order] for k, v in bank.vectors.items()},
                                       sources=[bank.sources[t] for t in order])
    other = atlas_fast.compose(copy.deepcopy(model), reordered)
    with pytest.raises(ValueError, match=r"saved for another bank: block '0.weight' of task vector 0 "
                                         r"\('synthetic\[0\]' then, 'synthetic\[2\]' now\) holds other values"):
        other.load_coefficients(path)

    same_names = atlas_fast.TaskVectors({k: v[order] for k, v in bank.vectors.items()}, sources=bank.sources)
    other = atlas_fast.compose(copy.deepcopy(model), same_names)
    with pytest.raises(ValueError, match="holds other values"):
        other.load_coefficients(path)
    other.load_coefficients(path, allow_bank_mismatch=True)
    assert torch.equal(other.coefficients, atlas.coefficients)

    lower = atlas_fast.compose(copy.deepcopy(model), bank.to(dtype=torch.bfloat16))
    lower.load_coefficients(path)                       # the same bank in another dtype fits
    assert torch.equal(lower.coefficients, atlas.coefficients)


# ---------------------------------------------------------------- 6. errors at the call that caused them

def test_backend_that_cannot_run_fails_at_compose():
    model = conv_net()
    with pytest.raises(atlas_fast.backends.BackendUnavailable, match="cuda"):
        atlas_fast.compose(model, atlas_fast.synthetic_task_vectors(model, T), backend="cuda")
    assert type(model) is nn.Sequential and not hasattr(model, "atlas_coefficients")


def test_composing_twice_says_already_composed():
    clip = tiny_clip()
    atlas_fast.compose(clip.visual, atlas_fast.synthetic_task_vectors(clip.visual, T))
    for target, bank_of in ((clip.visual, clip.visual), (clip, clip)):
        with pytest.raises(ValueError, match="already composed"):
            atlas_fast.compose(target, atlas_fast.synthetic_task_vectors(bank_of, T), strict=False)


def test_prefix_mismatch_suggests_the_fix():
    clip = tiny_clip()
    whole = atlas_fast.synthetic_task_vectors(clip, T)
    visual = atlas_fast.synthetic_task_vectors(clip.visual, T)
    with pytest.raises(ValueError, match=r"prefix='visual\.'"):
        atlas_fast.compose(clip.visual, whole)
    with pytest.raises(ValueError, match=r"compose\(model\.visual"):
        atlas_fast.compose(clip, visual)
    atlas = atlas_fast.compose(clip.visual, whole, prefix="visual.")
    assert atlas.block_names == [n for n, _ in tiny_clip().visual.named_parameters()]


# ---------------------------------------------------------------- 7. non-finite values

def test_banks_with_nan_are_refused_wherever_made(tmp_path):
    from safetensors.torch import save_file
    bad = {"w": torch.randn(2, 4, 3), "b": torch.randn(2, 4)}
    bad["w"][1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'w' of task vector 1"):
        atlas_fast.TaskVectors(bad)
    meta = {"format": "atlas_fast.task_vectors/1", "names": json.dumps(["w", "b"]), "num_tasks": "2",
            "dtype": "float32", "sources": json.dumps(["a", "b"]), "skipped": "{}"}
    path = tmp_path / "bank.safetensors"
    save_file(bad, str(path), metadata=meta)
    with pytest.raises(ValueError, match="non-finite"):
        atlas_fast.TaskVectors.load(path)
    huge = atlas_fast.TaskVectors({"w": torch.full((1, 2), 1e6)})
    with pytest.raises(ValueError, match="non-finite"):
        huge.to(dtype=torch.float16)                    # overflows to Inf


def test_nan_coefficients_raise_at_the_forward():
    model = conv_net()
    atlas = atlas_fast.compose(model, atlas_fast.synthetic_task_vectors(model, T))
    with torch.no_grad():
        atlas.coefficients[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values \(task 1 block '1.bias'\)"):
        atlas(images(size=8))
    atlas.check_finite = False
    assert torch.isnan(atlas(images(size=8))).all()


# ---------------------------------------------------------------- 8. edge cases plain torch handles

def test_zero_batch_through_attention():
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    holder = nn.Sequential(nn.Identity())
    holder.attn = mha
    atlas = atlas_fast.compose(holder, atlas_fast.synthetic_task_vectors(holder, T))
    x = torch.randn(0, 5, 16)
    out, weights = holder.attn(x, x, x)
    ref, ref_weights = nn.MultiheadAttention(16, 4, batch_first=True)(x, x, x)
    assert out.shape == ref.shape and weights.shape == ref_weights.shape
    assert type(holder.attn).__name__ == "AtlasMultiheadAttention"
    assert atlas.coefficients.shape[1] == 4


def test_merge_with_integer_parameters():
    model = conv_net()
    model.register_parameter("steps", nn.Parameter(torch.tensor([3, 4]), requires_grad=False))
    bank = atlas_fast.synthetic_task_vectors(model, T)
    atlas = atlas_fast.compose(model, bank, strict=False)
    random_coefficients(atlas)
    plain = atlas.merge()
    assert torch.equal(plain.steps, torch.tensor([3, 4]))
    x = images(size=8)
    with torch.no_grad():
        assert_rel(plain(x), reference_output(conv_net(), bank, atlas, x), 1e-5)
    assert all(p.requires_grad for n, p in plain.named_parameters() if n != "steps")


def test_input_dtype_mismatch_raises_as_torch_does():
    clip = tiny_clip()
    x = images().half()
    with pytest.raises(RuntimeError) as plain_error:
        clip.visual(x)
    atlas_fast.compose(clip.visual, atlas_fast.synthetic_task_vectors(clip.visual, T))
    with pytest.raises(RuntimeError) as atlas_error:
        clip.visual(x)
    assert str(atlas_error.value) == str(plain_error.value)
    linear = nn.Sequential(nn.Linear(4, 3, bias=False))
    with pytest.raises(RuntimeError) as plain_error:
        linear(torch.randn(2, 4).half())
    atlas_fast.compose(linear, atlas_fast.synthetic_task_vectors(linear, T))
    with pytest.raises(RuntimeError) as atlas_error:
        linear(torch.randn(2, 4).half())
    assert str(atlas_error.value) == str(plain_error.value)


# ---------------------------------------------------------------- 9. BatchNorm statistics

def test_batchnorm_statistics_stay_out_of_the_bank():
    base = conv_net()
    tuned = []
    for seed in (1, 2):
        m = conv_net()
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 1e-2)
        m.train()(images(size=8, seed=seed))            # moves the running statistics
        tuned.append(m.eval())
    bank = atlas_fast.TaskVectors.from_models(base, tuned)
    assert not any("running" in n for n in bank.names)
    sd_bank = atlas_fast.TaskVectors.from_state_dicts(base.state_dict(), [m.state_dict() for m in tuned])
    assert set(sd_bank.names) == set(bank.names) and "1.running_mean" in sd_bank.skipped
    atlas = atlas_fast.compose(copy.deepcopy(base), bank)            # strict: nothing missing, nothing extra
    naive = NaiveAtlas(copy.deepcopy(base), bank)
    random_coefficients(atlas)
    with torch.no_grad():
        naive.coefficients.copy_(atlas.coefficients)
        x = images(size=8)
        assert_rel(atlas(x), naive(x), 1e-5, "parameters composed, θ0's statistics kept")
    with_buffers = atlas_fast.TaskVectors.from_models(base, tuned, include_buffers=True)
    assert "1.running_mean" in with_buffers
    with pytest.warns(UserWarning, match="buffers are not composed"):
        atlas_fast.compose(copy.deepcopy(base), with_buffers)
