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

// Calls f(a, b) with default-constructed values of the C++ types of two runtime dtypes.
template <typename F>
cudaError_t dispatch2(DType a, DType b, F&& f) {
    auto inner = [&](auto ta) -> cudaError_t {
        switch (b) {
            case DType::f32: return f(ta, float{});
            case DType::bf16: return f(ta, __nv_bfloat16{});
            case DType::f16: return f(ta, __half{});
        }
        return cudaErrorInvalidValue;
    };
    switch (a) {
        case DType::f32: return inner(float{});
        case DType::bf16: return inner(__nv_bfloat16{});
        case DType::f16: return inner(__half{});
    }
    return cudaErrorInvalidValue;
}

}  // namespace atlas
