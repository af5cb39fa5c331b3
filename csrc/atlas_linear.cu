// Fused kernels of the linear op y = x Wᵀ + b with W = W0 + Σ_t c[t, k(i)] τ_t and i = n·Kin + kk.
//
//   forward   y  = x W(c)ᵀ + b(c)                      C = A·B with A = x,   B[kk][n] = W[n][kk]
//   input     dx = dy W(c)                             C = A·B with A = dy,  B[n][kk] = W[n][kk]
//   coef      dc[t, k] = Σ_{i : k(i) = k} τ_t[i] G[i]  G = dyᵀx tile by tile, reduced against every τ_t
//
// W(c) is never stored: each K-step builds its merged tile in shared memory from the W0 and τ tiles (fp32
// combine, then the activation dtype). G is never stored either: a block reduces its finished G tile against
// each τ_t into per-block partial sums, and a second kernel adds the partials in a fixed order, so dc is
// bitwise reproducible. bf16/fp16 activations use tensor cores (WMMA, sm_80+); fp32 uses a plain SIMT
// product, so the fp32 path is exact fp32 and never tf32. The bank may be float32/bf16/fp16 or int8/int4
// (atlas_fast/quant.py): every τ element is read through TauView, which dequantises it in registers (q times its
// row's or group's scale), so a quantised bank is never expanded in memory.
//
// The grouped op (G coefficient sets, a group per row) runs the same kernels on Segments (atlas_kernels.h): as
// multi-adapter serving kernels take an adapter id per request, the rows are sorted into one-group segments and
// every forward/dx block takes a tile of one group's rows, gathered through the sorted row list, and merges its
// tile with that group's coefficients; every dc block accumulates G_g = dyᵀx over a tile of one group's rows.
// The partial sums of a group's blocks are contiguous, and a second kernel adds them in order per group.
#include <mma.h>

#include "atlas_common.cuh"

namespace atlas {
namespace {

// One block computes a BM×BN tile of C, stepping BK along the reduction; four warps, each a 32×32 quarter.
constexpr int BM = 64, BN = 64, BK = 32, THREADS = 128;
static_assert(BM == kLinearTileRows, "grouped forward/dx tiles are cut at the kernels' tile height");
// Shared-memory row lengths. The pads keep every WMMA fragment pointer 32-byte aligned (16-row steps of
// LDA·2 and LDB·2 bytes, 16-column steps of 32 bytes) and the leading dimensions multiples of 8 (4 for Cs).
constexpr int LDA = BK + 8, LDB = BN + 8, LDC = BN + 4;

// acc += As (BM×BK) · Bs (BK×BN), then Cs (BM×BN, fp32) = acc.
template <typename act_t>
struct TileMath {  // bf16 / fp16: tensor cores; warp w owns rows 32·(w/2)…, columns 32·(w%2)…
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2];

    __device__ void zero() {
        for (int i = 0; i < 2; ++i)
            for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
    }

    __device__ void step(const act_t* As, const act_t* Bs) {
        using namespace nvcuda;
        const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
#pragma unroll
        for (int k = 0; k < BK; k += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, act_t, wmma::row_major> a[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, act_t, wmma::row_major> b[2];
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], As + (wm * 32 + i * 16) * LDA + k, LDA);
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], Bs + k * LDB + wn * 32 + j * 16, LDB);
            for (int i = 0; i < 2; ++i)
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
    }

    __device__ void store(float* Cs) {
        const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
        for (int i = 0; i < 2; ++i)
            for (int j = 0; j < 2; ++j)
                nvcuda::wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, acc[i][j], LDC,
                                                nvcuda::wmma::mem_row_major);
    }
};

template <>
struct TileMath<float> {  // fp32: thread (ty, tx) = (tid / 16, tid % 16) owns rows ty + 8i, columns tx + 16j
    static constexpr int RI = BM / (THREADS / 16), CJ = BN / 16;
    float acc[RI][CJ];

    __device__ void zero() {
#pragma unroll
        for (int i = 0; i < RI; ++i)
#pragma unroll
            for (int j = 0; j < CJ; ++j) acc[i][j] = 0.f;
    }

    __device__ void step(const float* As, const float* Bs) {
        const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll 4
        for (int k = 0; k < BK; ++k) {
            float a[RI], b[CJ];
#pragma unroll
            for (int i = 0; i < RI; ++i) a[i] = As[(ty + 8 * i) * LDA + k];
#pragma unroll
            for (int j = 0; j < CJ; ++j) b[j] = Bs[k * LDB + tx + 16 * j];
#pragma unroll
            for (int i = 0; i < RI; ++i)
#pragma unroll
                for (int j = 0; j < CJ; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
    }

    __device__ void store(float* Cs) {
        const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
        for (int i = 0; i < RI; ++i)
#pragma unroll
            for (int j = 0; j < CJ; ++j) Cs[(ty + 8 * i) * LDC + tx + 16 * j] = acc[i][j];
    }
};
static_assert(THREADS == 128 && BM == 64 && BN == 64, "TileMath assumes four warps on a 64×64 tile");

// The row of src at position pos: rows[pos] for a grouped call's sorted rows, else pos itself.
__device__ __forceinline__ int64_t row_at(const int64_t* __restrict__ rows, int64_t pos) {
    return rows != nullptr ? rows[pos] : pos;
}

// dst[r·LD + c] = src[row(row0 + r)·ld + col0 + c] for an R×C tile; zero where position ≥ row_end or col ≥ col_end.
template <int R, int C, int LD, typename T>
__device__ void load_tile(T* dst, const T* __restrict__ src, int64_t ld, int64_t row0, int64_t col0,
                          int64_t row_end, int64_t col_end, const int64_t* __restrict__ rows) {
    for (int e = threadIdx.x; e < R * C; e += THREADS) {
        const int r = e / C, c = e % C;
        const int64_t gr = row0 + r, gc = col0 + c;
        dst[r * LD + c] = (gr < row_end && gc < col_end) ? src[row_at(rows, gr) * ld + gc] : from_float<T>(0.f);
    }
}

// dst[r·LD + c] = src[row(row0 + c)·ld + col0 + r]: the transpose of a tile of row-major src, read along src rows.
template <int R, int C, int LD, typename T>
__device__ void load_tile_transposed(T* dst, const T* __restrict__ src, int64_t ld, int64_t row0, int64_t col0,
                                     int64_t row_end, int64_t col_end, const int64_t* __restrict__ rows) {
    for (int e = threadIdx.x; e < R * C; e += THREADS) {
        const int r = e % R, c = e / R;
        const int64_t gr = row0 + c, gc = col0 + r;
        dst[r * LD + c] = (gr < row_end && gc < col_end) ? src[row_at(rows, gr) * ld + gc] : from_float<T>(0.f);
    }
}

// Quantised banks as kernel types (tags), and TauView: τ_t[n][kk] as fp32 from a bank of any dtype
// (atlas_kernels.h, Bank), so one kernel body serves float, int8 and int4 banks, dequantising in registers.
struct Int8Bank {};
struct Int4Bank {};

template <typename bank_t>
struct TauView {  // float banks: (T, N, Kin) in bank_t
    const bank_t* __restrict__ data;
    int64_t N, Kin;
    __device__ __forceinline__ float at(int64_t t, int64_t n, int64_t kk) const {
        return to_float(data[(t * N + n) * Kin + kk]);
    }
};

template <>
struct TauView<Int8Bank> {  // int8 (T, N, Kin), one scale per row
    const int8_t* __restrict__ data;
    const float* __restrict__ scale;
    int64_t N, Kin;
    __device__ __forceinline__ float at(int64_t t, int64_t n, int64_t kk) const {
        const int64_t row = t * N + n;
        return static_cast<float>(data[row * Kin + kk]) * scale[row];
    }
};

template <>
struct TauView<Int4Bank> {  // int4 (T, N, ⌈Kin/2⌉) bytes, q + 8 per nibble, one scale per `group` columns
    const uint8_t* __restrict__ data;
    const float* __restrict__ scale;
    int64_t N, Kin, group;
    __device__ __forceinline__ float at(int64_t t, int64_t n, int64_t kk) const {
        const int64_t row = t * N + n;
        const unsigned byte = data[row * ((Kin + 1) / 2) + kk / 2];
        const int q = static_cast<int>((kk & 1) != 0 ? byte >> 4 : byte & 15u) - 8;
        return static_cast<float>(q) * scale[row * ((Kin + group - 1) / group) + kk / group];
    }
};

template <typename bank_t>
TauView<bank_t> view_of(const Bank& b, int64_t N, int64_t Kin) {
    return {static_cast<const bank_t*>(b.data), N, Kin};
}
template <>
TauView<Int8Bank> view_of<Int8Bank>(const Bank& b, int64_t N, int64_t Kin) {
    return {static_cast<const int8_t*>(b.data), b.scale, N, Kin};
}
template <>
TauView<Int4Bank> view_of<Int4Bank>(const Bank& b, int64_t N, int64_t Kin) {
    return {static_cast<const uint8_t*>(b.data), b.scale, N, Kin, b.group};
}

// The dtype of a bank's bias task vectors: the bank's own for a float bank, fp32 for a quantised one.
template <typename bank_t> struct BiasOf { using type = bank_t; };
template <> struct BiasOf<Int8Bank> { using type = float; };
template <> struct BiasOf<Int4Bank> { using type = float; };

// Calls f(a, b) with the C++ types of an activation dtype and a bank dtype (a tag for int8 and int4).
template <typename F>
cudaError_t dispatch_linear(DType act, DType bank, F&& f) {
    return dispatch1(act, [&](auto a_t) -> cudaError_t {
        switch (bank) {
            case DType::i8: return f(a_t, Int8Bank{});
            case DType::i4: return f(a_t, Int4Bank{});
            default: return dispatch1(bank, [&](auto b_t) { return f(a_t, b_t); });
        }
    });
}

// W(c)[n][kk] = W0[i] + Σ_t coef[t, k(i)] τ_t[n][kk] with i = n·Kin + kk, summed in fp32.
template <typename View>
__device__ __forceinline__ float merged(const float* __restrict__ w0, const View& tau, int64_t T,
                                        const float* __restrict__ coef, int64_t P, uint32_t key, int64_t n,
                                        int64_t kk) {
    const int64_t i = n * tau.Kin + kk;
    const int p = partition_of(static_cast<uint32_t>(i), key, static_cast<int>(P));
    float v = w0[i];
    for (int64_t t = 0; t < T; ++t) v = fmaf(coef[t * P + p], tau.at(t, n, kk), v);
    return v;
}

// The B tile (BK×BN, row-major, LD = LDB) of the merged weight, starting at reduction index red0 and column
// col0. TRANS: B[kk][n] = W[n][kk] (forward), else B[n][kk] = W[n][kk] (input gradient). Threads walk the
// kk direction fastest so global reads are contiguous.
template <bool TRANS, typename act_t, typename View>
__device__ void load_merged_tile(act_t* Bs, const float* __restrict__ w0, const View& tau, int64_t T,
                                 const float* __restrict__ coef, int64_t P, uint32_t key, int64_t N, int64_t Kin,
                                 int64_t red0, int64_t col0) {
    for (int e = threadIdx.x; e < BK * BN; e += THREADS) {
        const int r = TRANS ? e % BK : e / BN, c = TRANS ? e / BK : e % BN;
        const int64_t n = TRANS ? col0 + c : red0 + r, kk = TRANS ? red0 + r : col0 + c;
        const float v = (n < N && kk < Kin) ? merged(w0, tau, T, coef, P, key, n, kk) : 0.f;
        Bs[r * LDB + c] = from_float<act_t>(v);
    }
}

// Pointers (row-major, contiguous):
//   a     (M, R)   act    x (forward, R = Kin) or dy (input gradient, R = N)
//   w0    (N, Kin) fp32   pre-trained weight;  tau: the bank's view;  coef (G, T, P) fp32
//   bias  (N) fp32, tau_b (T, N) (BiasOf<bank_t>), coef_b (G, T, P) fp32: the merged bias added in the forward,
//         or null
//   out   (M, C)   act    y (C = N) or dx (C = Kin)
// Block x takes BM consecutive rows (ungrouped: G = 1, seg null) or tile x of seg: BM positions of one group's
// segment, whose rows it gathers and scatters through seg.rows, with that group's coefficients.
template <bool TRANS, typename act_t, typename bank_t>
__global__ void __launch_bounds__(THREADS)
merged_gemm_kernel(const act_t* __restrict__ a, int64_t M, int64_t N, int64_t Kin, const float* __restrict__ w0,
                   TauView<bank_t> tau, int64_t T, const float* __restrict__ coef, int64_t P, uint32_t key,
                   const float* __restrict__ bias, const typename BiasOf<bank_t>::type* __restrict__ tau_b,
                   const float* __restrict__ coef_b, uint32_t key_b, Segments seg, act_t* __restrict__ out) {
    __shared__ __align__(128) act_t As[BM * LDA];
    __shared__ __align__(128) act_t Bs[BK * LDB];
    __shared__ __align__(128) float Cs[BM * LDC];
    const int64_t R = TRANS ? Kin : N, C = TRANS ? N : Kin;
    int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM, row_end = M;
    const int64_t col0 = static_cast<int64_t>(blockIdx.y) * BN;
    if (seg.seg_start != nullptr) {
        const int64_t g = seg.tile_group[blockIdx.x];
        row0 = seg.tile_start[blockIdx.x];
        row_end = seg.seg_start[g + 1];
        coef += g * T * P;
        if (coef_b != nullptr) coef_b += g * T * P;
    }

    TileMath<act_t> math;
    math.zero();
    for (int64_t k0 = 0; k0 < R; k0 += BK) {
        load_tile<BM, BK, LDA>(As, a, R, row0, k0, row_end, R, seg.rows);
        load_merged_tile<TRANS>(Bs, w0, tau, T, coef, P, key, N, Kin, k0, col0);
        __syncthreads();
        math.step(As, Bs);
        __syncthreads();
    }
    math.store(Cs);
    __syncthreads();

    for (int e = threadIdx.x; e < BM * BN; e += THREADS) {
        const int r = e / BN, c = e % BN;
        const int64_t m = row0 + r, col = col0 + c;
        if (m >= row_end || col >= C) continue;
        float v = Cs[r * LDC + c];
        if (bias != nullptr) {
            float b = bias[col];
            if (tau_b != nullptr) {
                const int p = partition_of(static_cast<uint32_t>(col), key_b, static_cast<int>(P));
                for (int64_t t = 0; t < T; ++t) b = fmaf(coef_b[t * P + p], to_float(tau_b[t * N + col]), b);
            }
            v += b;
        }
        out[row_at(seg.rows, m) * C + col] = from_float<act_t>(v);
    }
}

// Per-block partials of dc. Block (bx, by, bz) forms the G = dyᵀx tile of rows n0 = 64·bx, columns
// kk0 = 64·by over the token range [bz·m_chunk, (bz + 1)·m_chunk) (grouped: the positions of seg's tile bz, of
// one group's rows), then writes
//   partial[slot, t, k] = Σ_{i in tile, k(i) = k} τ_t[i] G[i],  slot = (bz·gridDim.y + by)·gridDim.x + bx.
// dy (M, N) act; x (M, Kin) act; tau: the bank's view; partial (slots, T, P) fp32.
template <typename act_t, typename bank_t>
__global__ void __launch_bounds__(THREADS)
grad_coef_kernel(const act_t* __restrict__ dy, const act_t* __restrict__ x, int64_t M, int64_t N, int64_t Kin,
                 TauView<bank_t> tau, int64_t T, int64_t P, uint32_t key, int64_t m_chunk, Segments seg,
                 float* __restrict__ partial) {
    __shared__ __align__(128) act_t As[BM * LDA];
    __shared__ __align__(128) act_t Bs[BK * LDB];
    __shared__ __align__(128) float Cs[BM * LDC];
    __shared__ float scratch[THREADS / 32];
    const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BM, kk0 = static_cast<int64_t>(blockIdx.y) * BN;
    int64_t m_begin = static_cast<int64_t>(blockIdx.z) * m_chunk, m_end = M;
    if (seg.seg_start != nullptr) {
        m_begin = seg.tile_start[blockIdx.z];
        m_end = seg.seg_start[seg.tile_group[blockIdx.z] + 1];
    }
    m_end = m_begin + m_chunk < m_end ? m_begin + m_chunk : m_end;

    TileMath<act_t> math;
    math.zero();
    for (int64_t m0 = m_begin; m0 < m_end; m0 += BK) {
        load_tile_transposed<BM, BK, LDA>(As, dy, N, m0, n0, m_end, N, seg.rows);  // As[n][m] = dy[row(m)][n]
        load_tile<BK, BN, LDB>(Bs, x, Kin, m0, kk0, m_end, Kin, seg.rows);         // Bs[m][kk] = x[row(m)][kk]
        __syncthreads();
        math.step(As, Bs);
        __syncthreads();
    }
    math.store(Cs);
    __syncthreads();

    // Thread-owned elements of the tile, with their partition (-1 outside the weight).
    constexpr int PER = BM * BN / THREADS;
    float g[PER];
    int part[PER];
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        const int e = threadIdx.x + j * THREADS, r = e / BN, c = e % BN;
        const int64_t n = n0 + r, kk = kk0 + c;
        const bool inside = n < N && kk < Kin;
        g[j] = inside ? Cs[r * LDC + c] : 0.f;
        part[j] = inside ? partition_of(static_cast<uint32_t>(n * Kin + kk), key, static_cast<int>(P)) : -1;
    }
    const int64_t slot = (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    for (int64_t t = 0; t < T; ++t) {
        float prod[PER];
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            const int e = threadIdx.x + j * THREADS;
            prod[j] = part[j] >= 0 ? g[j] * tau.at(t, n0 + e / BN, kk0 + e % BN) : 0.f;
        }
        store_partition_sums<THREADS, PER>(prod, part, P, scratch, partial + (slot * T + t) * P);
    }
}

// out[g, j] = Σ_s partial[s, j] for j < width over the slots s of group g, summed in order: every slot when
// first_tile is null (one group), else [first_tile[g]·per_tile, first_tile[g + 1]·per_tile).
__global__ void sum_partials_kernel(const float* __restrict__ partial, int64_t slots, const int64_t* first_tile,
                                    int64_t per_tile, int64_t groups, int64_t width, float* __restrict__ out) {
    const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (j >= groups * width) return;
    const int64_t g = j / width, w = j % width;
    const int64_t begin = first_tile != nullptr ? first_tile[g] * per_tile : 0;
    const int64_t end = first_tile != nullptr ? first_tile[g + 1] * per_tile : slots;
    float s = 0.f;
    for (int64_t k = begin; k < end; ++k) s += partial[k * width + w];
    out[j] = s;
}

// partial[tile, n] = Σ_p dy[rows[p], n] in fp32 over the positions p of seg's tile `tile` = blockIdx.y, n < N: a
// group's share of Σ_m dy[m] for its bias coefficients, tile by tile so that a large group is summed in parallel.
template <typename act_t>
__global__ void row_sums_kernel(const act_t* __restrict__ dy, int64_t N, Segments seg, float* __restrict__ partial) {
    const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const int64_t tile = blockIdx.y, begin = seg.tile_start[tile], seg_end = seg.seg_start[seg.tile_group[tile] + 1];
    const int64_t end = begin + seg.height < seg_end ? begin + seg.height : seg_end;
    float s = 0.f;
    for (int64_t p = begin; p < end; ++p) s += to_float(dy[seg.rows[p] * N + n]);
    partial[tile * N + n] = s;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Token-range splits of the coefficient gradient: enough blocks to fill the GPU twice, yet every split keeps
// at least 128 tokens so that each τ tile is not re-read for little work. Returns the chunk length.
int64_t grad_coef_chunk(int64_t M, int64_t N, int64_t Kin, int num_sms) {
    const int64_t tiles = ceil_div(N, BM) * ceil_div(Kin, BN);
    const int64_t wanted = ceil_div(2 * static_cast<int64_t>(num_sms), tiles);
    const int64_t most = M / 128 > 1 ? M / 128 : 1;
    const int64_t splits = wanted < most ? wanted : most;
    const int64_t chunk = ceil_div(ceil_div(M > 0 ? M : 1, splits), BK) * BK;
    return chunk;
}

int64_t grad_coef_slots(int64_t M, int64_t N, int64_t Kin, int num_sms) {
    const int64_t splits = M > 0 ? ceil_div(M, grad_coef_chunk(M, N, Kin, num_sms)) : 1;
    return ceil_div(N, BM) * ceil_div(Kin, BN) * splits;
}

// Grid rows: ⌈M / BM⌉ row tiles, or seg's tiles for a grouped call.
template <typename act_t, typename bank_t, bool TRANS>
cudaError_t launch_merged_gemm(const void* a, int64_t M, int64_t N, int64_t Kin, const float* w0, const Bank& bank,
                               int64_t T, const float* coef, int64_t P, uint32_t key, const float* bias,
                               const void* tau_b, const float* coef_b, uint32_t key_b, const Segments& seg,
                               void* out, cudaStream_t stream) {
    const int64_t C = TRANS ? N : Kin, tiles = seg.seg_start != nullptr ? seg.tiles : ceil_div(M, BM);
    if (tiles == 0 || C == 0) return cudaSuccess;
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(ceil_div(C, BN)));
    merged_gemm_kernel<TRANS, act_t, bank_t><<<grid, THREADS, 0, stream>>>(
        static_cast<const act_t*>(a), M, N, Kin, w0, view_of<bank_t>(bank, N, Kin), T, coef, P, key, bias,
        static_cast<const typename BiasOf<bank_t>::type*>(tau_b), coef_b, key_b, seg, static_cast<act_t*>(out));
    return cudaGetLastError();
}

// The dc kernel on a (⌈N / BM⌉, ⌈Kin / BN⌉, splits) grid, token ranges of m_chunk rows (seg's tiles when grouped).
cudaError_t launch_grad_coef(const void* dy, const void* x, DType act, int64_t M, int64_t N, int64_t Kin,
                             const Bank& bank, int64_t T, int64_t P, uint32_t key, int64_t m_chunk, int64_t splits,
                             const Segments& seg, float* workspace, cudaStream_t stream) {
    if (splits > kMaxGridZ) return cudaErrorInvalidConfiguration;
    const dim3 grid(static_cast<unsigned>(ceil_div(N, BM)), static_cast<unsigned>(ceil_div(Kin, BN)),
                    static_cast<unsigned>(splits));
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
    return dispatch_linear(act, bank.dtype, [&](auto a_t, auto b_t) {
        using act_t = decltype(a_t);
        using bank_t = decltype(b_t);
        grad_coef_kernel<act_t, bank_t><<<grid, THREADS, 0, stream>>>(
            static_cast<const act_t*>(dy), static_cast<const act_t*>(x), M, N, Kin, view_of<bank_t>(bank, N, Kin),
            T, P, key, m_chunk, seg, workspace);
        return cudaGetLastError();
    });
}

}  // namespace

cudaError_t linear_forward(const void* x, DType act, int64_t M, int64_t N, int64_t Kin, const float* w0,
                           const Bank& bank, int64_t T, const float* coef, int64_t P, uint32_t key,
                           const float* bias, const void* tau_b, const float* coef_b, uint32_t key_b, void* y,
                           cudaStream_t stream) {
    return linear_grouped_forward(x, act, M, N, Kin, w0, bank, T, coef, P, key, bias, tau_b, coef_b, key_b,
                                  Segments{}, y, stream);
}

cudaError_t linear_grad_input(const void* dy, DType act, int64_t M, int64_t N, int64_t Kin, const float* w0,
                              const Bank& bank, int64_t T, const float* coef, int64_t P, uint32_t key,
                              void* dx, cudaStream_t stream) {
    return linear_grouped_grad_input(dy, act, M, N, Kin, w0, bank, T, coef, P, key, Segments{}, dx, stream);
}

int64_t linear_grad_coef_workspace(int64_t M, int64_t N, int64_t Kin, int64_t T, int64_t P, int num_sms) {
    return grad_coef_slots(M, N, Kin, num_sms) * T * P;
}

cudaError_t linear_grad_coef(const void* dy, const void* x, DType act, int64_t M, int64_t N, int64_t Kin,
                             const Bank& bank, int64_t T, int64_t P, uint32_t key, float* workspace,
                             int num_sms, float* dc, cudaStream_t stream) {
    if (T * P == 0) return cudaSuccess;
    if (N == 0 || Kin == 0) return cudaMemsetAsync(dc, 0, sizeof(float) * T * P, stream);
    const int64_t chunk = grad_coef_chunk(M, N, Kin, num_sms);
    const int64_t splits = M > 0 ? ceil_div(M, chunk) : 1;
    const cudaError_t err = launch_grad_coef(dy, x, act, M, N, Kin, bank, T, P, key, chunk, splits, Segments{},
                                             workspace, stream);
    if (err != cudaSuccess) return err;
    const int64_t width = T * P, slots = grad_coef_slots(M, N, Kin, num_sms);
    sum_partials_kernel<<<static_cast<unsigned>(ceil_div(width, 128)), 128, 0, stream>>>(workspace, slots, nullptr,
                                                                                          0, 1, width, dc);
    return cudaGetLastError();
}

cudaError_t linear_grouped_forward(const void* x, DType act, int64_t M, int64_t N, int64_t Kin, const float* w0,
                                   const Bank& bank, int64_t T, const float* coef, int64_t P,
                                   uint32_t key, const float* bias, const void* tau_b, const float* coef_b,
                                   uint32_t key_b, const Segments& seg, void* y, cudaStream_t stream) {
    return dispatch_linear(act, bank.dtype, [&](auto a_t, auto b_t) {
        return launch_merged_gemm<decltype(a_t), decltype(b_t), true>(x, M, N, Kin, w0, bank, T, coef, P, key, bias,
                                                                      tau_b, coef_b, key_b, seg, y, stream);
    });
}

cudaError_t linear_grouped_grad_input(const void* dy, DType act, int64_t M, int64_t N, int64_t Kin,
                                      const float* w0, const Bank& bank, int64_t T, const float* coef,
                                      int64_t P, uint32_t key, const Segments& seg, void* dx, cudaStream_t stream) {
    return dispatch_linear(act, bank.dtype, [&](auto a_t, auto b_t) {
        return launch_merged_gemm<decltype(a_t), decltype(b_t), false>(dy, M, N, Kin, w0, bank, T, coef, P, key,
                                                                       nullptr, nullptr, nullptr, 0, seg, dx, stream);
    });
}

int64_t linear_grouped_grad_coef_rows(int64_t M, int64_t N, int64_t Kin, int num_sms) {
    return N > 0 && Kin > 0 ? grad_coef_chunk(M, N, Kin, num_sms) : BK;  // an empty weight has no dc tiles to fill
}

int64_t linear_grouped_grad_coef_workspace(int64_t N, int64_t Kin, int64_t T, int64_t P, int64_t tiles) {
    return ceil_div(N, BM) * ceil_div(Kin, BN) * tiles * T * P;
}

cudaError_t linear_grouped_grad_coef(const void* dy, const void* x, DType act, int64_t M, int64_t N, int64_t Kin,
                                     const Bank& bank, int64_t T, int64_t P, uint32_t key,
                                     const Segments& seg, float* workspace, float* dc, cudaStream_t stream) {
    const int64_t width = T * P;
    if (seg.groups * width == 0) return cudaSuccess;
    const cudaError_t err = launch_grad_coef(dy, x, act, M, N, Kin, bank, T, P, key, seg.height, seg.tiles, seg,
                                             workspace, stream);
    if (err != cudaSuccess) return err;
    // A group without tiles (no rows, or N·Kin = 0) sums an empty range: dc = 0.
    sum_partials_kernel<<<static_cast<unsigned>(ceil_div(seg.groups * width, 128)), 128, 0, stream>>>(
        workspace, 0, seg.first_tile, ceil_div(N, BM) * ceil_div(Kin, BN), seg.groups, width, dc);
    return cudaGetLastError();
}

cudaError_t linear_grouped_row_sums(const void* dy, DType act, int64_t N, const Segments& seg, float* workspace,
                                    float* sums, cudaStream_t stream) {
    if (seg.groups * N == 0) return cudaSuccess;
    if (seg.tiles > kMaxGridZ) return cudaErrorInvalidConfiguration;
    if (seg.tiles > 0) {
        const cudaError_t err = dispatch1(act, [&](auto a_t) {
            using act_t = decltype(a_t);
            const dim3 grid(static_cast<unsigned>(ceil_div(N, 128)), static_cast<unsigned>(seg.tiles));
            row_sums_kernel<act_t><<<grid, 128, 0, stream>>>(static_cast<const act_t*>(dy), N, seg, workspace);
            return cudaGetLastError();
        });
        if (err != cudaSuccess) return err;
    }
    sum_partials_kernel<<<static_cast<unsigned>(ceil_div(seg.groups * N, 128)), 128, 0, stream>>>(
        workspace, 0, seg.first_tile, 1, seg.groups, N, sums);
    return cudaGetLastError();
}

}  // namespace atlas
