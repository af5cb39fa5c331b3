// Multi-tensor merge of many small blocks (biases, norm scales, embeddings, projections) in one launch each way:
//
//   forward   out_b[i]     = θ0_b[i] + Σ_t c[t, b, k(b, i)] τ_t,b[i]
//   backward  dc[t, b, k]  = Σ_{i : k(b, i) = k} τ_t,b[i] g_b[i]
//
// Every block is cut into chunks of kMergeChunk elements and one thread block handles one chunk, finding its
// tensor by binary search over the table's first-chunk column. The backward writes one partial sum per
// (chunk, t, k) and a second kernel adds each tensor's chunks in order, so dc is bitwise reproducible.
// merge_block is the forward for one block into another dtype: the linear op's merge-once weight, whose
// coefficient gradient is the fused dc kernel of atlas_linear.cu.
#include "atlas_common.cuh"

namespace atlas {
namespace {

constexpr int THREADS = 256;
constexpr int PER = static_cast<int>(kMergeChunk / THREADS);
static_assert(kMergeChunk % THREADS == 0, "a chunk is whole rounds of the thread block");

enum Field { kSrc = 0, kTau = 1, kOut = 2, kNumel = 3, kKey = 4, kFirstChunk = 5 };

__device__ __forceinline__ int64_t field(const int64_t* table, int64_t b, Field f) {
    return table[b * kBlockFields + f];
}

// The block b with first_chunk[b] <= chunk < first_chunk[b + 1]; row B holds the total, so b is never empty.
__device__ int64_t block_of_chunk(const int64_t* table, int64_t B, int64_t chunk) {
    int64_t lo = 0, hi = B;
    while (hi - lo > 1) {
        const int64_t mid = (lo + hi) / 2;
        if (field(table, mid, kFirstChunk) <= chunk) lo = mid; else hi = mid;
    }
    return lo;
}

// table: see atlas_kernels.h (θ0 and out in value_t, τ (T, numel) in bank_t); coef (T, B, K) fp32.
template <typename value_t, typename bank_t>
__global__ void __launch_bounds__(THREADS)
merge_kernel(const int64_t* __restrict__ table, int64_t B, int64_t T, const float* __restrict__ coef, int64_t K) {
    const int64_t chunk = blockIdx.x, b = block_of_chunk(table, B, chunk);
    const auto* theta0 = reinterpret_cast<const value_t*>(field(table, b, kSrc));
    const auto* tau = reinterpret_cast<const bank_t*>(field(table, b, kTau));
    auto* out = reinterpret_cast<value_t*>(field(table, b, kOut));
    const int64_t numel = field(table, b, kNumel);
    const uint32_t key = static_cast<uint32_t>(field(table, b, kKey));
    const int64_t begin = (chunk - field(table, b, kFirstChunk)) * kMergeChunk;
    const int64_t end = begin + kMergeChunk < numel ? begin + kMergeChunk : numel;
    for (int64_t i = begin + threadIdx.x; i < end; i += THREADS) {
        const int p = partition_of(static_cast<uint32_t>(i), key, static_cast<int>(K));
        out[i] = from_float<value_t>(merged_element(to_float(theta0[i]), tau, numel, i, T, coef + b * K + p, B * K));
    }
}

// One block, merged into another dtype (the linear op's merge-once weight): θ0 (numel) in value_t, τ (T, numel)
// in bank_t, coef (T, P) fp32, out (numel) in out_t. A grid-stride loop, one element per thread and step.
template <typename value_t, typename bank_t, typename out_t>
__global__ void __launch_bounds__(THREADS)
merge_block_kernel(const value_t* __restrict__ theta0, const bank_t* __restrict__ tau, int64_t numel, int64_t T,
                   const float* __restrict__ coef, int64_t P, uint32_t key, out_t* __restrict__ out) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * THREADS;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x; i < numel; i += stride) {
        const int p = partition_of(static_cast<uint32_t>(i), key, static_cast<int>(P));
        out[i] = from_float<out_t>(merged_element(to_float(theta0[i]), tau, numel, i, T, coef + p, P));
    }
}

// partial (chunks, T, K) fp32: one chunk's share of dc for its block; g (the src field) in value_t.
template <typename value_t, typename bank_t>
__global__ void __launch_bounds__(THREADS)
reduce_kernel(const int64_t* __restrict__ table, int64_t B, int64_t T, int64_t K, float* __restrict__ partial) {
    __shared__ float scratch[THREADS / 32];
    const int64_t chunk = blockIdx.x, b = block_of_chunk(table, B, chunk);
    const auto* g = reinterpret_cast<const value_t*>(field(table, b, kSrc));
    const auto* tau = reinterpret_cast<const bank_t*>(field(table, b, kTau));
    const int64_t numel = field(table, b, kNumel);
    const uint32_t key = static_cast<uint32_t>(field(table, b, kKey));
    const int64_t begin = (chunk - field(table, b, kFirstChunk)) * kMergeChunk;

    float gv[PER];
    int part[PER];  // -1 past the end of the block
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        const int64_t i = begin + threadIdx.x + j * THREADS;
        const bool inside = i < numel;
        gv[j] = inside ? to_float(g[i]) : 0.f;
        part[j] = inside ? partition_of(static_cast<uint32_t>(i), key, static_cast<int>(K)) : -1;
    }
    for (int64_t t = 0; t < T; ++t) {
        float prod[PER];
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            const int64_t i = begin + threadIdx.x + j * THREADS;
            prod[j] = part[j] >= 0 ? gv[j] * to_float(tau[t * numel + i]) : 0.f;
        }
        store_partition_sums<THREADS, PER>(prod, part, K, scratch, partial + (chunk * T + t) * K);
    }
}

// dc[t, b, k] = Σ over block b's chunks c, in order, of partial[c, t, k].
__global__ void sum_chunks_kernel(const int64_t* __restrict__ table, int64_t B, int64_t T, int64_t K,
                                  const float* __restrict__ partial, float* __restrict__ dc) {
    const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (j >= T * B * K) return;
    const int64_t k = j % K, b = (j / K) % B, t = j / (K * B);
    float s = 0.f;
    for (int64_t c = field(table, b, kFirstChunk); c < field(table, b + 1, kFirstChunk); ++c)
        s += partial[(c * T + t) * K + k];
    dc[j] = s;
}

}  // namespace

cudaError_t merge_blocks(const int64_t* table, int64_t B, int64_t chunks, DType value, DType bank, int64_t T,
                         const float* coef, int64_t K, cudaStream_t stream) {
    if (chunks == 0) return cudaSuccess;
    return dispatch2(value, bank, [&](auto v_t, auto b_t) {
        merge_kernel<decltype(v_t), decltype(b_t)><<<static_cast<unsigned>(chunks), THREADS, 0, stream>>>(
            table, B, T, coef, K);
        return cudaGetLastError();
    });
}

cudaError_t merge_block(const void* theta0, DType value, const void* tau, DType bank, int64_t numel, int64_t T,
                        const float* coef, int64_t P, uint32_t key, void* out, DType out_dtype, cudaStream_t stream) {
    if (numel == 0) return cudaSuccess;
    // Enough blocks to cover the block once, capped at a grid the loop strides over.
    const int64_t blocks = (numel + THREADS - 1) / THREADS < (1 << 20) ? (numel + THREADS - 1) / THREADS : (1 << 20);
    return dispatch3(value, bank, out_dtype, [&](auto v_t, auto b_t, auto o_t) {
        using value_t = decltype(v_t);
        using bank_t = decltype(b_t);
        using out_t = decltype(o_t);
        merge_block_kernel<value_t, bank_t, out_t><<<static_cast<unsigned>(blocks), THREADS, 0, stream>>>(
            static_cast<const value_t*>(theta0), static_cast<const bank_t*>(tau), numel, T, coef, P, key,
            static_cast<out_t*>(out));
        return cudaGetLastError();
    });
}

cudaError_t merge_blocks_backward(const int64_t* table, int64_t B, int64_t chunks, DType value, DType bank,
                                  int64_t T, int64_t K, float* workspace, float* dc, cudaStream_t stream) {
    const int64_t width = T * B * K;
    if (width == 0) return cudaSuccess;
    if (chunks > 0) {
        const cudaError_t err = dispatch2(value, bank, [&](auto v_t, auto b_t) {
            reduce_kernel<decltype(v_t), decltype(b_t)><<<static_cast<unsigned>(chunks), THREADS, 0, stream>>>(
                table, B, T, K, workspace);
            return cudaGetLastError();
        });
        if (err != cudaSuccess) return err;
    }
    sum_chunks_kernel<<<static_cast<unsigned>((width + 255) / 256), 256, 0, stream>>>(table, B, T, K, workspace, dc);
    return cudaGetLastError();
}

}  // namespace atlas
