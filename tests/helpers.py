"""Shared test helpers: relative errors against the float64 reference, verbose failures, random banks."""
import os
import subprocess
import sys

import torch

# Relative-error tolerances ‖out − ref‖ / ‖ref‖ per compute dtype (outputs, gradients).
TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-12, 1e-10)}


def tiny_vit():
    """An open_clip ViT of 32-pixel images, 8-pixel patches, width 48, two layers, seeded."""
    from open_clip.transformer import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, width=48, layers=2, heads=4, mlp_ratio=2.0,
                             output_dim=24).eval()


def resident_mb(field="VmRSS"):
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM, RssFile, ...), in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_rel(out, ref, tol, what="output"):
    """Fails with the relative error and the first mismatching elements, not just 'not close'."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values at {torch.nonzero(~torch.isfinite(out))[:5].tolist()}"
    err = rel_err(out, ref)
    if err > tol:
        diff = (out.double() - ref.double()).abs().flatten()
        idx = torch.argsort(diff, descending=True)[:5]
        worst = [(int(i), float(out.flatten()[i]), float(ref.flatten()[i])) for i in idx]
        raise AssertionError(f"{what}: relative error {err:.3e} > {tol:.1e}; worst (index, got, ref): {worst}")
    return err


def random_bank(shape, T, dtype=torch.float32, scale=1e-2, device="cpu"):
    """T task vectors of realistic relative magnitude for a block of `shape`."""
    return (torch.randn(T, *shape, device=device) * scale).to(dtype)


def random_coef(T, K, device="cpu"):
    """Non-zero coefficients in the range aTLAS learns (about ±1)."""
    return (torch.rand(T, K, device=device) * 1.6 - 0.8).requires_grad_()


# ---------------------------------------------------------------- model-level float64 reference

def composed_block_names(model, bank):
    """The blocks compose() is specified to create: the model's parameters the bank covers, in
    named_parameters() order (block b is the b-th of them)."""
    return [n for n, _ in model.named_parameters() if n in bank]


def block_coefficients(coef, b, granularity="block", partitions=1):
    """The (T, K) coefficients of block b in compose()'s layout: (T,) task, (T, B) block, (T, B, K) partitions."""
    if granularity == "task":
        return coef.reshape(-1, 1)
    return coef[:, b:b + 1] if partitions == 1 else coef[:, b]


def merged_reference(model, bank, coef, granularity="block", partitions=1, seed=0):
    """{name: θ0 + Σ_t c τ_t} in float64 for every composed parameter of `model` (a plain, uncomposed model),
    built block by block from reference.merge_ref with block b's key block_key(seed, b)."""
    from atlas_fast.ops.hashing import block_key
    from atlas_fast.ops.reference import merge_ref
    params = dict(model.named_parameters())
    return {n: merge_ref(params[n].detach(), bank[n], block_coefficients(coef, b, granularity, partitions),
                         block_key(seed, b))
            for b, n in enumerate(composed_block_names(model, bank))}


def _double(v):
    """Floating tensors as detached float64 copies; float64 tensors pass as they are (reference input leaves)."""
    if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float64:
        return v.detach().double()
    return v


def input_leaves(args, dtype=None):
    """Each distinct floating tensor of `args` as a new leaf requiring grad (optionally cast to dtype); a tensor
    passed twice stays one tensor (attention's query is key is value). Returns (new args, the leaves)."""
    memo = {}
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point() and id(a) not in memo:
            memo[id(a)] = a.detach().to(dtype or a.dtype).requires_grad_()
    return tuple(memo.get(id(a), a) for a in args), list(memo.values())


def reference_call(model, merged, *args, **kwargs):
    """Runs a float64 copy of the plain `model` on the float64 parameters `merged` (others at θ0) with
    torch.func.functional_call; floating tensor arguments are upcast to float64."""
    import copy

    from torch.func import functional_call
    model64 = copy.deepcopy(model).double()
    return functional_call(model64, merged, tuple(_double(a) for a in args),
                           {k: _double(v) for k, v in kwargs.items()})


def reference_outputs_and_grad(model, bank, coef, args, kwargs=None, grad_out=None, granularity="block",
                               partitions=1, seed=0, input_grads=False):
    """The float64 reference of a composed model: (outputs, dL/dc) with L = Σ grad_out · first output, the
    coefficient gradient by autograd through merge_ref. coef: the composed model's coefficients.
    input_grads=True appends dL/d(each distinct floating positional argument), as input_leaves orders them."""
    c64 = coef.detach().double().requires_grad_()
    merged = merged_reference(model, bank, c64, granularity, partitions, seed)
    leaves = []
    if input_grads:
        args, leaves = input_leaves(args, torch.float64)
    out = reference_call(model, merged, *args, **(kwargs or {}))
    if grad_out is None:
        return out, None
    first = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(first, [c64] + leaves, grad_out.double())
    return (out, *grads)


def assert_coef_grad(grad, ref, names, tol, granularity="block", partitions=1):
    """The whole coefficient gradient, then block by block (so a wrong gradient of one small block, a bias
    say, cannot hide in the norm of the whole tensor)."""
    assert_rel(grad, ref, tol, "coefficient gradient")
    if granularity == "task":
        return
    for b, name in enumerate(names):
        assert_rel(block_coefficients(grad, b, granularity, partitions),
                   block_coefficients(ref, b, granularity, partitions), tol, f"coefficient gradient of {name}")


def compile_for_sm90(script):
    """Runs a script that compiles Triton kernels for Hopper (triton.compile with GPUTarget("cuda", 90, 32)) in a
    fresh process without TRITON_INTERPRET: the lowering the interpreter skips, without a GPU. Fails on its error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
