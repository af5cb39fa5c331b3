"""conv2d as a GEMM on patches: the im2col view the fused backends run their linear kernels on.

The columns follow the flat order of weight.view(N, -1), so the partition hash of a conv weight is the same
in every backend. conv = (stride, padding, dilation, groups). A patchify conv (stride = kernel, no padding
or dilation, as in a ViT's patch embedding) reads x as patches through one permuted copy of x's size; any
other conv unfolds x (kh·kw / stride² times its size, like any im2col).
"""
import torch.nn.functional as F


def out_size(conv, weight, x):
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


class Im2colConv:
    """atlas_conv2d for a backend with fused linear kernels: a conv with groups=1 runs its own atlas_linear
    and atlas_linear_backward on the im2col view; grouped convs go to the next class (the torch fallback)."""

    def atlas_conv2d(self, x, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, conv):
        if conv[3] != 1:
            return super().atlas_conv2d(x, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, conv)
        N = weight.shape[0]
        Ho, Wo = out_size(conv, weight, x)
        y = self.atlas_linear(patches(x, weight, conv), weight.reshape(N, -1), bias,
                              tau_w.reshape(*tau_w.shape[:2], -1), tau_b, coef_w, coef_b, key_w, key_b)
        return y.view(x.shape[0], Ho, Wo, N).permute(0, 3, 1, 2).contiguous()

    def atlas_conv2d_backward(self, grad_out, x, weight, tau_w, tau_b, coef_w, key_w, key_b, conv, needs_input_grad):
        if conv[3] != 1:
            return super().atlas_conv2d_backward(grad_out, x, weight, tau_w, tau_b, coef_w, key_w, key_b, conv,
                                                 needs_input_grad)
        N = weight.shape[0]
        dcols, grad_cw, grad_cb = self.atlas_linear_backward(
            rows(grad_out), patches(x, weight, conv), weight.reshape(N, -1), tau_w.reshape(*tau_w.shape[:2], -1),
            tau_b, coef_w, key_w, key_b, needs_input_grad)
        grad_x = unpatch(dcols, x, weight, conv) if needs_input_grad else None
        return grad_x, grad_cw, grad_cb
