"""Float64 reference of every op: the test oracle, written for clarity, not speed.

The gradients of the reference come from torch autograd on these expressions.
"""
import torch.nn.functional as F

from .hashing import partition_index


def merge_ref(theta0, tau, coef, key=0):
    """θ0 + Σ_t c[t, k(i)] τ_t[i] in float64. coef: (T, K)."""
    T, K = coef.shape
    if K == 1:
        cmap = coef.double().expand(T, theta0.numel())
    else:
        cmap = coef.double()[:, partition_index(theta0.numel(), key, K, theta0.device)]
    delta = (tau.double().reshape(T, -1) * cmap).sum(0)
    return theta0.double() + delta.view(theta0.shape)


def linear_ref(x, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w=0, key_b=0):
    w = merge_ref(weight, tau_w, coef_w, key_w)
    b = None
    if bias is not None:
        b = merge_ref(bias, tau_b, coef_b, key_b) if tau_b is not None else bias.double()
    return F.linear(x.double(), w, b)


def conv2d_ref(x, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w=0, key_b=0,
               stride=1, padding=0, dilation=1, groups=1):
    w = merge_ref(weight, tau_w, coef_w, key_w)
    b = None
    if bias is not None:
        b = merge_ref(bias, tau_b, coef_b, key_b) if tau_b is not None else bias.double()
    return F.conv2d(x.double(), w, b, stride, padding, dilation, groups)
