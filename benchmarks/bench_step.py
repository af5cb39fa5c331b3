"""A full training step of an open_clip ViT visual tower: forward + backward of a cross-entropy loss through a
fixed random head, for naive merging, plain fine-tuning and each backend (the variants of `atlas-fast bench`,
here timed side by side in one process; the command measures each in a fresh process, with peak memory).

    pytest benchmarks/bench_step.py            CPU: ViT-S-32, T=8 fp32 bank, batch 8, fp32 (and aTLAS x4)
    pytest benchmarks/bench_step.py -m gpu     GPU: ViT-B-32, T=21 bf16 bank, batch 128, bf16 autocast
"""
import dataclasses

import pytest
import torch

from atlas_fast.bench.step import BACKEND_NAMES, BASELINES, Runner, Settings, unavailable_reason

CPU = Settings(model="ViT-S-32", tasks=8, batch=8, device="cpu")
GPU = Settings(model="ViT-B-32", tasks=21, batch=128, bank_dtype="bf16", amp=True, device="cuda")


def _run(benchmark, settings, variant, rounds):
    if variant not in BASELINES:
        reason = unavailable_reason(variant, torch.device(settings.device))
        if reason is not None:
            pytest.skip(reason)
    runner = Runner(settings, variant)
    cuda = settings.device == "cuda"

    def step():
        runner.step()
        if cuda:
            torch.cuda.synchronize()

    benchmark.extra_info.update(model=settings.model, tasks=settings.tasks, batch=settings.batch,
                                bank_dtype=settings.bank_dtype, amp=settings.amp, partitions=settings.partitions)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1 if not cuda else 3)


@pytest.mark.parametrize("variant", BASELINES + ("torch",))
def test_step_cpu(benchmark, variant):
    benchmark.group = "cpu step ViT-S-32"
    _run(benchmark, CPU, variant, rounds=3)


@pytest.mark.parametrize("variant", ("naive", "torch"))
def test_step_cpu_partitions(benchmark, variant):
    benchmark.group = "cpu step ViT-S-32, 4 partitions per block"
    _run(benchmark, dataclasses.replace(CPU, partitions=4), variant, rounds=3)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", BASELINES + BACKEND_NAMES)
def test_step_gpu(benchmark, variant):
    benchmark.group = "gpu step ViT-B-32 batch 128"
    _run(benchmark, GPU, variant, rounds=10)
