"""conv2d as a GEMM on patches: the im2col view the fused backends run their linear kernels on.

The columns follow the flat order of weight.view(N, -1), so the partition hash of a conv weight is the same
in every backend. conv = (stride, padding, dilation, groups). A patchify conv (stride = kernel, no padding
or dilation, as in a ViT's patch embedding) reads x as patches through one permuted copy of x's size; any
other conv unfolds x (kh·kw / stride² times its size, like any im2col).
"""
import torch.nn.functional as F


def out_size(conv, weight, x):
    """(Ho, Wo) of a conv of x (B, C, H, W) with weight (N, C/groups, kh, kw); the formula of torch.nn.Conv2d."""
    stride, padding, dilation, _ = conv
    return tuple((x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
                 for i in (0, 1))


def is_patchify(conv, weight):
    stride, padding, dilation, _ = conv
    return tuple(stride) == tuple(weight.shape[2:]) and tuple(padding) == (0, 0) and tuple(dilation) == (1, 1)


def patches(x, weight, conv):
    """x as (B·Ho·Wo, C·kh·kw) rows, columns in the flat order of weight.view(N, -1)."""
    stride, padding, dilation, _ = conv
    B, C = x.shape[:2]
    kh, kw = weight.shape[2:]
    Ho, Wo = out_size(conv, weight, x)
    if is_patchify(conv, weight):
        # Rows/columns past the last whole patch are not seen by the conv.
        x = x[:, :, :Ho * kh, :Wo * kw].reshape(B, C, Ho, kh, Wo, kw)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(B * Ho * Wo, C * kh * kw)
    cols = F.unfold(x, (kh, kw), dilation, padding, stride)
    return cols.transpose(1, 2).reshape(B * Ho * Wo, C * kh * kw)


def unpatch(cols, x, weight, conv):
    """The adjoint of patches: dx (B, C, H, W) from the patch-row gradient (B·Ho·Wo, C·kh·kw)."""
    stride, padding, dilation, _ = conv
    B, C, H, W = x.shape
    kh, kw = weight.shape[2:]
    Ho, Wo = out_size(conv, weight, x)
    if is_patchify(conv, weight):
        dx = cols.view(B, Ho, Wo, C, kh, kw).permute(0, 3, 1, 4, 2, 5).reshape(B, C, Ho * kh, Wo * kw)
        return F.pad(dx, (0, W - Wo * kw, 0, H - Ho * kh))
    cols = cols.view(B, Ho * Wo, C * kh * kw).transpose(1, 2)
    return F.fold(cols, (H, W), (kh, kw), dilation, padding, stride)


def rows(t):
    """(B, N, Ho, Wo) → (B·Ho·Wo, N): the conv output laid out as the GEMM's rows."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])

