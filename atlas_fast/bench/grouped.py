"""Benchmark of grouped compositions: one batch carrying G coefficient sets (AtlasModel.groups) against
(a) G separate composed runs, one per group's samples, and (b) G materialised merged models (merge(), kept
resident as a server would). Each variant runs in a fresh process so that its peak memory is its own.

Measured per variant: the inference forward and (for the two composed variants) the training step, forward
and backward into the coefficients; median and spread over the timed steps; peak memory above the composed
model's own footprint (CPU: resident high-water mark; CUDA: peak allocated). It measures, it asserts nothing.
"""
import os
import statistics
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .common import (
    PeakMemory,
    child_main,
    load_visual,
    median_spread,
    proc_field,
    run_children,
    synthetic_bank,
    time_calls,
    write_json,
)

VARIANTS = ("grouped", "separate", "merged")


@dataclass
class GroupSettings:
    model: str = "ViT-B-32"      # open_clip architecture name; its visual tower with random weights
    tasks: int = 8
    batch: int = 8
    groups: int = 4
    device: str = "cpu"
    backend: str = "auto"
    bank_dtype: str = "fp32"
    rank: Optional[int] = None   # a low-rank bank of random rank-r factors (fp32 only)
    granularity: str = "block"
    partitions: int = 1
    steps: int = 3
    warmup: int = 1
    seed: int = 0
    threads: Optional[int] = None  # torch.set_num_threads in every worker; None keeps torch's default
    out: str = "bench_out"


def _build(s: GroupSettings, vit=None):
    """(composed model, grouped coefficients (G, ...), index, images) on s.device."""
    import atlas_fast
    torch.manual_seed(s.seed)
    if vit is None:
        vit, _, _ = load_visual(s.model, s.seed)
    vit = vit.to(s.device)
    bank = synthetic_bank(vit, s.tasks, s.bank_dtype, s.rank, s.seed)
    model = atlas_fast.compose(vit, bank, s.granularity, s.partitions, backend=s.backend, seed=s.seed)
    coef = torch.rand(s.groups, *model.coefficients.shape, device=s.device) * 0.6 - 0.3
    index = torch.arange(s.batch, device=s.device) % s.groups
    size = vit.image_size[0] if isinstance(vit.image_size, tuple) else vit.image_size
    images = torch.randn(s.batch, 3, size, size, device=s.device)
    return model, coef, index, images


class _Variant:
    def __init__(self, name, model, coef, index, images):
        self.name, self.model, self.coef, self.index, self.images = name, model, coef, index, images
        self.samples = [(g, (index == g).nonzero().squeeze(1)) for g in range(coef.shape[0])]
        self.samples = [(g, s) for g, s in self.samples if s.numel()]
        self.merged = {}
        if name == "merged":
            _check_room(model, len(self.samples), images.device)
            for g, _ in self.samples:
                self._set(g)
                self.merged[g] = model.merge()

    def _set(self, g):
        with torch.no_grad():
            self.model.coefficients.copy_(self.coef[g])

    @torch.no_grad()
    def infer(self):
        if self.name == "grouped":
            with self.model.groups(self.index, self.coef):
                return self.model(self.images)
        for g, s in self.samples:
            if self.name == "merged":
                self.merged[g](self.images[s])
            else:
                self._set(g)
                self.model(self.images[s])

    def train(self):
        if self.name == "grouped":
            coef = self.coef.detach().requires_grad_()
            with self.model.groups(self.index, coef):
                self.model(self.images).float().square().mean().backward()
            return
        for g, s in self.samples:
            self._set(g)
            self.model.coefficients.grad = None
            self.model(self.images[s]).float().square().mean().backward()


def _check_room(model, copies, device):
    """Refuse to build `copies` merged models that cannot fit, rather than swap or be killed."""
    need = copies * sum(p0.numel() * p0.element_size() for _, p0, _ in model._theta0_and_tau())
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = int(proc_field("/proc/meminfo", "MemAvailable:").split()[0]) * 1024
    if need > 0.9 * free:
        raise MemoryError(f"{copies} merged models need {need / 1e9:.1f} GB; {free / 1e9:.1f} GB available")


def measure(variant, s: GroupSettings, vit=None):
    """One variant in this process: {"infer_s": [...], "train_s": [...] or None, "peak_extra_mb": float}."""
    model, coef, index, images = _build(s, vit)
    peak = PeakMemory(s.device)
    runner = _Variant(variant, model, coef, index, images)
    result = {"infer_s": time_calls(runner.infer, s.steps, s.warmup, s.device),
              "train_s": time_calls(runner.train, s.steps, s.warmup, s.device) if variant != "merged" else None}
    result["peak_extra_mb"] = peak.extra_mb()
    return result


def _fmt(times):
    if not times:
        return "—"
    med, spread = median_spread(times)
    return f"{med * 1e3:9.1f} ms ±{spread * 1e3:.1f}"


def format_table(results, s: GroupSettings):
    lines = [f"{s.model}, T={s.tasks}, batch {s.batch} in {s.groups} groups, {s.device}, backend={s.backend}, "
             f"bank {s.bank_dtype if s.rank is None else f'rank {s.rank}'}, {s.granularity}"
             + (f" x{s.partitions}" if s.partitions > 1 else ""),
             f"{'variant':10} {'inference':>20} {'training step':>20} {'peak extra':>12} {'vs grouped':>11}"]
    ref = statistics.median(results["grouped"]["infer_s"]) if "grouped" in results else None
    for name, r in results.items():
        ratio = f"{statistics.median(r['infer_s']) / ref:10.2f}x" if ref else "—"
        lines.append(f"{name:10} {_fmt(r['infer_s']):>20} {_fmt(r['train_s']):>20} "
                     f"{r['peak_extra_mb']:9.1f} MB {ratio:>11}")
    return "\n".join(lines)


def run(s: GroupSettings, variants=VARIANTS):
    """Every variant in its own process; prints the table and writes results_groups.json to s.out."""
    results = run_children("atlas_fast.bench.grouped", asdict(s), variants)
    print(format_table(results, s))
    os.makedirs(s.out, exist_ok=True)
    write_json(os.path.join(s.out, "results_groups.json"), {"settings": asdict(s), "results": results})
    return 0 if len(results) == len(variants) else 1


if __name__ == "__main__":
    child_main(lambda job, tick: measure(job["variant"], GroupSettings(**job["settings"])))
