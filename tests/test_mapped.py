"""Memory-mapped safetensors: the mapped tensors hold what the safetensors library reads, opening reads
nothing, and release() gives the pages back without losing values. (A mapped file that changes, and writes into
mapped tensors: test_bad_inputs.py.)"""
import pytest
import torch
from safetensors.torch import load_file, save_file

from atlas_fast.bank.mapped import is_mapped, map_safetensors, release
from helpers import resident_mb


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 5, 7, generator=g), "b16": torch.randn(2, 9, generator=g).bfloat16(),
            "h16": torch.randn(11, generator=g).half(), "d": torch.randn(3, 3, generator=g).double(),
            "q": torch.randint(-128, 128, (5, 13), generator=g, dtype=torch.int8),
            "u": torch.randint(0, 256, (7,), generator=g, dtype=torch.uint8), "m": torch.rand(4, generator=g) > 0.5,
            "empty": torch.zeros(0, 3)}


def test_mapped_tensors_equal_a_plain_read(tensors, tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "x", "n": "8"})
    mapped, meta = map_safetensors(path)
    plain = load_file(str(path))
    assert meta == {"format": "x", "n": "8"} and set(mapped) == set(plain)
    for name, t in plain.items():
        assert mapped[name].dtype == t.dtype and mapped[name].shape == t.shape, name
        assert torch.equal(mapped[name], t), name
        assert is_mapped(mapped[name])
    assert not is_mapped(plain["w"])


def test_opening_reads_nothing_and_release_gives_pages_back(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"big": torch.randn(64, 1024, 1024)}, str(path))    # 256 MiB
    before = resident_mb()
    mapped, _ = map_safetensors(path)
    assert resident_mb() - before < 16
    big = mapped["big"]
    total = big.sum(dtype=torch.float64).item()    # touches every page
    assert resident_mb() - before > 200
    release(big)
    assert resident_mb() - before < 16
    assert big.sum(dtype=torch.float64).item() == total    # read again from the file


def test_truncated_file_is_refused(tensors, tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-20])
    with pytest.raises(ValueError, match=r"t.safetensors: truncated safetensors file \(tensor"):
        map_safetensors(path)
    path.write_bytes(data[:5])
    with pytest.raises(ValueError, match="no header"):
        map_safetensors(path)
