"""Pickled whole-module checkpoints (the public aTLAS ones) read without the code of their classes."""
import copy
import subprocess
import sys
import textwrap
import types

import open_clip
import pytest
import torch
import torch.nn as nn
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

import atlas_fast
from atlas_fast.io.checkpoints import read_state_dict


def tiny_clip(seed):
    torch.manual_seed(seed)
    return open_clip.model.CLIP(
        embed_dim=24, vision_cfg=CLIPVisionCfg(layers=2, width=48, head_width=12, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=4, layers=1))


def _save_as_foreign_class(obj_factory, path, write=torch.save):
    """torch.save an object whose class lives in a module `src.modeling` that exists only while saving, as
    the authors' checkpoints were written."""
    module = types.ModuleType("src.modeling")

    class ImageEncoder(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.train_preprocess = open_clip.image_transform(32, is_train=True)
            self.cache_dir = "/cache"

        def forward(self, images):
            return self.model.encode_image(images)

    ImageEncoder.__module__ = "src.modeling"
    ImageEncoder.__qualname__ = "ImageEncoder"
    module.ImageEncoder = ImageEncoder
    sys.modules["src"] = types.ModuleType("src")
    sys.modules["src.modeling"] = module
    try:
        write(obj_factory(ImageEncoder), path)
    finally:
        del sys.modules["src.modeling"], sys.modules["src"]


def test_aTLAS_image_encoder_pickle_reads_without_its_code(tmp_path):
    clip = tiny_clip(0)
    path = tmp_path / "zeroshot.pt"
    _save_as_foreign_class(lambda cls: cls(copy.deepcopy(clip)), path)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        read_state_dict(path)
    sd = read_state_dict(path, allow_pickle=True)
    expected = clip.state_dict()
    assert list(sd) == list(expected), "names are the wrapped open_clip model's, in its order"
    for k, v in expected.items():
        assert torch.equal(sd[k], v), k
    assert "src.modeling" not in sys.modules, "the checkpoint's module must not be imported"


def test_bank_from_pickled_encoders_composes_clip(tmp_path):
    base, tuned = tiny_clip(0), [tiny_clip(0), tiny_clip(0)]
    for t, m in enumerate(tuned):
        torch.manual_seed(10 + t)
        with torch.no_grad():
            for p in m.visual.parameters():
                p.add_(torch.randn_like(p) * 1e-2)
    paths = [tmp_path / f"{n}.pt" for n in ("zeroshot", "a", "b")]
    for model, path in zip([base] + tuned, paths):
        _save_as_foreign_class(lambda cls, m=model: cls(copy.deepcopy(m)), path)
    bank = atlas_fast.TaskVectors.from_checkpoints(paths[0], paths[1:], prefix="visual.", allow_pickle=True)
    for name, p0 in base.visual.named_parameters():
        expected = torch.stack([dict(m.visual.named_parameters())[name] - p0 for m in tuned])
        assert torch.equal(bank[name], expected.detach()), name
    atlas_fast.compose(base.visual, bank)


def test_stand_ins_run_no_code(tmp_path):
    """A pickle that would call os.system on load gets an inert stand-in instead."""
    marker = tmp_path / "ran"
    script = textwrap.dedent(f"""
        import os, torch
        class Evil:
            def __reduce__(self):
                return (os.system, ("touch {marker}",))
        torch.save({{"w": torch.ones(2), "payload": Evil()}}, "{tmp_path / 'evil.pt'}")
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    with pytest.raises(ValueError, match="evil.pt"):
        read_state_dict(tmp_path / "evil.pt", allow_pickle=True)     # not a state dict of tensors
    assert not marker.exists()


@pytest.mark.parametrize("form", ["old_torch_module", "old_torch_state_dict", "raw_pickle_module",
                                  "raw_pickle_state_dict"])
def test_old_torch_files_and_raw_pickles(tmp_path, form):
    """torch.save(..., _use_new_zipfile_serialization=False) and pickle.dump (what torch_load_old reads), of a
    wrapped model or a state dict, half precision included: read bit-exactly, importing nothing."""
    import pickle
    clip = tiny_clip(1)
    clip.visual.half()
    obj_factory = (lambda cls: cls(copy.deepcopy(clip))) if form.endswith("module") else \
        (lambda cls: {"state_dict": clip.state_dict()})
    path = tmp_path / "ckpt.pt"

    def write(obj, p):
        if form.startswith("old_torch"):
            torch.save(obj, p, _use_new_zipfile_serialization=False)
        else:
            with open(p, "wb") as f:
                pickle.dump(obj, f)
    _save_as_foreign_class(obj_factory, path, write)
    if form.startswith("raw_pickle") or form.endswith("module"):
        with pytest.raises(ValueError, match=r"ckpt.pt: holds pickled objects.*--allow-pickle"):
            read_state_dict(path)
    sd = read_state_dict(path, allow_pickle=True)
    expected = clip.state_dict()
    assert list(sd) == list(expected)
    for k, v in expected.items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k
    assert "src.modeling" not in sys.modules
