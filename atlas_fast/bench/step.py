"""`atlas-fast bench`: every backend against naive merging and against plain fine-tuning.

The run first checks each backend against the naive baseline (same inputs, same random non-zero
coefficients; outputs and coefficient gradients), then measures every variant in a fresh process so
no variant inherits another's allocator state:

    naive     the paper's way: merge every parameter each step, torch.func.functional_call
    finetune  the plain model with every weight trainable, same loss
    floor     not run but computed: finetune's step + two reads of the bank at the memory bandwidth measured
              in the same run (a COPY_BYTES tensor copy on the device, median of several): the least a step of
              any backend can take, as each must read every task vector once in the forward (to merge) and once in
              the backward (to reduce the coefficient gradient) on top of the model's own step
    <backend> atlas_fast.compose(..., backend=<backend>)

--bank-dtype float32 | bfloat16 | float16 (or fp32 | bf16 | fp16, the names results.json records) stores the
bank in that dtype. int8 | int4 stores it quantised (int8 with a scale per row, int4 with a scale per 128
columns; atlas_fast.bank.quant): the backends run on it as it is, the paper-style naive baseline (which has no
quantised storage) on its dequantised float32 copy, so the check compares the same task vectors; backends
that do not dequantise (cuda) are reported unavailable. --rank r makes a low-rank bank instead: random rank-r
factors τ_t = B_t A_t (float32, LoRA-like) for every block of two or more dimensions, which the backends compose
without forming τ (atlas_fast.bank.lowrank); the naive baseline runs on the factors multiplied out.

A step is forward + backward of a scalar loss on a fixed random batch ("step" mode), or forward +
backward + AdamW on the coefficients over a stream of batches ("tta" mode). Step time is the median
over the timed steps after a warm-up (CUDA events on a GPU). Extra peak memory is what one step needs
on top of the built model and bank: on a GPU from the caching allocator's peak; on a CPU from the
process's resident high-water mark, in a process of its own whose glibc returns large freed blocks.

Each job (the check, the bandwidth, a variant's timing, on a CPU its memory) runs in a child process of its own
(common.run_child), which prints one "tick" line per step for the progress bar.
"""
import dataclasses
import difflib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from ..backends import BACKENDS as BACKEND_NAMES
from .common import (
    BANK_DTYPE_SPELLINGS,
    BANK_DTYPES,
    QUANTIZED_BANKS,
    PeakMemory,
    child_main,
    load_visual,
    machine_info,
    median_spread,
    run_child,
    storage_dtype,
    synthetic_bank,
    time_calls,
    versions,
    write_json,
)

BASELINES = ("naive", "finetune")
VARIANTS = BASELINES + BACKEND_NAMES
# Step-time ratios are given against each of these; "floor" is computed, never run.
RATIO_BASES = BASELINES + ("floor",)
SWEEP_PARAMS = ("tasks", "batch")
# Relative-error tolerances against naive (output, coefficient gradient), by compute dtype.
TOLERANCE = {"fp32": (1e-4, 1e-3), "bf16": (3e-2, 6e-2)}
NUM_CLASSES = 10
# glibc: serve blocks of 128 KiB and more by mmap, so freeing them lowers the resident size at once.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
# The bandwidth copy: 256 MiB read and 256 MiB written, more than the last-level cache of the machines measured
# here, so it times memory, not cache; bandwidth = bytes read + bytes written over the copy's median time.
COPY_BYTES = 256 << 20
COPY_REPEATS = 7


@dataclass
class Settings:
    model: str = "ViT-B-32"
    tasks: int = 8
    batch: int = 8
    bank_dtype: str = "fp32"
    rank: Optional[int] = None   # a low-rank bank of random rank-r factors (fp32 only)
    amp: bool = False
    backends: List[str] = field(default_factory=lambda: ["naive", "finetune", "torch"])
    granularity: str = "block"
    partitions: int = 1
    steps: int = 3
    warmup: int = 1
    mode: str = "step"
    device: str = "cpu"
    seed: int = 0
    threads: Optional[int] = None  # torch.set_num_threads in every worker; None keeps torch's default
    sweep: Optional[Tuple[str, List[int]]] = None
    out: str = "bench_out"


def default_settings(device: str) -> Settings:
    """The embedded default for a device: fp32 on a CPU, bf16 bank and bf16 autocast on a GPU."""
    if device.startswith("cuda"):
        return Settings(device=device, bank_dtype="bf16", amp=True, steps=20, warmup=3,
                        backends=list(BASELINES + BACKEND_NAMES))
    return Settings(device=device)


def parse_sweep(text: str) -> Tuple[str, List[int]]:
    param, sep, values = text.partition("=")
    if not sep or param not in SWEEP_PARAMS:
        raise ValueError(f"--sweep {text!r}: expected tasks=1,4,8 or batch=1,8,32")
    try:
        points = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sweep {text!r}: values must be integers") from None
    if not points or min(points) < 1:
        raise ValueError(f"--sweep {text!r}: give one or more positive integers")
    return param, points


def validate(s: Settings) -> None:
    """Raises ValueError naming the offending option."""
    import open_clip
    import torch

    for name in ("tasks", "batch", "partitions", "steps"):
        if getattr(s, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(s, name)}")
    if s.warmup < 0:
        raise ValueError(f"--warmup must be 0 or more, got {s.warmup}")
    if s.threads is not None and s.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {s.threads}")
    if s.bank_dtype not in BANK_DTYPES:
        raise ValueError(f"--bank-dtype {s.bank_dtype!r}: expected one of {', '.join(BANK_DTYPE_SPELLINGS)}")
    for name, allowed in (("granularity", ("block", "task")), ("mode", ("step", "tta"))):
        if getattr(s, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(s, name)!r}: expected one of {', '.join(allowed)}")
    if s.rank is not None:
        if s.rank < 1:
            raise ValueError(f"--rank must be at least 1, got {s.rank}")
        if s.bank_dtype != "fp32" or s.partitions > 1:
            raise ValueError(f"--rank {s.rank}: a low-rank bank holds float32 factors and takes --partitions 1 "
                             f"(got --bank-dtype {s.bank_dtype}, --partitions {s.partitions})")
    if s.granularity == "task" and s.partitions > 1:
        raise ValueError(f"--partitions {s.partitions} needs --granularity block: partitions split each block, "
                         "and --granularity task has one coefficient per task vector")
    if not s.model.endswith(".json") and s.model not in open_clip.list_models():
        known = open_clip.list_models()
        close = difflib.get_close_matches(s.model, known, n=5)
        raise ValueError(f"--model {s.model!r} is not an open_clip architecture"
                         + (f"; close matches: {', '.join(close)}" if close else "")
                         + f"; e.g. ViT-B-32, ViT-B-16, ViT-L-14 ({len(known)} in open_clip.list_models()),"
                           " or a path to an open_clip model config .json")
    if s.model.endswith(".json"):
        _check_model_config(s.model)
    unknown = [b for b in s.backends if b not in VARIANTS]
    if unknown or not s.backends:
        raise ValueError(f"--backends {','.join(s.backends)!r}: expected a comma list among {', '.join(VARIANTS)}")
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {s.device}: no CUDA device is available here")
    try:
        torch.device(s.device)
    except RuntimeError:
        raise ValueError(f"--device {s.device!r}: not a torch device") from None
    _check_backends_run(s.backends, torch.device(s.device))
    _check_out(s.out)


def _check_backends_run(backends, device):
    """Off a GPU every backend's reason not to run is known at once: refuse it here, not in a child process. (On a
    CPU Triton runs in its interpreter, which the children switch on; on a GPU the CUDA backend's check builds its
    extension, which the children do.)"""
    from ..backends import get_backend
    if device.type == "cuda":
        return
    for name in backends:
        if name in BASELINES or (name == "triton" and device.type == "cpu"):
            continue
        reason = get_backend(name).unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"--backends {name}: cannot run on {device}: {reason}")


def _check_model_config(path):
    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError as e:
        raise ValueError(f"--model {path!r}: cannot read the model config ({e.strerror})") from None
    except ValueError as e:
        raise ValueError(f"--model {path!r}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "embed_dim" not in cfg:
        raise ValueError(f"--model {path!r}: an open_clip model config needs 'embed_dim' and 'vision_cfg'")


def _check_out(out):
    """Creates the output folder and a file in it now, so a bad --out fails before any variant runs."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"--out {out!r}: cannot write results there ({e.strerror or e})") from None


def warnings(s: Settings) -> List[str]:
    """Settings that are valid but probably not what was meant, to say before the run starts."""
    notes = []
    if s.device == "cpu" and "triton" in s.backends:
        notes.append("--backends triton on a CPU runs the Triton interpreter: expect minutes per step, "
                     "not seconds (its CPU timings say nothing about the kernels' speed on a GPU)")
    if s.backends and "finetune" not in s.backends:
        notes.append("no floor row: the floor is computed from finetune's step, which is not among --backends")
    return notes


# ---------------------------------------------------------------- the worker side

def _bank_bytes_per_task(model, bank_dtype, rank=None):
    """Bytes of one task vector over the model's floating parameters in this storage dtype (scales included), or
    as rank-`rank` float32 factors."""
    from ..bank import lowrank, quant
    params = [p for p in model.parameters() if p.is_floating_point()]
    if rank is not None:
        return sum(4 * (rank * (p.shape[0] + p.numel() // p.shape[0]) if lowrank.factorable(p.shape) else p.numel())
                   for p in params)
    if bank_dtype in QUANTIZED_BANKS:
        return sum(quant.storage_bytes(p.shape, bank_dtype) for p in params)
    return sum(p.numel() for p in params) * {"fp32": 4, "bf16": 2, "fp16": 2}[bank_dtype]


def _load_model(s: Settings):
    """The visual tower of the settings' architecture with random weights, the same in every process."""
    return load_visual(s.model, s.seed)


def _bank(model, s: Settings):
    """The synthetic bank of the settings (--tasks, --bank-dtype, --rank, --seed)."""
    return synthetic_bank(model, s.tasks, s.bank_dtype, s.rank, s.seed)


class Runner:
    """One variant built in this process: the module, its trainable tensors, data and the step."""

    def __init__(self, s: Settings, variant: str, bank=None):
        import torch

        self.s, self.variant = s, variant
        self.device = torch.device(s.device)
        if self.device.type == "cuda":  # CUDA events and memory statistics follow the current device
            torch.cuda.set_device(self.device)
        model, size, dim = _load_model(s)
        model.to(self.device)
        gen = torch.Generator().manual_seed(s.seed + 1)  # the data: the same batches for every variant
        if bank is None and variant != "finetune":
            bank = _bank(model, s)
        self.bank = bank
        if variant == "finetune":
            self.net = model
            self.trainable = [p.requires_grad_() for p in model.parameters()]
        else:
            model.requires_grad_(False)
            if variant == "naive":
                from .naive import NaiveAtlas
                dense = s.bank_dtype in QUANTIZED_BANKS or s.rank is not None
                plain = bank.to(dtype=storage_dtype("fp32")) if dense else bank
                self.net = NaiveAtlas(model, plain, granularity=s.granularity, partitions=s.partitions, seed=s.seed)
            else:
                from ..composer.compose import compose
                self.net = compose(model, bank, granularity=s.granularity, partitions=s.partitions,
                                   backend=variant, seed=s.seed)
            coef = self.net.coefficients
            coef_gen = torch.Generator().manual_seed(s.seed + 2)
            with torch.no_grad():
                coef.copy_(torch.rand(coef.shape, generator=coef_gen) * 1.6 - 0.8)
            self.trainable = [coef]
        pool = 4 if s.mode == "tta" else 1
        self.images = [torch.randn(s.batch, 3, *size, generator=gen).to(self.device) for _ in range(pool)]
        self.labels = torch.randint(NUM_CLASSES, (s.batch,), generator=gen).to(self.device)
        self.head = (torch.randn(NUM_CLASSES, dim, generator=gen) / dim ** 0.5).to(self.device)
        self.opt = torch.optim.AdamW(self.trainable, lr=1e-3) if s.mode == "tta" else None
        self.calls = 0

    def loss(self, features):
        import torch.nn.functional as F

        logits = features.float() @ self.head.t()
        if self.s.mode == "tta":
            logp = logits.log_softmax(-1)
            return -(logp.exp() * logp).sum(-1).mean()
        return F.cross_entropy(logits, self.labels)

    def forward(self, images):
        import torch

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.s.amp):
            return self.net(images)

    def step(self):
        images = self.images[self.calls % len(self.images)]
        self.calls += 1
        for p in self.trainable:
            p.grad = None
        self.loss(self.forward(images)).backward()
        if self.opt is not None:
            self.opt.step()

    def release(self):
        """Drop what a step creates (gradients, optimizer state) so the next step has to make it again."""
        for p in self.trainable:
            p.grad = None
        if self.opt is not None:
            self.opt.state.clear()
        gc.collect()

    def output_and_grad(self):
        """Features and coefficient gradient on the first batch, for the check against naive."""
        for p in self.trainable:
            p.grad = None
        out = self.forward(self.images[0])
        self.loss(out).backward()
        return out.detach().float().cpu(), self.trainable[0].grad.detach().float().cpu()


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def unavailable_reason(name, device):
    """None when backend `name` runs on `device`, else why not."""
    from ..backends import get_backend
    try:
        return get_backend(name).unavailable_reason(device)
    except Exception as e:  # a backend that cannot even be imported is unavailable, with the reason
        return f"{type(e).__name__}: {e}"


def _check(s: Settings, tick):
    """Each backend against naive on the same batch and coefficients: relative errors and a verdict."""
    import torch

    tol_out, tol_grad = TOLERANCE["bf16" if s.amp else "fp32"]
    naive = Runner(s, "naive")
    bank = naive.bank
    ref_out, ref_grad = naive.output_and_grad()
    del naive
    gc.collect()
    tick()
    report = {}
    for name in s.backends:
        if name in BASELINES:
            continue
        reason = unavailable_reason(name, torch.device(s.device))
        if reason is not None:
            report[name] = {"status": "unavailable", "note": reason}
            tick()
            continue
        try:
            out, grad = Runner(s, name, bank).output_and_grad()
        except Exception as e:  # one failing backend must not hide the others
            report[name] = {"status": "error", "note": f"{type(e).__name__}: {e}"}
            tick()
            continue
        gc.collect()
        e_out, e_grad = _rel_err(out, ref_out), _rel_err(grad, ref_grad)
        ok = e_out <= tol_out and e_grad <= tol_grad
        report[name] = {"status": "ok" if ok else "mismatch", "rel_err_out": e_out, "rel_err_grad": e_grad,
                        "note": "" if ok else f"beyond tolerance ({tol_out:g} out, {tol_grad:g} grad)"}
        tick()
    return report


def _time(s: Settings, variant, tick):
    """Step times; on a GPU also the extra peak memory of one more step (on a CPU: _memory, in a process of its
    own)."""
    import torch

    runner = Runner(s, variant)
    times = time_calls(runner.step, s.steps, s.warmup, runner.device, tick)
    result = {"step_times_s": times, "torch_threads": torch.get_num_threads()}
    if runner.device.type == "cuda":
        runner.release()
        peak = PeakMemory(runner.device)
        runner.step()
        result["peak_extra_mb"] = peak.extra_mb()
    return result


def _bandwidth(s: Settings, tick):
    """Device memory bandwidth from a large tensor copy (median of COPY_REPEATS after one warm-up), the
    number of floating parameters the bank holds task vectors for and the bytes of one task vector."""
    import torch

    model, _, _ = _load_model(s)
    params = sum(p.numel() for p in model.parameters() if p.is_floating_point())
    per_task = _bank_bytes_per_task(model, s.bank_dtype, s.rank)
    del model
    src = torch.ones(COPY_BYTES // 4, device=torch.device(s.device))
    dst = torch.empty_like(src)
    times = time_calls(lambda: dst.copy_(src), COPY_REPEATS, 1, s.device)
    tick()
    return {"copy_times_s": times, "bandwidth_gb_s": 2 * COPY_BYTES / statistics.median(times) / 1e9,
            "bank_params": params, "bank_bytes_per_task": per_task}


def _memory(s: Settings, variant, tick):
    """CPU: resident high-water mark of one step above the resident size just before it."""
    runner = Runner(s, variant)
    runner.step()  # warm-up: libraries page in their code and thread pools start outside the measurement
    tick()
    runner.release()
    peak = PeakMemory("cpu")
    runner.step()
    extra = peak.extra_mb()
    tick()
    return {"peak_extra_mb": extra}


def _run_worker_job(job, tick):
    """The child side of _run_job."""
    s = Settings(**job["settings"])
    if job["kind"] == "check":
        return _check(s, tick)
    if job["kind"] == "time":
        return _time(s, job["variant"], tick)
    if job["kind"] == "bandwidth":
        return _bandwidth(s, tick)
    return _memory(s, job["variant"], tick)


# ---------------------------------------------------------------- the parent side

def _run_job(job, bar, env=None):
    """Runs one job in a fresh Python process (common.run_child), its steps advancing `bar`; returns its result,
    or raises RuntimeError with its stderr."""
    return run_child("atlas_fast.bench.step", job, env, on_tick=lambda: bar.update(1))


def _summarise(entry, batch):
    median, spread = median_spread(entry["step_times_s"])
    entry["step_time_s"] = median
    entry["step_time_spread_s"] = spread
    entry["images_per_s"] = batch / median


def _floor(variants, bandwidth, s: Settings):
    """The floor row: finetune's step time plus two reads of the bank at the measured bandwidth."""
    finetune = next((v for v in variants if v["name"] == "finetune"), None)
    row = {"name": "floor", "tasks": s.tasks, "batch": s.batch, "status": "ok", "step_time_s": None, "step_times_s": [],
           "peak_extra_mb": None, "images_per_s": None, "note": ""}
    if finetune is None or finetune["step_time_s"] is None or bandwidth is None:
        row.update(status="not computed", note="needs a timed finetune and the bandwidth measurement")
        return row
    bank_bytes = s.tasks * bandwidth["bank_bytes_per_task"]
    bank_time = 2 * bank_bytes / (bandwidth["bandwidth_gb_s"] * 1e9)
    row.update(step_time_s=finetune["step_time_s"] + bank_time, step_time_spread_s=finetune["step_time_spread_s"],
               images_per_s=s.batch / (finetune["step_time_s"] + bank_time), bank_gb=bank_bytes / 1e9,
               bandwidth_gb_s=bandwidth["bandwidth_gb_s"], copy_times_s=bandwidth["copy_times_s"],
               bank_read_time_s=bank_time,
               note=f"finetune step + 2 reads of the {bank_bytes / 1e9:.2f} GB bank at "
                    f"{bandwidth['bandwidth_gb_s']:.1f} GB/s (copy of {COPY_BYTES >> 20} MiB, median of "
                    f"{COPY_REPEATS})")
    return row


def _ratios(variants):
    by_name = {v["name"]: v for v in variants}
    for v in variants:
        for base in RATIO_BASES:
            ref = by_name.get(base, {})
            for key, metric in (("time", "step_time_s"), ("mem", "peak_extra_mb")):
                if base == "floor" and key == "mem":
                    continue
                a, b = v.get(metric), ref.get(metric)
                v[f"{key}_vs_{base}"] = a / b if a is not None and b else None


def _measure_point(s: Settings, bar, variants, save):
    """All variants at one setting, appended to `variants`: the check, then one timing (and on a CPU one memory)
    process each. Calls save() after every process, so an interrupted run keeps what it measured."""
    variants.extend({"name": n, "tasks": s.tasks, "batch": s.batch, "status": "ok", "note": "", "step_time_s": None,
                     "step_times_s": [], "peak_extra_mb": None, "images_per_s": None} for n in s.backends)
    cpu = s.device == "cpu"
    per_variant = s.warmup + s.steps + (2 if cpu else 0)
    backends = [v for v in variants if v["name"] not in BASELINES]
    if backends and "naive" in s.backends:
        bar.set_postfix_str(f"T={s.tasks} B={s.batch} check")
        try:
            report = _run_job({"kind": "check", "settings": dataclasses.asdict(s)}, bar)
        except RuntimeError as e:
            report = {v["name"]: {"status": "error", "note": f"check failed: {e}"} for v in backends}
        for v in backends:
            v.update(report[v["name"]])
        save()
    elif backends:
        for v in backends:
            v["note"] = "not checked: naive is not among --backends"
    bandwidth = None
    if "finetune" in s.backends:
        bar.set_postfix_str(f"T={s.tasks} B={s.batch} bandwidth")
        try:
            bandwidth = _run_job({"kind": "bandwidth", "settings": dataclasses.asdict(s)}, bar)
        except RuntimeError as e:
            bandwidth = None
            print(f"atlas-fast bench: bandwidth measurement failed, no floor row: {e}", file=sys.stderr)
    for v in list(variants):
        if v["status"] != "ok":
            bar.total -= per_variant
            bar.refresh()
            continue
        bar.set_postfix_str(f"T={s.tasks} B={s.batch} {v['name']}")
        try:
            v.update(_run_job({"kind": "time", "variant": v["name"], "settings": dataclasses.asdict(s)}, bar))
            if cpu:
                v.update(_run_job({"kind": "memory", "variant": v["name"], "settings": dataclasses.asdict(s)},
                                  bar, env=MEMORY_ENV))
            _summarise(v, s.batch)
        except RuntimeError as e:
            v.update(status="error", note=str(e), step_time_s=None, step_times_s=[], peak_extra_mb=None)
        if v["name"] == "finetune":
            variants.insert(variants.index(v) + 1, _floor(variants, bandwidth, s))
        _ratios(variants)
        save()


def _fmt(x, spec, missing="—"):
    return missing if x is None else format(x, spec)


def format_table(variants) -> str:
    head = ["variant", "step time s (median ± half range)", "images/s", "extra peak MB", "time ×floor", "time ×naive",
            "time ×finetune", "mem ×naive", "mem ×finetune", "rel err out", "rel err grad"]
    rows = []
    for v in variants:
        if v["step_time_s"] is None:
            timing = [f"not timed: {v['status']}"] + [""] * 8
        else:
            timing = [f"{v['step_time_s']:.3f} ± {v['step_time_spread_s']:.3f}", f"{v['images_per_s']:.1f}",
                      _fmt(v["peak_extra_mb"], ".0f"), _fmt(v.get("time_vs_floor"), ".2f"),
                      _fmt(v.get("time_vs_naive"), ".2f"), _fmt(v.get("time_vs_finetune"), ".2f"),
                      _fmt(v.get("mem_vs_naive"), ".2f"), _fmt(v.get("mem_vs_finetune"), ".2f")]
        rows.append([v["name"]] + timing + [_fmt(v.get("rel_err_out"), ".1e"), _fmt(v.get("rel_err_grad"), ".1e")])
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {v['name']}: {v['note']}" for v in variants if v.get("note")]
    return "\n".join(lines + notes)


def _describe(s: Settings) -> str:
    amp = "bf16 autocast" if s.amp else "no autocast"
    partitions = f" ×{s.partitions}" if s.partitions > 1 else ""
    param, values = s.sweep or (None, None)
    tasks = ",".join(map(str, values)) if param == "tasks" else s.tasks
    batch = ",".join(map(str, values)) if param == "batch" else s.batch
    bank = s.bank_dtype if s.rank is None else f"rank {s.rank} (fp32 factors)"
    return (f"{os.path.basename(s.model)}, T={tasks}, batch {batch}, bank {bank}, {amp}, "
            f"{s.granularity}{partitions}, {s.mode} mode, {s.device}"
            + (f", {s.threads} thread{'s' if s.threads > 1 else ''}" if s.threads else ""))


def plot_point(variants, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed_all = [v for v in variants if v["step_time_s"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in ((axes[0], "step_time_s", "step time (s), median ± half range"),
                              (axes[1], "peak_extra_mb", "extra peak memory (MB)")):
        timed = [v for v in timed_all if metric == "step_time_s" or v["name"] != "floor"]  # the floor has no memory
        names = [v["name"] for v in timed]
        values = [v[metric] or 0.0 for v in timed]
        colors = {"floor": "#ffffff"}
        bars = ax.bar(names, values, color=[colors.get(n, "#999999" if n in BASELINES else "#1f77b4") for n in names],
                      edgecolor="black", hatch=["//" if n == "floor" else "" for n in names])
        spread = [v["step_time_spread_s"] if metric == "step_time_s" else 0.0 for v in timed]
        if metric == "step_time_s":
            ax.errorbar(names, values, yerr=spread, fmt="none", ecolor="black", capsize=4)
        bases = ("floor", "naive") if metric == "step_time_s" else ("naive",)
        prefix = "time" if metric == "step_time_s" else "mem"
        for bar, v, top in zip(bars, timed, spread):
            text = "\n".join(f"×{v[f'{prefix}_vs_{b}']:.2f} {b}" for b in bases
                             if v.get(f"{prefix}_vs_{b}") is not None and v["name"] != b)
            if text:
                ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height() + top),
                            ha="center", va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
        ax.set_ylabel(label)
        ax.margins(y=0.15)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(points, param, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(dict.fromkeys(v["name"] for p in points for v in p["variants"]))
    for name in names:
        series = [(p[param], v) for p in points for v in p["variants"] if v["name"] == name and v["step_time_s"]]
        if not series:
            continue
        xs = [x for x, _ in series]
        if name == "floor":
            axes[0].plot(xs, [v["step_time_s"] for _, v in series], "k--", marker="x", label=name)
            continue
        axes[0].errorbar(xs, [v["step_time_s"] for _, v in series], yerr=[v["step_time_spread_s"] for _, v in series],
                         marker="o", capsize=3, label=name)
        axes[1].plot(xs, [v["peak_extra_mb"] or 0.0 for _, v in series], marker="o", label=name)
    axes[0].set_ylabel("step time (s), median ± half range")
    axes[1].set_ylabel("extra peak memory (MB)")
    for ax in axes:
        ax.set_xlabel("task vectors T" if param == "tasks" else "batch size")
        ax.set_xticks([p[param] for p in points])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(s: Settings) -> int:
    """Runs the benchmark; prints the table, writes results.json and a plot under s.out. Returns an exit status:
    1 when a backend disagreed with naive or a variant failed, else 0."""
    from tqdm import tqdm

    os.makedirs(s.out, exist_ok=True)
    param, values = s.sweep if s.sweep else (None, [None])
    settings = [dataclasses.replace(s, **{param: x}) if param else s for x in values]
    results = {"machine": machine_info(s.device), "versions": versions(), "settings": dataclasses.asdict(s)}
    if s.threads is not None:
        results["machine"]["torch_threads"] = s.threads
    json_path = os.path.join(s.out, "results.json")
    for note in warnings(s):
        print(f"atlas-fast bench: warning: {note}", file=sys.stderr)
    print(f"atlas-fast bench: {_describe(s)}")
    print(f"  {s.warmup} warm-up + {s.steps} timed steps per variant, each variant in a fresh process"
          + (" (timing and memory in separate processes)" if s.device == "cpu" else "")
          + "; timings are noisy when other work runs on the machine")
    per_variant = s.warmup + s.steps + (2 if s.device == "cpu" else 0)
    checks = 1 + sum(b not in BASELINES for b in s.backends) if "naive" in s.backends else 0
    checks += 1 if "finetune" in s.backends else 0  # the bandwidth measurement
    points = []
    started = time.time()
    with tqdm(total=len(settings) * (checks + per_variant * len(s.backends)), unit="step", file=sys.stderr) as bar:
        for point in settings:
            variants = []
            if param:
                points.append({param: getattr(point, param), "variants": variants})
                results.update(sweep={"param": param, "values": values}, points=points)
            else:
                results["variants"] = variants
            _measure_point(point, bar, variants, lambda: write_json(json_path, results))
    results["wall_time_s"] = time.time() - started
    results["machine"]["load_avg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    write_json(json_path, results)
    for p in points or [{"variants": results["variants"]}]:
        if param:
            print(f"\n{param} = {p[param]}")
        print(format_table(p["variants"]))
    plot_path = os.path.join(s.out, f"sweep_{param}.png" if param else "bench.png")
    try:
        if param:
            plot_sweep(points, param, plot_path, f"atlas-fast bench, sweep over {param}: {_describe(s)}")
        else:
            plot_point(results["variants"], plot_path, f"atlas-fast bench: {_describe(s)}")
    except ImportError as e:  # the numbers are in results.json; a machine without matplotlib still gets them
        plot_path = f"no plot ({e})"
    print(f"\nwrote {json_path} and {plot_path} ({results['wall_time_s']:.0f} s)")
    every = [v for p in points for v in p["variants"]] if param else results["variants"]
    return 1 if any(v["status"] in ("mismatch", "error") for v in every) else 0


if __name__ == "__main__":
    child_main(_run_worker_job)
