"""Shared test helpers: relative errors against the float64 reference, verbose failures, random banks."""
import torch

# Relative-error tolerances ‖out − ref‖ / ‖ref‖ per compute dtype (outputs, gradients).
TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-12, 1e-10)}


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
