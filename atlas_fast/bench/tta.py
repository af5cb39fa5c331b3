"""Benchmark of test-time adaptation of S streams at once (`atlas-fast bench --mode tta --streams S`).

Every step each stream brings a batch of `batch` images and makes one update of its own coefficients (entropy
loss, AdamW, the online protocol of adapt/online.py). Four ways to do it, each in a fresh process so that its
peak memory is its own:

    grouped     one grouped forward/backward over the S·batch images (OnlineTTA: AtlasModel.groups)
    separate    one composed model, the S streams stepped in turn, each with its own coefficients and AdamW: what S
                separate runs compute (S processes would also hold S copies of θ0 and the bank)
    naive       the paper-style merge stepped in turn: for each stream, every parameter θ0 + Σ_t c_t τ_t built in
                Python and the model run by torch.func.functional_call on the stream's batch
    per_sample  the per-sample merge loop (as FusionBench's WEMoE runs a merged model per sample): θ0 + Σ_t c_t τ_t
                merged and functional_call'ed once per image, its loss backpropagated at once (the least memory
                this way can take)

All four compute the same updates (the test suite checks grouped and separate against separate runs; the
naive and per-sample merges are plain autograd). Measured: time per step and per image (median of the timed
steps), peak memory above the built model and bank (CPU: resident high-water mark; CUDA: peak allocated), and
the ratios of each to grouped. It measures, it asserts nothing.
"""
import os
import statistics
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.func import functional_call

from .common import (
    PeakMemory,
    child_main,
    load_visual,
    machine_info,
    run_children,
    synthetic_bank,
    time_calls,
    versions,
    write_json,
)

VARIANTS = ("grouped", "separate", "naive", "per_sample")
CLASSES = 10


@dataclass
class TTASettings:
    model: str = "ViT-B-32"         # open_clip name or config .json; its visual tower with random weights
    tasks: int = 8
    batch: int = 8                  # images per stream per step
    streams: int = 8
    device: str = "cpu"
    backend: str = "auto"
    bank_dtype: str = "fp32"
    amp: bool = False               # bf16 autocast
    steps: int = 3
    warmup: int = 1
    seed: int = 0
    threads: Optional[int] = None
    lr: float = 1e-3
    out: str = "bench_out"


def _visual(s):
    vit, size, _ = load_visual(s.model, s.seed)
    return vit.requires_grad_(False).to(s.device), size


def _entropy(logits):
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


class Runner:
    """One variant built in this process; step() makes one update of every stream."""

    def __init__(self, variant, s: TTASettings):
        self.variant, self.s = variant, s
        vit, size = _visual(s)
        bank = synthetic_bank(vit, s.tasks, s.bank_dtype, seed=s.seed)
        gen = torch.Generator().manual_seed(s.seed + 1)
        dim = vit.output_dim
        self.head = nn.Linear(dim, CLASSES, bias=False).requires_grad_(False).to(s.device)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(CLASSES, dim, generator=gen) / dim ** 0.5)
        n = s.streams * s.batch
        self.images = [torch.randn(n, 3, *size, generator=gen).to(s.device) for _ in range(2)]
        self.ids = torch.arange(s.streams).repeat_interleave(s.batch)
        self.calls = 0
        if variant in ("grouped", "separate"):
            from ..composer.compose import compose
            self.atlas = compose(vit, bank, backend=s.backend, seed=s.seed)
            shape = self.atlas.coefficients.shape
        else:
            self.vit = vit
            names = [k for k, _ in vit.named_parameters() if k in bank]
            self.theta0 = {k: p for k, p in vit.named_parameters() if k in bank}
            self.tau = {k: bank[k] for k in names}
            shape = (s.tasks, len(names))
        if variant == "grouped":
            from ..adapt.online import OnlineTTA
            self.tta = OnlineTTA(self.atlas, self.head, streams=s.streams, lr=s.lr, amp="bf16" if s.amp else "off")
        else:
            self.rows = [nn.Parameter(torch.zeros(shape, device=s.device)) for _ in range(s.streams)]
            self.opts = [torch.optim.AdamW([r], lr=s.lr, weight_decay=0.0) for r in self.rows]

    def _autocast(self):
        return torch.autocast(torch.device(self.s.device).type, dtype=torch.bfloat16, enabled=self.s.amp)

    def _merged(self, c):
        """θ0 + Σ_t c[t, b] τ_t for every block b, in Python, as the paper's code (and NaiveAtlas) does."""
        return {k: p0 + sum(c[t, b] * tau[t].to(p0.dtype) for t in range(tau.shape[0]))
                for b, ((k, p0), tau) in enumerate(zip(self.theta0.items(), self.tau.values()))}

    def _logits(self, x, c):
        with self._autocast():
            return self.head(functional_call(self.vit, self._merged(c), (x,)).float())

    def step(self):
        x = self.images[self.calls % 2]
        self.calls += 1
        if self.variant == "grouped":
            self.tta.step(x, self.ids)
            return
        B = self.s.batch
        for s, (row, opt) in enumerate(zip(self.rows, self.opts)):
            xs = x[s * B:(s + 1) * B]
            if self.variant == "separate":
                with torch.no_grad():
                    self.atlas.coefficients.copy_(row)
                self.atlas.coefficients.grad = None
                with self._autocast():
                    features = self.atlas(xs)
                _entropy(self.head(features.float())).mean().backward()
                row.grad = self.atlas.coefficients.grad
            elif self.variant == "naive":
                _entropy(self._logits(xs, row)).mean().backward()
            else:
                for i in range(B):
                    (_entropy(self._logits(xs[i:i + 1], row)).sum() / B).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


def measure(variant, s: TTASettings):
    """One variant in this process: {"step_s": [...], "peak_extra_mb": float}."""
    runner = Runner(variant, s)
    peak = PeakMemory(s.device)
    times = time_calls(runner.step, s.steps, s.warmup, s.device)
    return {"step_s": times, "peak_extra_mb": peak.extra_mb()}


def summarise(results, s: TTASettings):
    """Per variant: median step time, time per image, peak, and the ratios to grouped."""
    images = s.streams * s.batch
    rows = {}
    for name, r in results.items():
        med = statistics.median(r["step_s"])
        rows[name] = {"step_s": med, "per_image_ms": med / images * 1e3, "peak_extra_mb": r["peak_extra_mb"]}
    if "grouped" in rows:
        g = rows["grouped"]
        for r in rows.values():
            r["time_vs_grouped"] = r["step_s"] / g["step_s"]
    return rows


def format_table(rows, s: TTASettings):
    lines = [f"{s.model}, T={s.tasks}, S={s.streams} streams x {s.batch} images per step, {s.device}, "
             f"backend={s.backend}, bank {s.bank_dtype}" + (", bf16 autocast" if s.amp else ""),
             f"{'variant':11} {'step':>11} {'per image':>11} {'peak extra':>12} {'x grouped':>10}"]
    for name, r in rows.items():
        ratio = f"{r['time_vs_grouped']:9.2f}x" if "time_vs_grouped" in r else "—"
        lines.append(f"{name:11} {r['step_s'] * 1e3:8.1f} ms {r['per_image_ms']:8.2f} ms "
                     f"{r['peak_extra_mb']:9.1f} MB {ratio:>10}")
    return "\n".join(lines)


def run(s: TTASettings, variants=VARIANTS):
    """Every variant in its own process; prints the table and writes results_tta_S<streams>.json to s.out."""
    results = run_children("atlas_fast.bench.tta", asdict(s), variants)
    rows = summarise(results, s)
    print(format_table(rows, s))
    os.makedirs(s.out, exist_ok=True)
    write_json(os.path.join(s.out, f"results_tta_S{s.streams}.json"),
               {"machine": machine_info(s.device), "versions": versions(), "settings": asdict(s),
                "results": results, "summary": rows})
    return 0 if len(results) == len(variants) else 1


if __name__ == "__main__":
    child_main(lambda job, tick: measure(job["variant"], TTASettings(**job["settings"])))
