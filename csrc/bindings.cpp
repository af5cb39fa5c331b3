// The CUDA kernel ops, registered with TORCH_LIBRARY so they exist as torch.ops.atlas_fast.* once the library
// is loaded. Each checks its tensors (naming the offending argument), makes them contiguous in the dtypes the
// kernels take (θ0 and biases in fp32, τ_b in τ's dtype, the gradient in the activation dtype), allocates the
// outputs and launches on the current stream. Shapes follow atlas_fast/backends/base.py (the grouped ops:
// atlas_fast/backends/grouped.py, on rows: x (M, in) and a group per row).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "atlas_kernels.h"

namespace {

using at::Tensor;
constexpr int64_t kMaxHashNumel = 0xFFFFFFFFll;  // flat indices must fit the 32-bit partition hash

atlas::DType kernel_dtype(at::ScalarType type, const char* what) {
    switch (type) {
        case at::kFloat: return atlas::DType::f32;
        case at::kBFloat16: return atlas::DType::bf16;
        case at::kHalf: return atlas::DType::f16;
        default:
            TORCH_CHECK(false, what, ": the cuda backend takes float32, bfloat16 or float16, got ", type,
                        " (float64 runs on backend='torch')");
    }
}

atlas::DType kernel_dtype(const Tensor& t, const char* what) { return kernel_dtype(t.scalar_type(), what); }

void check_device(const Tensor& t, const char* what, const at::Device& device) {
    TORCH_CHECK(t.is_cuda(), what, " must be a CUDA tensor, got one on ", t.device());
    TORCH_CHECK(t.device() == device, what, " is on ", t.device(), " but the op runs on ", device);
}

uint32_t block_key(int64_t key, const char* what) {
    TORCH_CHECK(key >= 0 && key <= kMaxHashNumel, what, " must be a uint32 block key, got ", key);
    return static_cast<uint32_t>(key);
}

void check_launch(cudaError_t err, const char* what) {
    TORCH_CHECK(err == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// Validated, contiguous operands of the linear op. bank points into tau_w (and scale_w for int8 / int4).
struct Linear {
    Tensor weight, tau_w, scale_w, coef_w, bias, tau_b, coef_b;
    int64_t N, Kin, T, P;
    atlas::DType act;
    atlas::Bank bank;
    uint32_t key_w, key_b;
};

// The bank of an (N, Kin) weight: float task vectors (T, N, Kin), or quantised ones (atlas_fast/quant.py): int8
// data (T, N, Kin) with scale (T, N), or int4 data uint8 (T, N, ⌈Kin/2⌉) with scale (T, N, ⌈Kin/group⌉).
void check_bank(Linear& L, const Tensor& tau_w, const std::optional<Tensor>& scale_w, int64_t group_w,
                const at::Device& device) {
    if (!scale_w.has_value()) {
        L.bank.dtype = kernel_dtype(tau_w, "tau_w");
        TORCH_CHECK(tau_w.dim() == 3 && tau_w.size(0) == L.T && tau_w.size(1) == L.N && tau_w.size(2) == L.Kin,
                    "tau_w must be (T=", L.T, ", ", L.N, ", ", L.Kin, "), got ", tau_w.sizes());
        L.tau_w = tau_w.contiguous();
        L.bank.data = L.tau_w.data_ptr();
        return;
    }
    check_device(*scale_w, "scale_w", device);
    TORCH_CHECK(scale_w->scalar_type() == at::kFloat, "scale_w must be float32, got ", scale_w->scalar_type());
    const bool int8 = tau_w.scalar_type() == at::kChar;
    TORCH_CHECK(int8 || tau_w.scalar_type() == at::kByte, "quantised tau_w must be int8 or uint8 (int4), got ",
                tau_w.scalar_type());
    TORCH_CHECK(int8 || group_w >= 1, "int4 tau_w needs group_w >= 1, got ", group_w);
    const int64_t cols = int8 ? L.Kin : (L.Kin + 1) / 2;
    TORCH_CHECK(tau_w.dim() == 3 && tau_w.size(0) == L.T && tau_w.size(1) == L.N && tau_w.size(2) == cols,
                int8 ? "int8" : "int4", " tau_w must be (T=", L.T, ", ", L.N, ", ", cols, "), got ", tau_w.sizes());
    const std::vector<int64_t> scale_shape =
        int8 ? std::vector<int64_t>{L.T, L.N} : std::vector<int64_t>{L.T, L.N, (L.Kin + group_w - 1) / group_w};
    TORCH_CHECK(scale_w->sizes() == at::IntArrayRef(scale_shape), "scale_w must be ", at::IntArrayRef(scale_shape),
                " for this ", int8 ? "int8" : "int4", " tau_w, got ", scale_w->sizes());
    L.tau_w = tau_w.contiguous();
    L.scale_w = scale_w->contiguous();
    L.bank = {L.tau_w.data_ptr(), int8 ? atlas::DType::i8 : atlas::DType::i4, L.scale_w.data_ptr<float>(),
              int8 ? 0 : group_w};
}

Linear check_linear(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& tau_w,
                    const std::optional<Tensor>& tau_b, const Tensor& coef_w, const std::optional<Tensor>& coef_b,
                    int64_t key_w, int64_t key_b, const std::optional<Tensor>& scale_w = std::nullopt,
                    int64_t group_w = 0) {
    Linear L;
    const at::Device device = x.device();
    check_device(x, "x", device);
    check_device(weight, "weight", device);
    check_device(tau_w, "tau_w", device);
    check_device(coef_w, "coef_w", device);
    L.act = kernel_dtype(x, "x");
    kernel_dtype(weight, "weight");
    TORCH_CHECK(weight.dim() == 2, "weight must be (out, in), got shape ", weight.sizes());
    L.N = weight.size(0);
    L.Kin = weight.size(1);
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == L.Kin, "x of shape ", x.sizes(), " does not match weight ",
                weight.sizes());
    TORCH_CHECK(weight.numel() <= kMaxHashNumel, "weight has ", weight.numel(),
                " elements, more than the 32-bit partition hash covers");
    TORCH_CHECK(coef_w.dim() == 2 && coef_w.scalar_type() == at::kFloat, "coef_w must be float32 (T, P), got ",
                coef_w.scalar_type(), " ", coef_w.sizes());
    L.T = coef_w.size(0);
    L.P = coef_w.size(1);
    TORCH_CHECK(L.P >= 1, "coef_w must have at least one partition, got shape ", coef_w.sizes());
    check_bank(L, tau_w, scale_w, group_w, device);
    L.weight = weight.to(at::kFloat).contiguous();
    L.coef_w = coef_w.contiguous();
    L.key_w = block_key(key_w, "key_w");
    L.key_b = block_key(key_b, "key_b");
    if (bias.has_value()) {
        check_device(*bias, "bias", device);
        kernel_dtype(*bias, "bias");
        TORCH_CHECK(bias->dim() == 1 && bias->size(0) == L.N, "bias must be (", L.N, "), got ", bias->sizes());
        L.bias = bias->to(at::kFloat).contiguous();
    }
    if (tau_b.has_value()) {
        TORCH_CHECK(bias.has_value(), "tau_b needs bias");
        check_device(*tau_b, "tau_b", device);
        kernel_dtype(*tau_b, "tau_b");
        TORCH_CHECK(tau_b->dim() == 2 && tau_b->size(0) == L.T && tau_b->size(1) == L.N, "tau_b must be (T=", L.T,
                    ", ", L.N, "), got ", tau_b->sizes());
        // in the bank's dtype: fp32 for a quantised bank, whose 1-D task vectors stay float
        L.tau_b = tau_b->to(scale_w.has_value() ? at::kFloat : tau_w.scalar_type()).contiguous();
    }
    if (coef_b.has_value() && tau_b.has_value()) {
        check_device(*coef_b, "coef_b", device);
        TORCH_CHECK(coef_b->scalar_type() == at::kFloat && coef_b->sizes() == coef_w.sizes(),
                    "coef_b must be float32 shaped like coef_w ", coef_w.sizes(), ", got ", coef_b->scalar_type(),
                    " ", coef_b->sizes());
        L.coef_b = coef_b->contiguous();
    } else {
        TORCH_CHECK(!tau_b.has_value(), "tau_b needs coef_b");
    }
    return L;
}

const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
const float* fptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

Tensor atlas_linear_cuda_forward(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                 const Tensor& tau_w, const std::optional<Tensor>& tau_b, const Tensor& coef_w,
                                 const std::optional<Tensor>& coef_b, int64_t key_w, int64_t key_b,
                                 const std::optional<Tensor>& scale_w, int64_t group_w) {
    const c10::cuda::CUDAGuard guard(x.device());
    const Linear L = check_linear(x, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w, key_b, scale_w, group_w);
    const Tensor x2 = x.reshape({-1, L.Kin}).contiguous();
    const int64_t M = x2.size(0);
    Tensor y = at::empty({M, L.N}, x.options());
    check_launch(atlas::linear_forward(x2.data_ptr(), L.act, M, L.N, L.Kin, L.weight.data_ptr<float>(),
                                       L.bank, L.T, L.coef_w.data_ptr<float>(), L.P, L.key_w,
                                       fptr_or_null(L.bias), ptr_or_null(L.tau_b), fptr_or_null(L.coef_b), L.key_b,
                                       y.data_ptr(), at::cuda::getCurrentCUDAStream()),
                 "atlas_linear_cuda_forward");
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = L.N;
    return y.view(shape);
}

// Device copy of the block table of atlas_kernels.h: rows {src, τ, out, numel, key, first chunk}, then a row
// holding the total chunk count. Staged in pinned memory so the copy does not wait for the stream.
std::pair<Tensor, int64_t> block_table(const std::vector<Tensor>& src, const std::vector<Tensor>& tau,
                                       const std::vector<Tensor>& out, const std::vector<int64_t>& keys,
                                       const at::Device& device) {
    const int64_t B = static_cast<int64_t>(src.size());
    Tensor host = at::zeros({B + 1, atlas::kBlockFields}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    int64_t* row = host.data_ptr<int64_t>();
    int64_t chunks = 0;
    for (int64_t b = 0; b < B; ++b, row += atlas::kBlockFields) {
        const int64_t numel = src[b].numel();
        row[0] = reinterpret_cast<int64_t>(src[b].data_ptr());
        row[1] = reinterpret_cast<int64_t>(tau[b].data_ptr());
        row[2] = out.empty() ? 0 : reinterpret_cast<int64_t>(out[b].data_ptr());
        row[3] = numel;
        row[4] = block_key(keys[b], "keys[b]");
        row[5] = chunks;
        chunks += (numel + atlas::kMergeChunk - 1) / atlas::kMergeChunk;
    }
    row[5] = chunks;
    return {host.to(host.options().device(device), /*non_blocking=*/true), chunks};
}

// Validated, contiguous blocks: values (θ0 or gradients) and their task-vector stacks (T, *shape).
struct Blocks {
    std::vector<Tensor> values, tau;
    int64_t T;
    atlas::DType value, bank;
};

Blocks check_blocks(const std::vector<Tensor>& values, const char* what, const std::vector<Tensor>& tau,
                    const std::vector<int64_t>& keys, const at::Device& device) {
    const size_t B = values.size();
    TORCH_CHECK(B > 0, "merge_blocks: no blocks");
    TORCH_CHECK(tau.size() == B && keys.size() == B, "merge_blocks: ", B, " ", what, ", ", tau.size(),
                " task-vector stacks and ", keys.size(), " keys");
    Blocks out;
    out.T = tau[0].dim() > 0 ? tau[0].size(0) : 0;
    out.value = kernel_dtype(values[0], what);
    out.bank = kernel_dtype(tau[0], "tau");
    for (size_t b = 0; b < B; ++b) {
        check_device(values[b], what, device);
        check_device(tau[b], "tau", device);
        TORCH_CHECK(values[b].scalar_type() == values[0].scalar_type(), what, "[", b, "] is ",
                    values[b].scalar_type(), " but ", what, "[0] is ", values[0].scalar_type(),
                    "; call once per dtype");
        TORCH_CHECK(tau[b].scalar_type() == tau[0].scalar_type(), "tau[", b, "] is ", tau[b].scalar_type(),
                    " but tau[0] is ", tau[0].scalar_type(), "; call once per dtype");
        TORCH_CHECK(tau[b].dim() >= 1 && tau[b].size(0) == out.T && tau[b].numel() == out.T * values[b].numel(),
                    "tau[", b, "] of shape ", tau[b].sizes(), " does not stack (T=", out.T, ", *",
                    values[b].sizes(), ")");
        TORCH_CHECK(values[b].numel() <= kMaxHashNumel, what, "[", b, "] has more elements than the 32-bit ",
                    "partition hash covers");
        out.values.push_back(values[b].contiguous());
        out.tau.push_back(tau[b].contiguous());
    }
    return out;
}

std::vector<Tensor> merge_blocks_cuda(const std::vector<Tensor>& theta0, const std::vector<Tensor>& tau,
                                      const Tensor& coef, const std::vector<int64_t>& keys) {
    const c10::cuda::CUDAGuard guard(coef.device());
    check_device(coef, "coef", coef.device());
    const Blocks blocks = check_blocks(theta0, "theta0", tau, keys, coef.device());
    const int64_t B = static_cast<int64_t>(theta0.size());
    TORCH_CHECK(coef.scalar_type() == at::kFloat && coef.dim() == 3 && coef.size(0) == blocks.T && coef.size(1) == B,
                "coef must be float32 (T=", blocks.T, ", B=", B, ", K), got ", coef.scalar_type(), " ",
                coef.sizes());
    TORCH_CHECK(coef.size(2) >= 1, "coef must have at least one partition, got shape ", coef.sizes());
    const Tensor c = coef.contiguous();
    std::vector<Tensor> out;
    for (const Tensor& t : blocks.values) out.push_back(at::empty_like(t));
    const auto [table, chunks] = block_table(blocks.values, blocks.tau, out, keys, coef.device());
    check_launch(atlas::merge_blocks(table.data_ptr<int64_t>(), B, chunks, blocks.value, blocks.bank, blocks.T,
                                     c.data_ptr<float>(), c.size(2), at::cuda::getCurrentCUDAStream()),
                 "merge_blocks_cuda");
    return out;
}

Tensor merge_blocks_cuda_backward(const std::vector<Tensor>& grads, const std::vector<Tensor>& tau,
                                  const std::vector<int64_t>& keys, int64_t partitions) {
    TORCH_CHECK(!grads.empty(), "merge_blocks_backward: no blocks");
    const at::Device device = grads[0].device();
    const c10::cuda::CUDAGuard guard(device);
    TORCH_CHECK(partitions >= 1, "partitions must be at least 1, got ", partitions);
    const Blocks blocks = check_blocks(grads, "grads", tau, keys, device);
    const int64_t B = static_cast<int64_t>(grads.size());
    const auto [table, chunks] = block_table(blocks.values, blocks.tau, {}, keys, device);
    const auto f32 = grads[0].options().dtype(at::kFloat);
    Tensor workspace = at::empty({chunks * blocks.T * partitions}, f32);
    Tensor dc = at::empty({blocks.T, B, partitions}, f32);
    check_launch(atlas::merge_blocks_backward(table.data_ptr<int64_t>(), B, chunks, blocks.value, blocks.bank,
                                              blocks.T, partitions, workspace.data_ptr<float>(),
                                              dc.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
                 "merge_blocks_cuda_backward");
    return dc;
}

// W(c) = θ0 + Σ_t c[t, k(i)] τ_t[i] of one block (any shape) in `dtype`: the merge-once strategy's transient
// weight for a stock GEMM. θ0 in any kernel dtype (merged in fp32, rounded once).
Tensor atlas_linear_cuda_merge(const Tensor& weight, const Tensor& tau_w, const Tensor& coef_w, int64_t key_w,
                               at::ScalarType dtype) {
    const at::Device device = weight.device();
    const c10::cuda::CUDAGuard guard(device);
    check_device(weight, "weight", device);
    check_device(tau_w, "tau_w", device);
    check_device(coef_w, "coef_w", device);
    const atlas::DType value = kernel_dtype(weight, "weight");
    const atlas::DType bank = kernel_dtype(tau_w, "tau_w");
    const atlas::DType out_dtype = kernel_dtype(dtype, "dtype");
    TORCH_CHECK(weight.numel() <= kMaxHashNumel, "weight has ", weight.numel(),
                " elements, more than the 32-bit partition hash covers");
    TORCH_CHECK(coef_w.dim() == 2 && coef_w.scalar_type() == at::kFloat && coef_w.size(1) >= 1,
                "coef_w must be float32 (T, P), got ", coef_w.scalar_type(), " ", coef_w.sizes());
    const int64_t T = coef_w.size(0);
    TORCH_CHECK(tau_w.dim() == weight.dim() + 1 && tau_w.size(0) == T && tau_w.sizes().slice(1) == weight.sizes(),
                "tau_w must be (T=", T, ", *", weight.sizes(), "), got ", tau_w.sizes());
    const Tensor w = weight.contiguous(), tau = tau_w.contiguous(), coef = coef_w.contiguous();
    Tensor out = at::empty(weight.sizes(), weight.options().dtype(dtype));
    check_launch(atlas::merge_block(w.data_ptr(), value, tau.data_ptr(), bank, w.numel(), T, coef.data_ptr<float>(),
                                    coef.size(1), block_key(key_w, "key_w"), out.data_ptr(), out_dtype,
                                    at::cuda::getCurrentCUDAStream()),
                 "atlas_linear_cuda_merge");
    return out;
}

std::tuple<Tensor, Tensor, Tensor> atlas_linear_cuda_backward(const Tensor& grad_out, const Tensor& x,
                                                              const Tensor& weight, const Tensor& tau_w,
                                                              const std::optional<Tensor>& tau_b,
                                                              const Tensor& coef_w, int64_t key_w, int64_t key_b,
                                                              bool needs_input_grad,
                                                              const std::optional<Tensor>& scale_w,
                                                              int64_t group_w) {
    const c10::cuda::CUDAGuard guard(x.device());
    const Linear L = check_linear(x, weight, std::nullopt, tau_w, std::nullopt, coef_w, std::nullopt, key_w, key_b,
                                  scale_w, group_w);
    check_device(grad_out, "grad_out", x.device());
    TORCH_CHECK(grad_out.dim() == x.dim() && grad_out.size(-1) == L.N &&
                    grad_out.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
                "grad_out of shape ", grad_out.sizes(), " does not match x ", x.sizes(), " and weight ",
                weight.sizes());
    const Tensor x2 = x.reshape({-1, L.Kin}).contiguous();
    const Tensor dy = grad_out.reshape({-1, L.N}).to(x.scalar_type()).contiguous();
    const int64_t M = x2.size(0);
    const auto stream = at::cuda::getCurrentCUDAStream();
    const auto f32 = x.options().dtype(at::kFloat);

    Tensor dx = x.new_empty({0});
    if (needs_input_grad) {
        dx = at::empty_like(x2);
        check_launch(atlas::linear_grad_input(dy.data_ptr(), L.act, M, L.N, L.Kin, L.weight.data_ptr<float>(),
                                              L.bank, L.T, L.coef_w.data_ptr<float>(), L.P,
                                              L.key_w, dx.data_ptr(), stream),
                     "atlas_linear_cuda_backward (grad x)");
        dx = dx.view(x.sizes());
    }

    const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    Tensor workspace = at::empty({atlas::linear_grad_coef_workspace(M, L.N, L.Kin, L.T, L.P, num_sms)}, f32);
    Tensor dcw = at::empty({L.T, L.P}, f32);
    check_launch(atlas::linear_grad_coef(dy.data_ptr(), x2.data_ptr(), L.act, M, L.N, L.Kin, L.bank, L.T, L.P,
                                         L.key_w, workspace.data_ptr<float>(), num_sms, dcw.data_ptr<float>(),
                                         stream),
                 "atlas_linear_cuda_backward (grad coef_w)");

    Tensor dcb = coef_w.new_empty({0});
    if (tau_b.has_value()) {
        // dc_b[t, k] = Σ_{n in partition k} τ_b,t[n] Σ_m dy[m, n]: the one-block case of merge_blocks_backward.
        TORCH_CHECK(tau_b->dim() == 2 && tau_b->size(0) == L.T && tau_b->size(1) == L.N, "tau_b must be (T=", L.T,
                    ", ", L.N, "), got ", tau_b->sizes());
        dcb = merge_blocks_cuda_backward({dy.sum({0}, /*keepdim=*/false, at::kFloat)}, {*tau_b}, {key_b}, L.P)
                  .view({L.T, L.P});
    }
    return {dx, dcw, dcb};
}

// ---------------------------------------------------------------- grouped linear

// Validated operands of a grouped call on rows x (M, in): the linear op's, with coef_w, coef_b (G, T, P).
struct GroupedLinear {
    Linear L;
    int64_t G;
};

GroupedLinear check_grouped(const Tensor& x, const Tensor& row_group, const Tensor& weight,
                            const std::optional<Tensor>& bias, const Tensor& tau_w, const std::optional<Tensor>& tau_b,
                            const Tensor& coef_w, const std::optional<Tensor>& coef_b, int64_t key_w, int64_t key_b,
                            const std::optional<Tensor>& skip, const std::optional<Tensor>& scale_w,
                            int64_t group_w) {
    TORCH_CHECK(coef_w.dim() == 3 && coef_w.size(0) >= 1, "coef_w must be float32 (G, T, P) with G >= 1, got ",
                coef_w.scalar_type(), " ", coef_w.sizes());
    TORCH_CHECK(x.dim() == 2, "x must be (rows, in), got shape ", x.sizes());
    const bool with_coef_b = coef_b.has_value() && tau_b.has_value();
    if (with_coef_b)
        TORCH_CHECK(coef_b->sizes() == coef_w.sizes(), "coef_b must be float32 shaped like coef_w ", coef_w.sizes(),
                    ", got ", coef_b->scalar_type(), " ", coef_b->sizes());
    const std::optional<Tensor> coef_b0 = with_coef_b ? std::optional<Tensor>((*coef_b)[0]) : std::nullopt;
    GroupedLinear out{check_linear(x, weight, bias, tau_w, tau_b, coef_w[0], coef_b0, key_w, key_b, scale_w, group_w),
                      coef_w.size(0)};
    out.L.coef_w = coef_w.contiguous();
    if (with_coef_b) out.L.coef_b = coef_b->contiguous();
    check_device(row_group, "row_group", x.device());
    TORCH_CHECK(row_group.scalar_type() == at::kLong && row_group.dim() == 1 && row_group.size(0) == x.size(0),
                "row_group must be int64 (", x.size(0), ",), one group per row of x, got ", row_group.scalar_type(),
                " ", row_group.sizes());
    if (skip.has_value()) {
        check_device(*skip, "skip", x.device());
        TORCH_CHECK(skip->scalar_type() == at::kBool && skip->dim() == 1 && skip->size(0) == out.G,
                    "skip must be bool (G=", out.G, ",), got ", skip->scalar_type(), " ", skip->sizes());
    }
    return out;
}

// The rows sorted by group: the tables of atlas::Segments that do not depend on the tile height.
struct SortedRows {
    Tensor counts, rows, seg_start;
};

SortedRows sort_rows(const Tensor& row_group, int64_t G) {
    SortedRows s;
    s.counts = at::bincount(row_group, std::nullopt, G);  // refuses negative ids; more than G bins for ids >= G
    TORCH_CHECK(s.counts.size(0) == G, "row_group holds group ids outside [0, G=", G, ")");
    s.rows = at::argsort(row_group, /*stable=*/true);
    s.seg_start = at::zeros({G + 1}, row_group.options());
    s.seg_start.slice(0, 1).copy_(s.counts.cumsum(0));
    return s;
}

// Each group's rows cut into tiles of `height` positions (none for the groups in `skip`), with their tables;
// one host sync sizes the grid. seg points into `s` too, which must outlive the launch.
struct Tiles {
    Tensor tile_group, tile_start, first_tile;
    atlas::Segments seg;
};

Tiles cut_tiles(const SortedRows& s, int64_t height, const std::optional<Tensor>& skip) {
    Tiles t;
    const int64_t G = s.counts.size(0);
    Tensor per_group = at::div(s.counts + (height - 1), height, "floor");
    if (skip.has_value()) per_group.masked_fill_(*skip, 0);
    t.first_tile = at::zeros({G + 1}, s.counts.options());
    t.first_tile.slice(0, 1).copy_(per_group.cumsum(0));
    const int64_t tiles = t.first_tile[G].item<int64_t>();
    t.tile_group = at::repeat_interleave(per_group, tiles);
    const Tensor within = at::arange(tiles, s.counts.options()) - t.first_tile.index_select(0, t.tile_group);
    t.tile_start = s.seg_start.index_select(0, t.tile_group) + within * height;
    t.seg.rows = s.rows.data_ptr<int64_t>();
    t.seg.seg_start = s.seg_start.data_ptr<int64_t>();
    t.seg.tile_group = t.tile_group.data_ptr<int64_t>();
    t.seg.tile_start = t.tile_start.data_ptr<int64_t>();
    t.seg.first_tile = t.first_tile.data_ptr<int64_t>();
    t.seg.groups = G;
    t.seg.tiles = tiles;
    t.seg.height = height;
    return t;
}

// y (M, out): row m = x[m] W(coef_w[g])ᵀ + b(coef_b[g]) with g = row_group[m]. The rows of the groups in `skip`
// are left unwritten (the caller computes them another way).
Tensor atlas_linear_grouped_cuda_forward(const Tensor& x, const Tensor& row_group, const Tensor& weight,
                                         const std::optional<Tensor>& bias, const Tensor& tau_w,
                                         const std::optional<Tensor>& tau_b, const Tensor& coef_w,
                                         const std::optional<Tensor>& coef_b, int64_t key_w, int64_t key_b,
                                         const std::optional<Tensor>& skip, const std::optional<Tensor>& scale_w,
                                         int64_t group_w) {
    const c10::cuda::CUDAGuard guard(x.device());
    const GroupedLinear grouped = check_grouped(x, row_group, weight, bias, tau_w, tau_b, coef_w, coef_b, key_w,
                                                key_b, skip, scale_w, group_w);
    const Linear& L = grouped.L;
    const Tensor x2 = x.contiguous();
    const int64_t M = x2.size(0);
    Tensor y = at::empty({M, L.N}, x.options());
    const SortedRows sorted = sort_rows(row_group, grouped.G);
    const Tiles tiles = cut_tiles(sorted, atlas::kLinearTileRows, skip);
    check_launch(atlas::linear_grouped_forward(x2.data_ptr(), L.act, M, L.N, L.Kin, L.weight.data_ptr<float>(),
                                               L.bank, L.T, L.coef_w.data_ptr<float>(), L.P,
                                               L.key_w, fptr_or_null(L.bias), ptr_or_null(L.tau_b),
                                               fptr_or_null(L.coef_b), L.key_b, tiles.seg, y.data_ptr(),
                                               at::cuda::getCurrentCUDAStream()),
                 "atlas_linear_grouped_cuda_forward");
    return y;
}

// (dx (M, in) or empty, dc_w (G, T, P), dc_b (G, T, P) or empty). The rows of dx of the groups in `skip` are left
// unwritten; dc covers every group (zero for a group without rows).
std::tuple<Tensor, Tensor, Tensor> atlas_linear_grouped_cuda_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& row_group, const Tensor& weight, const Tensor& tau_w,
    const std::optional<Tensor>& tau_b, const Tensor& coef_w, int64_t key_w, int64_t key_b, bool needs_input_grad,
    const std::optional<Tensor>& skip, const std::optional<Tensor>& scale_w, int64_t group_w) {
    const c10::cuda::CUDAGuard guard(x.device());
    const GroupedLinear grouped = check_grouped(x, row_group, weight, std::nullopt, tau_w, std::nullopt, coef_w,
                                                std::nullopt, key_w, key_b, skip, scale_w, group_w);
    const Linear& L = grouped.L;
    const int64_t G = grouped.G, M = x.size(0);
    check_device(grad_out, "grad_out", x.device());
    TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == M && grad_out.size(1) == L.N, "grad_out must be (", M,
                ", ", L.N, "), got ", grad_out.sizes());
    if (tau_b.has_value())
        TORCH_CHECK(tau_b->dim() == 2 && tau_b->size(0) == L.T && tau_b->size(1) == L.N, "tau_b must be (T=", L.T,
                    ", ", L.N, "), got ", tau_b->sizes());
    const Tensor x2 = x.contiguous();
    const Tensor dy = grad_out.to(x.scalar_type()).contiguous();
    const auto stream = at::cuda::getCurrentCUDAStream();
    const auto f32 = x.options().dtype(at::kFloat);
    const SortedRows sorted = sort_rows(row_group, G);

    Tensor dx = x.new_empty({0});
    if (needs_input_grad) {
        dx = at::empty_like(x2);
        const Tiles tiles = cut_tiles(sorted, atlas::kLinearTileRows, skip);
        check_launch(atlas::linear_grouped_grad_input(dy.data_ptr(), L.act, M, L.N, L.Kin, L.weight.data_ptr<float>(),
                                                      L.bank, L.T, L.coef_w.data_ptr<float>(),
                                                      L.P, L.key_w, tiles.seg, dx.data_ptr(), stream),
                     "atlas_linear_grouped_cuda_backward (grad x)");
    }

    const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t height = atlas::linear_grouped_grad_coef_rows(M, L.N, L.Kin, num_sms);
    const Tiles dc_tiles = cut_tiles(sorted, height, std::nullopt);
    TORCH_CHECK(dc_tiles.seg.tiles <= atlas::kMaxGridZ, "atlas_linear_grouped: ", G, " groups of ", M, " rows make ",
                dc_tiles.seg.tiles, " coefficient-gradient tiles of ", height, " rows, more than one launch takes (",
                atlas::kMaxGridZ, "); split the batch");
    Tensor workspace = at::empty(
        {atlas::linear_grouped_grad_coef_workspace(L.N, L.Kin, L.T, L.P, dc_tiles.seg.tiles)}, f32);
    Tensor dcw = at::empty({G, L.T, L.P}, f32);
    check_launch(atlas::linear_grouped_grad_coef(dy.data_ptr(), x2.data_ptr(), L.act, M, L.N, L.Kin,
                                                 L.bank, L.T, L.P, L.key_w, dc_tiles.seg,
                                                 workspace.data_ptr<float>(), dcw.data_ptr<float>(), stream),
                 "atlas_linear_grouped_cuda_backward (grad coef_w)");

    Tensor dcb = coef_w.new_empty({0});
    if (tau_b.has_value()) {
        // dc_b[g, t, k] = Σ_{n in partition k} τ_b,t[n] Σ_{m in group g} dy[m, n]: the per-group row sums of dy,
        // then one merge_blocks_backward launch with a block per group.
        Tensor sums = at::empty({G, L.N}, f32);
        Tensor sums_workspace = at::empty({dc_tiles.seg.tiles * L.N}, f32);
        check_launch(atlas::linear_grouped_row_sums(dy.data_ptr(), L.act, L.N, dc_tiles.seg,
                                                    sums_workspace.data_ptr<float>(), sums.data_ptr<float>(), stream),
                     "atlas_linear_grouped_cuda_backward (grad coef_b)");
        dcb = merge_blocks_cuda_backward(sums.unbind(0), std::vector<Tensor>(G, *tau_b),
                                         std::vector<int64_t>(G, key_b), L.P)
                  .permute({1, 0, 2})
                  .contiguous();
    }
    return {dx, dcw, dcb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(atlas_fast, m) {
    // scale_w, group_w: an int8 / int4 tau_w's scales and int4's columns per scale (atlas_fast/quant.py)
    m.def("atlas_linear_cuda_forward(Tensor x, Tensor weight, Tensor? bias, Tensor tau_w, Tensor? tau_b, "
          "Tensor coef_w, Tensor? coef_b, int key_w, int key_b, Tensor? scale_w=None, int group_w=0) -> Tensor");
    m.def("atlas_linear_cuda_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor tau_w, Tensor? tau_b, "
          "Tensor coef_w, int key_w, int key_b, bool needs_input_grad, Tensor? scale_w=None, int group_w=0) "
          "-> (Tensor, Tensor, Tensor)");
    m.def("atlas_linear_cuda_merge(Tensor weight, Tensor tau_w, Tensor coef_w, int key_w, ScalarType dtype) -> Tensor");
    m.def("merge_blocks_cuda(Tensor[] theta0, Tensor[] tau, Tensor coef, int[] keys) -> Tensor[]");
    m.def("merge_blocks_cuda_backward(Tensor[] grads, Tensor[] tau, int[] keys, int partitions) -> Tensor");
    m.def("atlas_linear_grouped_cuda_forward(Tensor x, Tensor row_group, Tensor weight, Tensor? bias, Tensor tau_w, "
          "Tensor? tau_b, Tensor coef_w, Tensor? coef_b, int key_w, int key_b, Tensor? skip, Tensor? scale_w=None, "
          "int group_w=0) -> Tensor");
    m.def("atlas_linear_grouped_cuda_backward(Tensor grad_out, Tensor x, Tensor row_group, Tensor weight, "
          "Tensor tau_w, Tensor? tau_b, Tensor coef_w, int key_w, int key_b, bool needs_input_grad, Tensor? skip, "
          "Tensor? scale_w=None, int group_w=0) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(atlas_fast, CUDA, m) {
    m.impl("atlas_linear_cuda_forward", &atlas_linear_cuda_forward);
    m.impl("atlas_linear_cuda_backward", &atlas_linear_cuda_backward);
    m.impl("atlas_linear_cuda_merge", &atlas_linear_cuda_merge);
    m.impl("merge_blocks_cuda", &merge_blocks_cuda);
    m.impl("merge_blocks_cuda_backward", &merge_blocks_cuda_backward);
    m.impl("atlas_linear_grouped_cuda_forward", &atlas_linear_grouped_cuda_forward);
    m.impl("atlas_linear_grouped_cuda_backward", &atlas_linear_grouped_cuda_backward);
}
