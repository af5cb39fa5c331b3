"""int8 and int4 task-vector banks: quantise, dequantise, sizes, per-block errors, save/load, refusals."""
import copy

import pytest
import torch
import torch.nn as nn

from atlas_fast import TaskVectors, synthetic_task_vectors
from atlas_fast.bank import quant

FORMATS = [("int8", None), ("int4", 16)]   # group 16: several groups per row and a short last one at K = 70


def _block(shape, T, fmt, group, scale=1e-2):
    tau = torch.randn(T, *shape) * scale
    return tau, quant.quantize(tau, fmt, group or quant.DEFAULT_GROUP)


def _mlp(width=768):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.LayerNorm(width))


# ---------------------------------------------------------------- storage

def test_dequantize_hand_computed_int8():
    """τ[t, r, c] = q · scale[t, r], by hand for two task vectors of a 2 × 3 block; quantize() gives these q back."""
    data = torch.tensor([[[1, -2, 127], [-127, 0, 5]], [[3, 0, -1], [2, 2, 2]]], dtype=torch.int8)
    scale = torch.tensor([[0.5, 0.25], [2.0, 0.125]])
    block = quant.QuantizedBlock(data, scale, 0, (2, 2, 3))
    want = torch.tensor([[[0.5, -1.0, 63.5], [-31.75, 0.0, 1.25]], [[6.0, 0.0, -2.0], [0.25, 0.25, 0.25]]])
    assert torch.equal(block.dequantize(), want)
    assert torch.equal(block.dequantize_rows(1, 2, torch.empty(2, 3)), want[:, 1])
    again = quant.quantize(torch.tensor([[[0.5, -1.0, 63.5]]]), "int8")
    assert again.data.tolist() == [[[1, -2, 127]]] and again.scale.tolist() == [[0.5]]


def test_dequantize_hand_computed_int4():
    """A 2 × 5 block, groups of 2 columns (3 groups a row, the last of one column): column 2j in the low nibble of
    byte j, 2j + 1 in the high one, each stored as q + 8, the pad nibble of the odd last byte 8 (q = 0);
    τ[r, c] = q · scale[r, c // 2]. quantize() packs the same bytes."""
    # row 0: q = [1, -2, 7, -7, 3] -> nibbles [9, 6, 15, 1, 11, pad 8]
    # row 1: q = [0, 4, -1, 2, -5] -> nibbles [8, 12, 7, 10, 3, pad 8]
    data = torch.tensor([[[9 | 6 << 4, 15 | 1 << 4, 11 | 8 << 4], [8 | 12 << 4, 7 | 10 << 4, 3 | 8 << 4]]],
                        dtype=torch.uint8)
    scale = torch.tensor([[[0.5, 0.25, 2.0], [1.0, 0.125, 0.75]]])
    block = quant.QuantizedBlock(data, scale, 2, (1, 2, 5))
    want = torch.tensor([[[0.5, -1.0, 1.75, -1.75, 6.0], [0.0, 4.0, -0.125, 0.25, -3.75]]])
    assert torch.equal(block.dequantize(), want)
    assert torch.equal(block.dequantize(torch.float64), want.double())
    assert torch.equal(block.dequantize_rows(1, 2, torch.empty(1, 5)), want[:, 1])
    # groups [3, -7], [0.6, -1.4], [2.1]: scales absmax / 7 = 1, 0.2, 0.3; q = [3, -7], [3, -7], [7]
    again = quant.quantize(torch.tensor([[[3.0, -7.0, 0.6, -1.4, 2.1]]]), "int4", 2)
    assert again.data.tolist() == [[[11 | 1 << 4, 11 | 1 << 4, 15 | 8 << 4]]]
    assert again.scale.flatten().tolist() == pytest.approx([1.0, 0.2, 0.3], rel=1e-6)


@pytest.mark.parametrize("fmt,group", FORMATS + [("int4", 128), ("int4", 5)])
@pytest.mark.parametrize("shape", [(45, 70), (7, 37), (6, 3, 3, 5), (1, 1)])
def test_quantize_error_bound_and_exact_absmax(fmt, group, shape):
    """Every value within half a scale step of τ, the largest of each row / group exact, odd widths included."""
    tau, block = _block(shape, 3, fmt, group)
    deq = block.dequantize(torch.float64)
    assert deq.shape == tau.shape and block.shape == tau.shape
    rows = tau.reshape(3, shape[0], -1).double()
    cols = rows.shape[2]
    if fmt == "int8":
        step = block.scale.double()[..., None].expand_as(rows)
    else:
        g = block.group
        step = block.scale.double().repeat_interleave(g, -1)[..., :cols]
    err = (deq.reshape(rows.shape) - rows).abs()
    assert (err <= step / 2 * (1 + 1e-5) + 1e-12).all(), f"max error / step {float((err / step).max()):.3f}"
    if fmt == "int8":  # each row's largest magnitude is exact
        picked = torch.gather(err, 2, rows.abs().argmax(-1, keepdim=True))
        assert picked.max() <= 1e-6 * rows.abs().max()


def test_zero_rows_quantise_to_zero():
    tau = torch.randn(2, 4, 9) * 1e-2
    tau[:, 1] = 0
    for fmt in quant.FORMATS:
        deq = quant.quantize(tau, fmt, 4).dequantize()
        assert torch.isfinite(deq).all() and (deq[:, 1] == 0).all()


@pytest.mark.parametrize("fmt,group,limit,max_err", [("int8", None, 0.27, 0.01), ("int4", None, 0.15, 0.12),
                                                     ("int4", 64, 0.15, 0.11)])
def test_nbytes_and_per_block_errors(fmt, group, limit, max_err):
    """nbytes against the float32 bank at realistic widths (768 / 3072), 1-D blocks kept float32, and the
    relative error of each block recorded when the bank is built."""
    model = _mlp()
    tv = synthetic_task_vectors(model, 2)
    q = tv.to(dtype=torch.int8 if fmt == "int8" else "int4", group_size=group)
    assert q.format == fmt and q.nbytes <= limit * tv.nbytes, q.nbytes / tv.nbytes
    assert q.nbytes == 2 * sum(quant.storage_bytes(p.shape, fmt, group or quant.DEFAULT_GROUP)
                               for p in model.parameters())
    for name, v in q.vectors.items():
        if tv[name].dim() == 2:
            assert not quant.is_quantized(v) and v.dtype == torch.float32 and torch.equal(v, tv[name])
        else:
            assert quant.is_quantized(v)
            measured = ((v.dequantize() - tv[name]).norm() / tv[name].norm()).item()
            assert q.quant_errors[name] == pytest.approx(measured, rel=1e-4) and 0 < measured < max_err
    report = q.quantization_report()
    assert fmt in report and "0.weight" in report and "max" in report


@pytest.mark.parametrize("fmt,group", FORMATS)
def test_built_from_models_equals_quantised_float_bank(fmt, group):
    base = nn.Sequential(nn.Linear(37, 21), nn.LayerNorm(21), nn.Conv2d(3, 4, 3))
    tuned = [copy.deepcopy(base) for _ in range(3)]
    for m in tuned:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 1e-2)
    dtype = torch.int8 if fmt == "int8" else "int4"
    built = TaskVectors.from_models(base, tuned, dtype=dtype, group_size=group)
    converted = TaskVectors.from_models(base, tuned).quantize(dtype, group_size=group)
    assert built.names == converted.names and built.format == fmt and built.group_size == group
    for name in built.names:
        a, b = built[name], converted[name]
        if quant.is_quantized(a):
            assert torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale)
            assert built.quant_errors[name] == pytest.approx(converted.quant_errors[name], rel=1e-6)
        else:
            assert torch.equal(a, b) and a.dtype == torch.float32


@pytest.mark.parametrize("fmt,group", FORMATS)
def test_save_load_round_trip(tmp_path, fmt, group):
    tv = synthetic_task_vectors(nn.Sequential(nn.Linear(37, 21), nn.LayerNorm(21), nn.Conv2d(3, 5, 3)), 3)
    q = tv.to(dtype=torch.int8 if fmt == "int8" else "int4", group_size=group)
    path = tmp_path / "bank.safetensors"
    q.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"], "no temporary file may be left"
    back = TaskVectors.load(path)
    assert back.names == q.names and back.format == fmt and back.group_size == group and back.nbytes == q.nbytes
    assert back.quant_errors == q.quant_errors and back.sources == q.sources
    for name in q.names:
        a, b = q[name], back[name]
        if quant.is_quantized(a):
            assert torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale) and a.shape == b.shape
        else:
            assert torch.equal(a, b)
    deq = back.to(dtype=torch.float32)
    assert deq.format == "float32" and torch.equal(deq["0.weight"], q["0.weight"].dequantize())
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match="bank.safetensors"):
        TaskVectors.load(path)


def test_load_refuses_inconsistent_scales(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    q = synthetic_task_vectors(nn.Linear(9, 4), 2).to(dtype=torch.int8)
    q.save(tmp_path / "bank.safetensors")
    with safe_open(tmp_path / "bank.safetensors", "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["weight::scale"] = tensors["weight::scale"][:, :3].contiguous()
    save_file(tensors, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=r"bad.safetensors: block 'weight'.*scales \(2, 3\)"):
        TaskVectors.load(tmp_path / "bad.safetensors")


def test_unsupported_combinations_are_named():
    tv = synthetic_task_vectors(nn.Linear(9, 4), 2)
    q8 = tv.to(dtype=torch.int8)
    with pytest.raises(ValueError, match="already int8"):
        q8.to(dtype="int4")
    with pytest.raises(ValueError, match="group_size=64: only int4"):
        tv.to(dtype=torch.int8, group_size=64)
    with pytest.raises(ValueError, match="dtype=torch.int16"):
        tv.to(dtype=torch.int16)
    with pytest.raises(ValueError, match="group size 0"):
        tv.to(dtype="int4", group_size=0)
    with pytest.raises(ValueError, match="only blocks of two or more"):
        quant.quantize(torch.randn(2, 5), "int8")
    with pytest.raises(ValueError, match="mixed formats"):
        TaskVectors({"a": quant.quantize(torch.randn(2, 3, 4), "int8"),
                     "b": quant.quantize(torch.randn(2, 3, 4), "int4", 2)})
    with pytest.raises(ValueError, match="block 'b' is torch.bfloat16"):
        TaskVectors({"a": quant.quantize(torch.randn(2, 3, 4), "int8"), "b": torch.randn(2, 3).bfloat16()})
    with pytest.raises(ValueError, match=r"data \(2, 3, 4\) and scales \(2, 4\)"):
        quant.QuantizedBlock(torch.zeros(2, 3, 4, dtype=torch.int8), torch.ones(2, 4), 0, (2, 3, 4))
