"""Out-of-core banks (offload.py): the fused modules' task vectors kept on the host and copied to the device one
module ahead, forward and backward. On a CPU the device copies are copies in host memory: the hooks, the
saved-tensor packing and the residency bound run as they do on a GPU; the gpu-marked test checks the side stream
and the device memory."""
import copy
import gc
import weakref

import pytest
import torch
import torch.nn as nn

import atlas_fast
from conftest import DEVICE
from helpers import assert_rel, tiny_vit

T = 3


@pytest.fixture(scope="module")
def vit():
    return tiny_vit()


def _composed(vit, fmt=None, offload=False):
    bank = atlas_fast.synthetic_task_vectors(vit, T, rel_scale=1e-2, seed=2)
    bank = {"int4": lambda: bank.to(dtype="int4", group_size=16), "lowrank": lambda: bank.low_rank(rank=2),
            None: lambda: bank}[fmt]()
    model = atlas_fast.compose(copy.deepcopy(vit), bank, backend="torch", seed=5, offload=offload)
    with torch.no_grad():
        model.coefficients.uniform_(-0.8, 0.8)
    return model


def _step(model, images, weight):
    model.coefficients.grad = None
    x = images.clone().requires_grad_()
    y = model(x)
    (y * weight).sum().backward()
    return y.detach(), model.coefficients.grad.clone(), x.grad


@pytest.mark.parametrize("fmt", [None, "int4", "lowrank"])
def test_offloaded_steps_equal_resident_ones(vit, fmt):
    """Forward and backward on the streamed copies give the resident bank's outputs and gradients, with at most
    two modules' blocks on the device; the second step prefetches in the order the first recorded."""
    model = _composed(vit, fmt)
    images, weight = torch.randn(3, 3, 32, 32), torch.randn(3, 24)
    resident = _step(model, images, weight)
    off = model.offload_bank()
    assert len(off.modules) == 1 + 2 * 3, "conv1, and per layer the attention and the two MLP linears"
    for _ in range(2):
        for name, got, ref in zip(("output", "coefficient gradient", "input gradient"),
                                  _step(model, images, weight), resident):
            assert_rel(got, ref, 1e-6, name)
    assert off.peak_resident == 2
    conv = model.model.conv1
    assert conv.tau_weight is off.host[0]["tau_weight"], "the host tensors are back after the forward"


def test_the_backward_holds_no_copies(vit):
    """After a forward, only the cached modules' copies are alive: the autograd graph saved the others by name.
    Without the saved-tensor hooks (as under a grouped call) it keeps every module's."""
    images = torch.randn(2, 3, 32, 32)
    for packed in (True, False):
        model = _composed(vit)
        off = model.offload_bank()
        issued = []
        issue = off._issue

        def tracking_issue(i):
            new = i is not None and i not in off.cache
            issue(i)
            if new:
                issued.extend(weakref.ref(t) for t in off.cache[i][0].values())
        off._issue = tracking_issue
        with off.forward_context(grouped=not packed):
            y = model.model(images)
        gc.collect()
        alive = sum(r() is not None for r in issued)
        cached = sum(len(entry[0]) for entry in off.cache.values())
        if packed:
            assert alive == cached <= 2 * 4
        else:
            assert alive > cached
        y.sum().backward()


def test_compose_offloads(vit):
    images, weight = torch.randn(2, 3, 32, 32), torch.randn(2, 24)
    plain = _composed(vit)
    resident = _step(plain, images, weight)
    model = _composed(vit, offload="pageable")
    assert model._offload is not None and len(model._offload.modules) == 7
    with torch.no_grad():
        model.coefficients.copy_(plain.coefficients)
    for name, got, ref in zip(("output", "coefficient gradient", "input gradient"), _step(model, images, weight),
                              resident):
        assert_rel(got, ref, 1e-6, name)
    with pytest.raises(ValueError, match="offload='yes'"):
        _composed(vit, offload="yes")


def test_grouped_calls_and_onload(vit):
    model = _composed(vit)
    coef = torch.rand(2, *model.coefficients.shape) * 1.6 - 0.8
    index, images = torch.tensor([1, 0, 1]), torch.randn(3, 3, 32, 32)
    with model.groups(index, coef):
        ref = model(images)
    model.offload_bank()
    with pytest.raises(RuntimeError, match="offloaded already"):
        model.offload_bank()
    with model.groups(index, coef):
        assert_rel(model(images), ref, 1e-6, "grouped output")
    merged = model.merged_parameters()
    model.onload_bank()
    assert model._offload is None and not model.model.conv1._forward_pre_hooks
    with model.groups(index, coef):
        assert_rel(model(images), ref, 1e-6, "grouped output after onload")
    for name, m in model.merged_parameters().items():
        assert_rel(merged[name], m, 0.0, name)


def test_offloaded_model_refuses_moves_and_copies(vit):
    """Moving or copying an offloaded model names onload_bank(); once onloaded, both work as for any model."""
    model = _composed(vit)
    images = torch.randn(2, 3, 32, 32)
    ref = model(images).detach()
    model.offload_bank()
    for what, action in (("moving", lambda: model.to(torch.float64)), ("moving", lambda: model.cpu()),
                         ("deepcopy", lambda: copy.deepcopy(model))):
        with pytest.raises(RuntimeError, match=f"{what}.*onload_bank"):
            action()
    assert_rel(model(images), ref, 1e-6, "the offloaded model after the refusals")
    model.onload_bank()
    duplicate = copy.deepcopy(model)
    with torch.no_grad():
        model.coefficients.zero_()
    assert_rel(duplicate(images), ref, 1e-6, "the copy, after the original's coefficients changed")
    assert duplicate.model.conv1.tau_weight.data_ptr() != model.model.conv1.tau_weight.data_ptr()
    assert model.to(torch.float64).coefficients.dtype == torch.float64


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_offload_memory_and_results(backend):
    """Eight 2048² layers, T = 8 (a 1.07 GB float32 bank) composed from the CPU bank with offload=True: the step
    equals the resident one and its peak device memory stays below half the bank (two modules' blocks cached are a
    quarter, a third one's memory may wait for the stream that used it before it is reused)."""
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Sequential(nn.Linear(2048, 2048), nn.GELU()) for _ in range(8)]).cuda()
    bank = atlas_fast.synthetic_task_vectors(net.cpu(), 8, rel_scale=1e-2, seed=1)
    net.cuda()
    bank_bytes = sum(v.numel() * v.element_size() for v in bank.vectors.values())
    x, weight = torch.randn(64, 2048, device=DEVICE), torch.randn(64, 2048, device=DEVICE)
    coef = torch.linspace(-0.8, 0.8, 8 * 16, device=DEVICE).view(8, 16)
    resident_model = atlas_fast.compose(copy.deepcopy(net), bank.to(DEVICE), backend=backend)
    with torch.no_grad():
        resident_model.coefficients.copy_(coef)
    resident = _step(resident_model, x, weight)
    del resident_model
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = atlas_fast.compose(net, bank, backend=backend, offload=True)
    with torch.no_grad():
        model.coefficients.copy_(coef)
    for _ in range(2):
        got = _step(model, x, weight)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for name, a, b in zip(("output", "coefficient gradient", "input gradient"), got, resident):
        assert_rel(a, b, 1e-6, name)
    assert peak < bank_bytes / 2, f"peak {peak / 2**20:.0f} MiB for a {bank_bytes / 2**20:.0f} MiB bank"
