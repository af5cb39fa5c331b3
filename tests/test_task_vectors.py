"""TaskVectors: construction from models, state dicts and files; validation; save/load."""
import pytest
import torch
import torch.nn as nn

from atlas_fast import TaskVectors
from helpers import resident_mb


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3))


def _finetuned(base, seed):
    net = _net(0)
    net.load_state_dict(base.state_dict())
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    return net


@pytest.fixture
def models():
    base = _net(0)
    return base, [_finetuned(base, s) for s in (1, 2, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_from_models_stacks_differences(models, dtype):
    base, tuned = models
    tv = TaskVectors.from_models(base, tuned, dtype=dtype)
    assert len(tv) == 3 and tv.dtype == dtype
    assert tv.names == [n for n, _ in base.named_parameters()]
    for name, p0 in base.named_parameters():
        assert tv[name].shape == (3, *p0.shape)
        expected = torch.stack([dict(m.named_parameters())[name] - p0 for m in tuned]).to(dtype)
        assert torch.equal(tv[name], expected)
    assert tv.nbytes == sum(v.numel() * v.element_size() for v in tv.vectors.values())


def test_prefix_selects_and_strips(models):
    base, tuned = models
    wrap = lambda m: {f"visual.{k}": v for k, v in m.state_dict().items()} | {"text.w": torch.ones(2)}  # noqa: E731
    tv = TaskVectors.from_state_dicts(wrap(base), [wrap(m) for m in tuned], prefix="visual.")
    assert tv.names == list(base.state_dict())
    with pytest.raises(ValueError, match="prefix='audio.'"):
        TaskVectors.from_state_dicts(wrap(base), [wrap(m) for m in tuned], prefix="audio.")


def test_integer_entries_are_skipped_and_reported(models):
    base, tuned = models
    sd = base.state_dict() | {"steps": torch.tensor(3)}
    tv = TaskVectors.from_state_dicts(sd, [m.state_dict() | {"steps": torch.tensor(5)} for m in tuned])
    assert "steps" not in tv and "steps" in tv.skipped


@pytest.mark.parametrize("bad,msg", [
    ("shape", "'0.weight' has shape"), ("missing", "lacks"), ("extra", "pretrained model lacks"),
    ("nonfinite", "non-finite"), ("empty", "empty"),
])
def test_bad_state_dicts(models, bad, msg):
    base, tuned = models
    sds = [m.state_dict() for m in tuned]
    if bad == "shape":
        sds[1]["0.weight"] = torch.randn(7, 6)
    elif bad == "missing":
        del sds[2]["2.bias"]
    elif bad == "extra":
        sds[0]["head.weight"] = torch.randn(2)
    elif bad == "nonfinite":
        sds[1]["1.weight"][3] = float("nan")
    else:
        sds = []
    with pytest.raises(ValueError, match=msg):
        TaskVectors.from_state_dicts(base.state_dict(), sds)


def test_from_checkpoints_all_formats(models, tmp_path):
    from safetensors.torch import save_file
    base, tuned = models
    torch.save(base.state_dict(), tmp_path / "base.pt")
    paths = [tmp_path / "a.safetensors", tmp_path / "b.pt", tmp_path / "c.pt"]
    save_file(tuned[0].state_dict(), paths[0])
    torch.save({"state_dict": tuned[1].state_dict()}, paths[1])
    torch.save(tuned[2], paths[2])  # a pickled module, as public checkpoints often are
    with pytest.raises(ValueError, match="allow_pickle=True"):
        TaskVectors.from_checkpoints(tmp_path / "base.pt", paths)
    tv = TaskVectors.from_checkpoints(tmp_path / "base.pt", paths, allow_pickle=True)
    ref = TaskVectors.from_models(base, tuned)
    assert tv.sources == [str(p) for p in paths]
    for name in ref.names:
        assert torch.equal(tv[name], ref[name])


@pytest.mark.parametrize("kind", ["truncated_pt", "truncated_safetensors", "missing", "not_a_state_dict"])
def test_unreadable_checkpoints_name_the_file(models, tmp_path, kind):
    from safetensors.torch import save_file
    base, tuned = models
    torch.save(base.state_dict(), tmp_path / "base.pt")
    bad = tmp_path / ("bad.safetensors" if "safetensors" in kind else "bad.pt")
    if kind == "truncated_pt":
        torch.save(tuned[0].state_dict(), bad)
        bad.write_bytes(bad.read_bytes()[:200])
    elif kind == "truncated_safetensors":
        save_file(tuned[0].state_dict(), bad)
        bad.write_bytes(bad.read_bytes()[:100])
    elif kind == "not_a_state_dict":
        torch.save([1, 2, 3], bad)
    with pytest.raises(ValueError, match=str(bad)):
        TaskVectors.from_checkpoints(tmp_path / "base.pt", [bad])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_bit_exact(models, tmp_path, dtype):
    base, tuned = models
    tv = TaskVectors.from_models(base, tuned, dtype=dtype)
    path = tmp_path / "bank.safetensors"
    tv.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"], "no temporary file may be left"
    back = TaskVectors.load(path)
    assert back.names == tv.names and back.sources == tv.sources and back.dtype == dtype
    for name in tv.names:
        assert torch.equal(back[name], tv[name])
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match="bank.safetensors"):
        TaskVectors.load(path)


def test_failed_save_keeps_the_old_file(models, tmp_path):
    base, tuned = models
    tv = TaskVectors.from_models(base, tuned)
    path = tmp_path / "bank.safetensors"
    tv.save(path)
    before = path.read_bytes()
    broken = TaskVectors({"w": torch.randn(3, 4)[:, ::2]})  # non-contiguous is fine; make writing fail instead
    broken.vectors["w"] = object()
    with pytest.raises(Exception):
        broken.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, "int4"])
def test_memory_mapped_bank_equals_the_file(models, tmp_path, dtype):
    from safetensors.torch import load_file
    base, tuned = models
    tv = TaskVectors.from_models(base, tuned, dtype=dtype)
    path = tmp_path / "bank.safetensors"
    tv.save(path)
    mapped = TaskVectors.load(path, mmap=True)
    raw = load_file(str(path))      # the file as the safetensors library reads it
    assert mapped.names == tv.names and mapped.sources == tv.sources and mapped.format == tv.format
    for name in tv.names:
        v = mapped[name]
        if hasattr(v, "scale"):
            assert torch.equal(v.data, raw[name]) and torch.equal(v.scale, raw[name + "::scale"])
        else:
            assert torch.equal(v, raw[name])
    with pytest.raises(ValueError, match="mmap=True maps the file into host memory"):
        TaskVectors.load(path, device="meta", mmap=True)


def test_memory_mapped_bank_opens_without_reading_it(tmp_path):
    T, n = 4, 3072
    bank = TaskVectors({f"layer{i}.weight": torch.randn(T, n, n) * 1e-3 for i in range(2)})   # 288 MiB
    path = tmp_path / "big.safetensors"
    bank.save(path)
    size_mb = path.stat().st_size / 2**20
    del bank
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                          # resets the resident high-water mark
    before, before_file = resident_mb("VmRSS"), resident_mb("RssFile")
    mapped = TaskVectors.load(path, mmap=True)     # maps, scans for non-finite values, gives the pages back
    peak_mb = resident_mb("VmHWM") - before
    assert peak_mb < size_mb / 4, (peak_mb, size_mb)
    assert resident_mb("RssFile") - before_file < 16     # none of the bank's pages stay resident
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:           # the values as safetensors itself reads them
        row = f.get_slice("layer1.weight")[3:4, 5:6][0, 0]
    assert torch.equal(mapped["layer1.weight"][3, 5], row)


def test_memory_mapped_bank_refuses_non_finite_values(models, tmp_path):
    from safetensors.torch import load_file, save_file
    base, tuned = models
    path = tmp_path / "bank.safetensors"
    TaskVectors.from_models(base, tuned).save(path)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["2.weight"][1, 0, 0] = float("inf")
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"block '2.weight' of task vector 1 .* non-finite"):
        TaskVectors.load(path, mmap=True)
