// Host-side launchers of the atlas CUDA kernels. The .cu files include no torch headers, so they compile
// quickly and alone; bindings.cpp checks tensors, allocates outputs and calls these with raw pointers.
// Every launcher enqueues on `stream` and returns cudaGetLastError().
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace atlas {

// i8 and i4 are quantised task-vector banks (atlas_fast/quant.py), taken by the linear kernels only (Bank).
enum class DType { f32, bf16, f16, i8, i4 };

// The task vectors of an (N, Kin) weight, T of them, row-major:
//   f32 / bf16 / f16  data (T, N, Kin)
//   i8                data int8 (T, N, Kin), q ∈ [−127, 127]; scale fp32 (T, N): τ = q · scale[t, n]
//   i4                data uint8 (T, N, ⌈Kin/2⌉), column 2j in the low nibble and 2j + 1 in the high one, each
//                     q + 8; scale fp32 (T, N, ⌈Kin/group⌉): τ = q · scale[t, n, kk / group]
// A quantised bank's bias task vectors (tau_b) are fp32; a float bank's are in its dtype.
struct Bank {
    const void* data = nullptr;
    DType dtype = DType::f32;
    const float* scale = nullptr;
    int64_t group = 0;
};

// The rows of a grouped linear call (atlas_linear_grouped_*), sorted into one-group segments and cut into tiles
// of one group; device int64 arrays built by bindings.cpp:
//   rows (M)            row indices sorted by group (stable); group g owns rows[seg_start[g] : seg_start[g + 1]]
//   seg_start (G + 1)
//   tile_group, tile_start (tiles)  the group and first position in `rows` of each tile of `height` positions
//   first_tile (G + 1)  group g owns tiles [first_tile[g], first_tile[g + 1])
// A default-constructed Segments (seg_start null) is the ungrouped call: one group, rows in order.
struct Segments {
    const int64_t* rows = nullptr;
    const int64_t* seg_start = nullptr;
    const int64_t* tile_group = nullptr;
    const int64_t* tile_start = nullptr;
    const int64_t* first_tile = nullptr;
    int64_t groups = 1, tiles = 0, height = 0;
};

// Tile height of the forward and input-gradient kernels: the `height` of their Segments.
constexpr int64_t kLinearTileRows = 64;
// The most coefficient-gradient tiles (Segments.tiles, or token splits) one call takes: CUDA's grid z limit.
constexpr int64_t kMaxGridZ = 65535;

// Linear op. Row-major contiguous operands:
//   x, dy (M, N or Kin) in act; w0 (N, Kin) fp32; bank: the task vectors (T, N, Kin) (Bank); coef (T, P) fp32;
//   bias (N) fp32 or null; tau_b (T, N) or null, in the bank's dtype (fp32 for i8 / i4); coef_b (T, P) fp32 or null.

// y (M, N) in act = x (W0 + Σ c τ)ᵀ + b0 + Σ c_b τ_b.
cudaError_t linear_forward(const void* x, DType act, int64_t M, int64_t N, int64_t Kin, const float* w0,
                           const Bank& bank, int64_t T, const float* coef, int64_t P, uint32_t key,
                           const float* bias, const void* tau_b, const float* coef_b, uint32_t key_b, void* y,
                           cudaStream_t stream);

// dx (M, Kin) in act = dy (W0 + Σ c τ).
cudaError_t linear_grad_input(const void* dy, DType act, int64_t M, int64_t N, int64_t Kin, const float* w0,
                              const Bank& bank, int64_t T, const float* coef, int64_t P, uint32_t key,
                              void* dx, cudaStream_t stream);

// Number of per-block partial sums linear_grad_coef needs in `workspace` (floats), for this device's SM count.
int64_t linear_grad_coef_workspace(int64_t M, int64_t N, int64_t Kin, int64_t T, int64_t P, int num_sms);

// dc (T, P) fp32: dc[t, k] = Σ_{i : k(i) = k} τ_t[i] (dyᵀx)[i], without forming dyᵀx in memory.
cudaError_t linear_grad_coef(const void* dy, const void* x, DType act, int64_t M, int64_t N, int64_t Kin,
                             const Bank& bank, int64_t T, int64_t P, uint32_t key, float* workspace,
                             int num_sms, float* dc, cudaStream_t stream);

// Grouped linear op: as above with coef, coef_b (G, T, P) and row m computed on the coefficients of its group.
// The forward and input gradient take Segments of height kLinearTileRows and write only the rows of the groups
// that have tiles; the coefficient gradient takes Segments of height linear_grouped_grad_coef_rows and writes
// dc (G, T, P), zero for groups without rows.
cudaError_t linear_grouped_forward(const void* x, DType act, int64_t M, int64_t N, int64_t Kin, const float* w0,
                                   const Bank& bank, int64_t T, const float* coef, int64_t P,
                                   uint32_t key, const float* bias, const void* tau_b, const float* coef_b,
                                   uint32_t key_b, const Segments& seg, void* y, cudaStream_t stream);

cudaError_t linear_grouped_grad_input(const void* dy, DType act, int64_t M, int64_t N, int64_t Kin,
                                      const float* w0, const Bank& bank, int64_t T, const float* coef,
                                      int64_t P, uint32_t key, const Segments& seg, void* dx, cudaStream_t stream);

// The tile height of the grouped coefficient gradient's Segments (rows one block accumulates), and the floats
// its `workspace` needs for seg.tiles such tiles.
int64_t linear_grouped_grad_coef_rows(int64_t M, int64_t N, int64_t Kin, int num_sms);
int64_t linear_grouped_grad_coef_workspace(int64_t N, int64_t Kin, int64_t T, int64_t P, int64_t tiles);

cudaError_t linear_grouped_grad_coef(const void* dy, const void* x, DType act, int64_t M, int64_t N, int64_t Kin,
                                     const Bank& bank, int64_t T, int64_t P, uint32_t key,
                                     const Segments& seg, float* workspace, float* dc, cudaStream_t stream);

// sums (G, N) fp32: sums[g] = Σ of the rows of dy (M, N) in act of group g, on the coefficient gradient's Segments
// (its height); workspace holds seg.tiles·N floats. Summed in a fixed order, as dc is.
cudaError_t linear_grouped_row_sums(const void* dy, DType act, int64_t N, const Segments& seg, float* workspace,
                                    float* sums, cudaStream_t stream);

// W(c) = θ0 + Σ_t coef[t, k(i)] τ_t[i] for one block of `numel` elements (the merge-once strategy of the linear
// op): θ0 in `value`, τ (T, numel) in `bank` (a float dtype), coef (T, P) fp32, out in `out_dtype` (the activation
// dtype).
cudaError_t merge_block(const void* theta0, DType value, const void* tau, DType bank, int64_t numel, int64_t T,
                        const float* coef, int64_t P, uint32_t key, void* out, DType out_dtype, cudaStream_t stream);

// Multi-tensor blocks. `table` is a device int64 array of B rows of kBlockFields entries:
//   {θ0 or g pointer, τ pointer, output pointer (unused by the backward), numel, key, first chunk};
// row B holds only the total chunk count in its "first chunk" field. Chunks of kMergeChunk elements.
constexpr int kBlockFields = 6;
constexpr int64_t kMergeChunk = 2048;

// out_b = θ0_b + Σ_t coef[t, b, k(i)] τ_t,b for every block; coef (T, B, K) fp32; θ0 and out in `value`.
cudaError_t merge_blocks(const int64_t* table, int64_t B, int64_t chunks, DType value, DType bank, int64_t T,
                         const float* coef, int64_t K, cudaStream_t stream);

// dc (T, B, K) fp32 = Σ_{i in partition k} τ_t,b[i] g_b[i]; workspace holds chunks·T·K floats.
cudaError_t merge_blocks_backward(const int64_t* table, int64_t B, int64_t chunks, DType value, DType bank,
                                  int64_t T, int64_t K, float* workspace, float* dc, cudaStream_t stream);

}  // namespace atlas
