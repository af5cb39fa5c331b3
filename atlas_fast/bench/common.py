"""What the benchmarks share (step.py, grouped.py, tta.py): the tower and synthetic bank they measure on, the
fresh process each measurement runs in, the timing loop, peak-memory reading, and the record of the machine and
versions beside the numbers.

A child runs as `python -m <module> JOB.json RESULT.json`: child_main reads the job, runs it, and writes the
result as JSON; a line "tick" on its stdout marks one step done (the parent's progress bar).
"""
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from ..bank import quant
from ..io.atomic import write_text

FLOAT_BANK_DTYPES = ("fp32", "bf16", "fp16")
QUANTIZED_BANKS = quant.FORMATS
BANK_DTYPES = FLOAT_BANK_DTYPES + QUANTIZED_BANKS
# --bank-dtype also takes the bank command's names (atlas-fast bank --dtype); settings, tables and results keep
# the short ones
BANK_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
BANK_DTYPE_SPELLINGS = (*BANK_DTYPE_ALIASES, *QUANTIZED_BANKS, *FLOAT_BANK_DTYPES)


def bank_dtype_name(text):
    """The --bank-dtype name of `text`: float32 -> fp32, bfloat16 -> bf16, float16 -> fp16, any other unchanged."""
    return BANK_DTYPE_ALIASES.get(text, text)


def storage_dtype(bank_dtype):
    """The dtype of TaskVectors.to for a --bank-dtype ("int4" is a string: not every torch has a 4-bit dtype)."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8,
            "int4": "int4"}[bank_dtype]


# -- what is measured

def load_visual(model, seed):
    """(visual tower, (height, width), embed_dim) of an open_clip architecture name or model config .json, with
    random weights seeded by `seed`: the same in every process."""
    import open_clip

    name = model
    if name.endswith(".json"):
        open_clip.add_model_config(name)
        name = os.path.splitext(os.path.basename(name))[0]
    torch.manual_seed(seed)
    clip = open_clip.create_model(name, pretrained=None)
    cfg = open_clip.get_model_config(name)
    size = cfg["vision_cfg"]["image_size"]
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return clip.visual.eval(), size, cfg["embed_dim"]


def synthetic_bank(model, tasks, bank_dtype="fp32", rank=None, seed=0):
    """T synthetic task vectors of `model` stored as --bank-dtype: a quantised bank quantised from float32 task
    vectors; with `rank` a low-rank bank of random rank-r factors (float32)."""
    from ..bank.task_vectors import synthetic_task_vectors
    if rank is not None:
        return synthetic_task_vectors(model, tasks, seed=seed, rank=rank)
    if bank_dtype in QUANTIZED_BANKS:
        return synthetic_task_vectors(model, tasks, seed=seed).to(dtype=storage_dtype(bank_dtype))
    return synthetic_task_vectors(model, tasks, dtype=storage_dtype(bank_dtype), seed=seed)


# -- the child processes

def run_child(module, job, env=None, on_tick=None):
    """The result of `job` run by `python -m <module>` in a fresh process (so that its allocator state and peak
    memory are its own); on_tick() for each "tick" line it prints. RuntimeError with its exit status and the tail
    of its stderr when it fails. On a CPU the child runs Triton in its interpreter (Triton runs CPU tensors only
    there); the child is killed if this process is interrupted while it runs."""
    with tempfile.TemporaryDirectory(prefix="atlas_bench_") as tmp:
        job_path, result_path, err_path = (os.path.join(tmp, n) for n in ("job.json", "result.json", "stderr"))
        with open(job_path, "w") as f:
            json.dump(job, f)
        child_env = dict(os.environ, **(env or {}))
        if job["settings"]["device"] == "cpu":
            child_env["TRITON_INTERPRET"] = "1"
        with open(err_path, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", module, job_path, result_path],
                                    stdout=subprocess.PIPE, stderr=err, text=True, env=child_env)
            try:
                for line in proc.stdout:
                    if line.strip() == "tick" and on_tick is not None:
                        on_tick()
                proc.wait()
            finally:
                if proc.poll() is None:
                    proc.kill()
        if proc.returncode != 0 or not os.path.exists(result_path):
            with open(err_path) as f:
                tail = f.read().strip().splitlines()[-6:]
            raise RuntimeError(f"exit status {proc.returncode}: " + " | ".join(tail))
        with open(result_path) as f:
            return json.load(f)


def run_children(module, settings, variants, env=None):
    """{variant: its result} of the job {"settings", "variant"} run for each variant in its own process
    (run_child); a variant whose process fails is reported on stderr and left out."""
    results = {}
    for variant in variants:
        try:
            results[variant] = run_child(module, {"settings": settings, "variant": variant}, env)
        except RuntimeError as e:
            print(f"{variant}: failed: {e}", file=sys.stderr)
    return results


def child_main(run):
    """The child side of run_child: the job of the file sys.argv[1] run as run(job, tick), its result written to
    sys.argv[2] (atomically: a child killed while writing leaves no result). The job's settings.threads, when
    set, is torch's thread count for the whole child."""
    job_path, result_path = sys.argv[1:3]
    with open(job_path) as f:
        job = json.load(f)
    threads = job["settings"].get("threads")
    if threads is not None:
        torch.set_num_threads(threads)
    result = run(job, lambda: print("tick", flush=True))
    write_text(result_path, json.dumps(result))


# -- measuring

def time_calls(fn, calls, warmup=0, device="cpu", tick=None):
    """Seconds of each of `calls` calls of fn() after `warmup` untimed ones; tick() after every call. On a GPU by
    CUDA events on the device's current stream (from the first kernel of a call to the end of its last, host stalls
    in between included), on a CPU by the host clock."""
    device = torch.device(device)
    times = []
    for i in range(warmup + calls):
        if device.type == "cuda":
            stream = torch.cuda.current_stream(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
        if tick is not None:
            tick()
    return times


def median_spread(times):
    """(median, half the range) of a list of timings."""
    return statistics.median(times), (max(times) - min(times)) / 2


def proc_field(path, name):
    """The text after the colon of the first line of a /proc file that starts with `name`, or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def proc_status_kb(name):
    """A kB field of /proc/self/status (VmRSS, VmHWM, ...) as an int."""
    value = proc_field("/proc/self/status", name + ":")
    if value is None:
        raise RuntimeError(f"/proc/self/status has no {name}")
    return int(value.split()[0])


class PeakMemory:
    """Peak memory of what runs after it is made, above what was in use then: on a GPU the caching allocator's peak
    of allocated bytes, on a CPU the process's resident high-water mark (reset through /proc/self/clear_refs)."""

    def __init__(self, device):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = proc_status_kb("VmRSS") * 1024

    def extra_mb(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = proc_status_kb("VmHWM") * 1024
        return (peak - self.base) / 1e6


# -- the record beside the numbers

def machine_info(device):
    mem_kb = proc_field("/proc/meminfo", "MemTotal")
    return {"cpu": proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gb": round(int(mem_kb.split()[0]) * 1024 / 1e9, 1) if mem_kb else None,
            "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
            "load_avg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def versions():
    from importlib import metadata

    import open_clip

    def dist(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": torch.__version__, "triton": dist("triton"),
            "open_clip": open_clip.__version__, "atlas_fast": dist("atlas_fast")}


def write_json(path, data):
    """`data` as indented JSON at `path`, atomically."""
    write_text(path, json.dumps(data, indent=1))
