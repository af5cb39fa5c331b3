"""Fingerprints of task-vector banks: what a coefficient file or a training checkpoint records of the bank it was
learned with, so that another bank is refused and the same bank is accepted however it is stored and wherever its
files lie (no path takes part).

Per block b and task vector t, in float64:

    [‖τ_t,b‖,  Σ τ_t,b,  τ_t,b[i_1], …, τ_t,b[i_S]]          S = SAMPLES flat positions of the block

with i_j = fmix32(j XOR key(n)) mod n, fixed by the block's size n alone (hashing.py: the same positions on every
machine and torch version). A bank's fingerprint is the (T, B, 2 + S) tensor of these rows in task-vector and block
order, so each part tells something apart: the norm and the sum other values of a block, the samples other values
of the same norm and sum, the layout reordered task vectors and two swapped blocks of one shape.

Cost: one pass over the bank, a chunk at a time (a memory-mapped bank's pages are given back after each chunk);
the samples are taken in the same pass. Quantised blocks are dequantised chunk by chunk, in float64; low-rank blocks
give norm and sum from their factors (lowrank.fingerprint) and each sample as one dot product of the factors.

Two fingerprints agree when, for every block and task vector, norm and sum differ by at most RTOL × the block's norm
and the samples by at most RTOL × their own norm (or the block's RMS × √S when that is larger): the same bank in
another float dtype agrees, its rounding being far below; different task vectors differ by about their size.
"""
import math

import torch

from ..ops.hashing import block_key, partition_index
from . import lowrank, mapped, quant

SAMPLES = 16
RTOL = 1e-2
_SEED = 0x5EED
_CHUNK = 1 << 20          # elements per chunk of the pass (all task vectors together)
_PARTS = ("norm", "sum", "sampled values")


def positions(numel):
    """int64 (SAMPLES,): the flat positions, within one task vector of a block of `numel` elements, whose values
    the fingerprint keeps (repeats when numel < SAMPLES; zeros for an empty block)."""
    if numel == 0:
        return torch.zeros(SAMPLES, dtype=torch.int64)
    return partition_index(SAMPLES, block_key(_SEED, numel), numel)


def block_fingerprint(tau):
    """(T, 2 + SAMPLES) float64 on the CPU: norm, sum and sampled values of each task vector of one block (a tensor,
    quant.QuantizedBlock or lowrank.LowRankBlock)."""
    if lowrank.is_lowrank(tau):
        return _lowrank_fingerprint(tau)
    T = tau.shape[0]
    numel = math.prod(tau.shape[1:])
    out = torch.zeros(T, 2 + SAMPLES, dtype=torch.float64, device=tau.device)
    pos = positions(numel).to(tau.device)
    (_quantized_pass if quant.is_quantized(tau) else _dense_pass)(out, tau, numel, pos)
    out[:, 0].sqrt_()
    return out.cpu()


def _quantized_pass(out, tau, numel, pos):
    """Whole rows at a time, dequantised in float64."""
    T, cols = tau.shape[0], tau.cols
    rows = max(1, _CHUNK // max(1, T * cols))
    for r0 in range(0, tau.rows, rows):
        r1 = min(r0 + rows, tau.rows)
        buf = torch.empty(T, (r1 - r0) * cols, dtype=torch.float64, device=tau.device)
        _accumulate(out, tau.dequantize_rows(r0, r1, buf), r0 * cols, pos)
    mapped.release(tau.data)


def _dense_pass(out, tau, numel, pos):
    T = tau.shape[0]
    flat = tau.detach().reshape(T, numel)
    step = max(1, _CHUNK // max(1, T))
    for s in range(0, numel, step):
        e = min(s + step, numel)
        _accumulate(out, flat[:, s:e].to(torch.float64), s, pos)
        if tau.is_contiguous():
            for t in range(T):
                mapped.release(tau, t * numel + s, t * numel + e)


def _accumulate(out, chunk, start, pos):
    """Adds a (T, n) float64 chunk of flat positions [start, start + n) to the squared norms, sums and samples
    in out."""
    out[:, 0] += chunk.square().sum(1)
    out[:, 1] += chunk.sum(1)
    inside = (pos >= start) & (pos < start + chunk.shape[1])
    if inside.any():
        j = inside.nonzero().squeeze(1)
        out[:, 2 + j] = chunk[:, pos[j] - start]


def _lowrank_fingerprint(tau):
    sq, total = lowrank.fingerprint(tau)
    pos = positions(math.prod(tau.shape[1:])).to(tau.device)
    rows, cols = pos // tau.cols, pos % tau.cols
    samples = (tau.bt.to(torch.float64)[:, :, rows] * tau.a.to(torch.float64)[:, :, cols]).sum(1)
    return torch.cat([sq.clamp_min(0).sqrt()[:, None], total[:, None], samples], 1).cpu()


def fingerprint(blocks):
    """(T, B, 2 + SAMPLES) float64: the block_fingerprint of each block of `blocks` (an iterable), in order."""
    return torch.stack([block_fingerprint(tau) for tau in blocks], 1)


def mismatch(saved, ours, names, sources, numels, saved_sources=None):
    """None when two fingerprints (T, B, 2 + SAMPLES) agree, else one line naming the first block and task vector
    that differ and the part that tells them apart (norm, sum or sampled values), then and now. sources: the task
    vectors' names now (saved_sources: then, when known), shown for orientation only."""
    if tuple(saved.shape) != tuple(ours.shape):
        return f"a fingerprint of shape {tuple(saved.shape)} then, {tuple(ours.shape)} now"
    for b, name in enumerate(names):
        for t in range(saved.shape[0]):
            part = _differing_part(saved[t, b], ours[t, b], numels[b])
            if part is not None:
                then, now = _shown(saved[t, b], part), _shown(ours[t, b], part)
                return (f"block {name!r} of task vector {t} ({_source(t, sources, saved_sources)}) holds other values "
                        f"({_PARTS[part]} {then} then, {now} now)")
    return None


def _source(t, sources, saved_sources):
    if saved_sources is None or t >= len(saved_sources) or saved_sources[t] == sources[t]:
        return repr(sources[t])
    return f"{saved_sources[t]!r} then, {sources[t]!r} now"


def _differing_part(a, b, numel):
    """The index in _PARTS of the first part of two rows (2 + SAMPLES,) that differs, or None."""
    scale = max(float(a[0]), float(b[0]))
    for part in (0, 1):
        if abs(float(a[part]) - float(b[part])) > RTOL * scale:
            return part
    sa, sb = a[2:], b[2:]
    sample_scale = max(float(sa.norm()), float(sb.norm()), scale * math.sqrt(SAMPLES / max(1, numel)))
    if float((sa - sb).norm()) > RTOL * sample_scale:
        return 2
    return None


def _shown(row, part):
    if part < 2:
        return f"{float(row[part]):.6g}"
    return "[" + ", ".join(f"{float(v):.4g}" for v in row[2:5]) + ", ...]"


def legacy_mismatch(saved, ours, sources):
    """Against the fingerprint of atlas_fast.coefficients/2 files, [[‖τ_t‖, Σ τ_t]] per task vector over all
    blocks: None when it agrees with `ours` (T, B, 2 + SAMPLES) summed over the blocks, else one line."""
    norms, sums = ours[:, :, 0].square().sum(1).sqrt(), ours[:, :, 1].sum(1)
    for t, ((n0, s0), n1, s1) in enumerate(zip(saved, norms.tolist(), sums.tolist())):
        scale = max(n0, n1, 1e-30)
        if abs(n0 - n1) > RTOL * scale or abs(s0 - s1) > RTOL * scale:
            return (f"task vector {t} ({sources[t]!r}) holds other values (norm {n0:.6g} then, {n1:.6g} now; "
                    f"sum {s0:.6g} then, {s1:.6g} now)")
    return None
