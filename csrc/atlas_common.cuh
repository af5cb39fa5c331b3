// Device helpers shared by the atlas kernels: element conversion, the partition hash, and deterministic
// block-wide sums.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "atlas_kernels.h"

namespace atlas {

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__, so nothing converts implicitly.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

// MurmurHash3's 32-bit finaliser; atlas_fast/hashing.py defines the same partition bit for bit.
__device__ __forceinline__ uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h;
}

// Partition of flat element i of a block with key `key` among P partitions.
__device__ __forceinline__ int partition_of(uint32_t i, uint32_t key, int P) {
    return P == 1 ? 0 : static_cast<int>(fmix32(i ^ key) % static_cast<uint32_t>(P));
}

// θ0[i] + Σ_t coef[t·coef_stride + p] τ_t[i] in fp32, with τ_t at tau + t·numel: the merged element i of
// partition p. coef_stride is P for one block's (T, P) coefficients, B·K for the (T, B, K) of many blocks.
template <typename bank_t>
__device__ __forceinline__ float merged_element(float theta, const bank_t* __restrict__ tau, int64_t numel, int64_t i,
                                                int64_t T, const float* __restrict__ coef, int64_t coef_stride) {
    float v = theta;
    for (int64_t t = 0; t < T; ++t) v = fmaf(coef[t * coef_stride], to_float(tau[t * numel + i]), v);
    return v;
}

// Sum of `v` over the thread block, valid in thread 0. Fixed shuffle tree and fixed warp order, so the result
// is bitwise reproducible. `scratch` holds one float per warp; the trailing barrier lets callers reuse it.
template <int THREADS>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    static_assert(THREADS % 32 == 0, "whole warps");
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, offset);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.f;
    if (threadIdx.x == 0)
        for (int w = 0; w < THREADS / 32; ++w) total += scratch[w];
    __syncthreads();
    return total;
}

// out[p] = Σ_j [part[j] == p] prod[j] over the thread block, for p < P, written by thread 0 (part[j] < 0: no
// element). Reproducible as block_sum is.
template <int THREADS, int PER>
__device__ __forceinline__ void store_partition_sums(const float (&prod)[PER], const int (&part)[PER], int64_t P,
                                                     float* scratch, float* out) {
    for (int64_t p = 0; p < P; ++p) {
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < PER; ++j) s += part[j] == p ? prod[j] : 0.f;
        s = block_sum<THREADS>(s, scratch);
        if (threadIdx.x == 0) out[p] = s;
    }
}

// Calls f(v) with a default-constructed value of the C++ type of a runtime dtype.
template <typename F>
cudaError_t dispatch1(DType a, F&& f) {
    switch (a) {
        case DType::f32: return f(float{});
        case DType::bf16: return f(__nv_bfloat16{});
        case DType::f16: return f(__half{});
        case DType::i8:
        case DType::i4: break;  // quantised banks: the linear kernels' dispatch_bank
    }
    return cudaErrorInvalidValue;
}

// Calls f(a, b) with default-constructed values of the C++ types of two runtime dtypes.
template <typename F>
cudaError_t dispatch2(DType a, DType b, F&& f) {
    return dispatch1(a, [&](auto ta) { return dispatch1(b, [&](auto tb) { return f(ta, tb); }); });
}

// Calls f(a, b, c) likewise for three runtime dtypes.
template <typename F>
cudaError_t dispatch3(DType a, DType b, DType c, F&& f) {
    return dispatch2(a, b, [&](auto ta, auto tb) { return dispatch1(c, [&](auto tc) { return f(ta, tb, tc); }); });
}

}  // namespace atlas
