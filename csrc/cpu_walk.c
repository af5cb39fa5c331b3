/* One pass of the torch backend over a block's task vectors on a CPU (atlas_fast/backends/cpu_native.py):

       merged[i] = base[i] + Σ_t coef[t, k(i)] τ_t[i]     when merged is given (base: merged itself when NULL)
       dc[t, k]  += Σ_{i : k(i) = k} τ_t[i] g[i]          when g is given

   τ is T rows of n elements (row stride ld) in float32, bfloat16 or float16, read once and widened to float32 in
   registers: no upcast copy and no one-hot matrix. With AVX-512 and K <= 16 it may also be int8 (one float32
   scale per row of `cols` elements) or int4 (two values a byte, q + 8 in the low nibble first; one scale per
   `group` columns, group a multiple of 16), dequantised in registers (atlas_fast/quant.py). k(i) is
   the uint8 partition index (NULL when K = 1). The elements are split into contiguous ranges, one per thread, and
   walked BLOCK elements at a time so that the block of merged, g and the K masked copies of g stay in L1 while
   the T rows stream through. Each thread sums its dc in double, added to dc at the end. Reading θ0 as base
   saves the caller a separate pass that copies θ0 into merged before the walk. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 1024
#define MAX_K 256

enum { F32 = 0, BF16 = 1, F16 = 2, I8 = 3, I4 = 4 };

/* The bank: ld is the stride between task vectors in elements of its storage (bytes for int8 and int4). A
   quantised bank is (T, rows, cols) with scale (T, rows) (int8) or (T, rows, ceil(cols / group)) (int4). */
struct bank {
    const void *data;
    int dtype;
    int64_t ld;
    const float *scale;
    int64_t rows, cols, group;
};

static inline float widen_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Element i of a float32, bfloat16 or float16 row as float32 (dtype a constant where this is inlined). */
static inline __attribute__((always_inline)) float widen(const void *row, const int dtype, int64_t i) {
    if (dtype == F32) return ((const float *)row)[i];
    if (dtype == BF16) return widen_bf16(((const uint16_t *)row)[i]);
    return (float)((const _Float16 *)row)[i];
}

/* The first m elements of a row of τ as float32: the row itself for float32, else widened into buf. */
static inline const float *load_row(const void *row, int dtype, int64_t m, float *restrict buf) {
    if (dtype == F32) return (const float *)row;
    if (dtype == BF16) {
#pragma omp simd
        for (int64_t i = 0; i < m; i++) buf[i] = widen(row, BF16, i);
    } else {
#pragma omp simd
        for (int64_t i = 0; i < m; i++) buf[i] = widen(row, F16, i);
    }
    return buf;
}

static inline void axpy(float *restrict out, float c, const float *restrict x, int64_t m) {
#pragma omp simd
    for (int64_t i = 0; i < m; i++) out[i] += c * x[i];
}

static inline float dot(const float *restrict x, const float *restrict y, int64_t m) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < m; i++) sum += x[i] * y[i];
    return sum;
}

/* K = 1, one pass over a row: out += c·τ and/or returns τ·g, τ widened as it is read. */
static inline __attribute__((always_inline)) float row_pass(const void *row, const int dtype, int64_t m, float c,
                                                            float *restrict out, const float *restrict g) {
    float sum = 0.0f;
    if (out != NULL && g != NULL) {
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < m; i++) {
            float x = widen(row, dtype, i);
            out[i] += c * x;
            sum += x * g[i];
        }
    } else if (out != NULL) {
#pragma omp simd
        for (int64_t i = 0; i < m; i++) out[i] += c * widen(row, dtype, i);
    } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < m; i++) sum += widen(row, dtype, i) * g[i];
    }
    return sum;
}

static float row_pass_any(const void *row, int dtype, int64_t m, float c, float *out, const float *g) {
    switch (dtype) {
    case F32: return row_pass(row, F32, m, c, out, g);
    case BF16: return row_pass(row, BF16, m, c, out, g);
    default: return row_pass(row, F16, m, c, out, g);
    }
}

static inline void mask(float *restrict out, const float *restrict g, const uint8_t *restrict p, int k, int64_t m) {
#pragma omp simd
    for (int64_t i = 0; i < m; i++) out[i] = p[i] == k ? g[i] : 0.0f;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define HAVE_AVX512 1

/* 16 elements of task vector t from flat element off, as float32 (lanes outside the prefix mask `live` are 0). A
   quantised bank's 16 lanes lie in one row and, for int4, in one scale group: the walk cuts its blocks at rows. */
static inline __attribute__((always_inline)) __m512 load16(const struct bank *b, const int dtype, int64_t t,
                                                           int64_t off, __mmask16 live) {
    if (dtype == F32) return _mm512_maskz_loadu_ps(live, (const float *)b->data + t * b->ld + off);
    if (dtype == BF16 || dtype == F16) {
        __m256i h = _mm256_maskz_loadu_epi16(live, (const uint16_t *)b->data + t * b->ld + off);
        if (dtype == F16) return _mm512_cvtph_ps(h);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    int64_t row = off / b->cols, col = off - row * b->cols;
    __m512i q;
    float scale;
    if (dtype == I8) {
        q = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(live, (const int8_t *)b->data + t * b->ld + off));
        scale = b->scale[t * b->rows + row];
    } else {
        const uint8_t *bytes = (const uint8_t *)b->data + t * b->ld + row * ((b->cols + 1) / 2) + col / 2;
        int lanes = __builtin_popcount((unsigned)live);
        __m128i packed = _mm_maskz_loadu_epi8((__mmask16)((1u << ((lanes + 1) / 2)) - 1), bytes);
        __m128i low = _mm_and_si128(packed, _mm_set1_epi8(15));
        __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(15));
        __m128i nibbles = _mm_maskz_mov_epi8(live, _mm_unpacklo_epi8(low, high));   /* column order */
        q = _mm512_sub_epi32(_mm512_cvtepu8_epi32(nibbles), _mm512_maskz_set1_epi32(live, 8));
        int64_t groups = (b->cols + b->group - 1) / b->group;
        scale = b->scale[(t * b->rows + row) * groups + col / b->group];
    }
    return _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(scale));
}

/* K <= 16 partitions in AVX-512 registers. Sixteen elements at a time, all T rows: the merged lanes stay in
   registers across the rows (loaded and stored once, as a BLAS gemv does), the lanes' coefficients c[t, k(i)] come
   from one permute of row t of the coefficients, and the reduction adds τ·g into T·K register-width sums, masked
   to each partition, flushed into double once per block. The merged lanes take two FMA chains (even and odd rows):
   one chain of T dependent FMAs, not the loads, bounded the walk. MERGE, REDUCE and PART (K > 1) are constants
   in each compiled copy, so the row loop holds no branch on them and no reload of the bank's fields. */
static inline __attribute__((always_inline)) void walk_avx512(const struct bank *bank, const int dtype, const int MERGE,
                                                             const int REDUCE, const int PART, int64_t T,
                                                             int64_t lo, int64_t hi, const uint8_t *part, int64_t K,
                                                             const float *coef, const float *base, float *merged,
                                                             const float *g, double *dc_acc) {
    __m512i idx[BLOCK / 16];
    __mmask16 masks[16][BLOCK / 16];
    const __mmask16 coef_lanes = (__mmask16)((1u << K) - 1);
    __m512 *sums = REDUCE ? (__m512 *)aligned_alloc(64, sizeof(__m512) * (size_t)(T * K)) : NULL;
    if (REDUCE && sums == NULL) return;
    const struct bank b = *bank;
    const int size = dtype == F32 ? 4 : 2;
    const int quantised = dtype == I8 || dtype == I4;
    for (int64_t s = lo, m; s < hi; s += m) {
        m = hi - s < BLOCK ? hi - s : BLOCK;
        if (quantised && m > b.cols - s % b.cols) m = b.cols - s % b.cols;  /* to the row's end */
        int64_t groups = (m + 15) / 16;
        const __mmask16 last = m % 16 ? (__mmask16)((1u << (m % 16)) - 1) : (__mmask16)0xFFFF;
        if (PART)
            for (int64_t j = 0; j < groups; j++) {
                __mmask16 live = j == groups - 1 ? last : (__mmask16)0xFFFF;
                idx[j] = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, part + s + 16 * j));
                for (int64_t k = 0; k < K; k++)
                    masks[k][j] = _mm512_mask_cmpeq_epi32_mask(live, idx[j], _mm512_set1_epi32((int)k));
            }
        if (REDUCE)
            for (int64_t q = 0; q < T * K; q++) sums[q] = _mm512_setzero_ps();
        for (int64_t j = 0; j < groups; j++) {
            __mmask16 live = j == groups - 1 ? last : (__mmask16)0xFFFF;
            int64_t off = s + 16 * j;
            __m512 out0 = MERGE ? _mm512_maskz_loadu_ps(live, base + off) : _mm512_setzero_ps();
            __m512 out1 = _mm512_setzero_ps();
            __m512 gv = REDUCE ? _mm512_maskz_loadu_ps(live, g + off) : _mm512_setzero_ps();
            for (int64_t t = 0; t < T; t++) {
                /* the float rows 1 KiB ahead: T streams are more than the hardware prefetchers follow */
                if (dtype <= F16)
                    _mm_prefetch((const char *)b.data + (t * b.ld + off) * size + 1024, _MM_HINT_T0);
                __m512 r = load16(&b, dtype, t, off, live);
                if (MERGE) {
                    __m512 cm = !PART ? _mm512_set1_ps(coef[t])
                                      : _mm512_permutexvar_ps(idx[j], _mm512_maskz_loadu_ps(coef_lanes, coef + t * K));
                    if (t & 1) out1 = _mm512_fmadd_ps(cm, r, out1);
                    else out0 = _mm512_fmadd_ps(cm, r, out0);
                }
                if (REDUCE) {
                    __m512 *st = sums + t * K;
                    if (!PART) st[0] = _mm512_fmadd_ps(r, gv, st[0]);
                    else {
                        __m512 pr = _mm512_mul_ps(r, gv);
                        for (int64_t k = 0; k < K; k++) st[k] = _mm512_mask_add_ps(st[k], masks[k][j], st[k], pr);
                    }
                }
            }
            if (MERGE) _mm512_mask_storeu_ps(merged + off, live, _mm512_add_ps(out0, out1));
        }
        if (REDUCE)
            for (int64_t q = 0; q < T * K; q++) dc_acc[q] += _mm512_reduce_add_ps(sums[q]);
    }
    free(sums);
}

/* walk_avx512 compiled once per storage dtype and mode, so that no load branches on them. */
#define WALK(D, M, R, P) walk_avx512(bank, D, M, R, P, T, lo, hi, part, K, coef, base, merged, g, dc_acc)
#define WALK_MODES(D)                                                                                         \
    do {                                                                                                      \
        if (merged != NULL && g != NULL) {                                                                    \
            if (K > 1) WALK(D, 1, 1, 1);                                                                      \
            else WALK(D, 1, 1, 0);                                                                            \
        } else if (merged != NULL) {                                                                          \
            if (K > 1) WALK(D, 1, 0, 1);                                                                      \
            else WALK(D, 1, 0, 0);                                                                            \
        } else if (K > 1) WALK(D, 0, 1, 1);                                                                   \
        else WALK(D, 0, 1, 0);                                                                                \
    } while (0)

static void walk_range_avx512(const struct bank *bank, int64_t T, int64_t lo, int64_t hi, const uint8_t *part,
                              int64_t K, const float *coef, const float *base, float *merged, const float *g,
                              double *dc_acc) {
    switch (bank->dtype) {
    case F32: WALK_MODES(F32); break;
    case BF16: WALK_MODES(BF16); break;
    case F16: WALK_MODES(F16); break;
    case I8: WALK_MODES(I8); break;
    default: WALK_MODES(I4); break;
    }
}
#undef WALK_MODES
#undef WALK

#endif

/* The portable walk (and K > 16 partitions), a row's stretch of a block at a time, the next block's stretch
   prefetched meanwhile (T streams are more than the hardware prefetchers follow). K = 1 merges and reduces a
   stretch in one pass (row_pass). With partitions the merge accumulates one candidate sum per partition,
   acc[k][i] = Σ_t c[t, k] τ_t[i] (K vector FMAs per element and row, no gather), and keeps acc[k(i)][i] once per
   block; the reduction takes K dot products of each row with g masked to one partition,
   gk[k][i] = g[i] if k(i) = k else 0. */
static void walk_range(const struct bank *bank, int64_t T, int64_t lo, int64_t hi, const uint8_t *part,
                       int64_t K, const float *coef, const float *base, float *merged, const float *g,
                       double *dc_acc) {
    const void *tau = bank->data;
    const int dtype = bank->dtype;
    const int64_t ld = bank->ld;
    const int64_t size = dtype == F32 ? 4 : 2;
#ifdef HAVE_AVX512
    if (K <= 16) {
        walk_range_avx512(bank, T, lo, hi, part, K, coef, base, merged, g, dc_acc);
        return;
    }
#endif
    float buf[BLOCK];
    float *acc = NULL, *gk = NULL;
    if (merged != NULL && K > 1) acc = (float *)malloc(sizeof(float) * (size_t)(K * BLOCK));
    if (g != NULL && K > 1) gk = (float *)malloc(sizeof(float) * (size_t)(K * BLOCK));
    for (int64_t s = lo; s < hi; s += BLOCK) {
        int64_t m = hi - s < BLOCK ? hi - s : BLOCK;
        const uint8_t *p = part != NULL ? part + s : NULL;
        if (gk != NULL)
            for (int64_t k = 0; k < K; k++) mask(gk + k * BLOCK, g + s, p, (int)k, m);
        if (acc != NULL) memset(acc, 0, sizeof(float) * (size_t)(K * BLOCK));
        if (merged != NULL && base != merged) memcpy(merged + s, base + s, sizeof(float) * (size_t)m);
        for (int64_t t = 0; t < T; t++) {
            const char *stretch = (const char *)tau + (t * ld + s) * size;
            if (s + BLOCK < hi)
                for (int64_t b = 0; b < BLOCK * size; b += 64) __builtin_prefetch(stretch + BLOCK * size + b, 0, 3);
            if (K == 1) {
                float d = row_pass_any(stretch, dtype, m, merged != NULL ? coef[t] : 0.0f,
                                       merged != NULL ? merged + s : NULL, g != NULL ? g + s : NULL);
                if (g != NULL) dc_acc[t] += d;
                continue;
            }
            const float *row = load_row(stretch, dtype, m, buf);
            if (merged != NULL)
                for (int64_t k = 0; k < K; k++) axpy(acc + k * BLOCK, coef[t * K + k], row, m);
            if (g != NULL)
                for (int64_t k = 0; k < K; k++) dc_acc[t * K + k] += dot(row, gk + k * BLOCK, m);
        }
        if (acc != NULL) {
            float *out = merged + s;
            for (int64_t i = 0; i < m; i++) out[i] += acc[p[i] * BLOCK + i];
        }
    }
    free(acc);
    free(gk);
}

struct job {
    const struct bank *bank;
    int64_t T, lo, hi, K;
    const uint8_t *part;
    const float *coef, *base, *g;
    float *merged;
    double *acc;
};

static void run_job(const struct job *j) {
    if (j->lo < j->hi)
        walk_range(j->bank, j->T, j->lo, j->hi, j->part, j->K, j->coef, j->base, j->merged, j->g, j->acc);
}

/* Whether the walk takes a bank of this dtype with K partitions: quantised banks only in the AVX-512 walk. */
int atlas_walk_takes(int dtype, int64_t K, int64_t group) {
    if (K < 1 || K > MAX_K || dtype < F32 || dtype > I4) return 0;
    if (dtype <= F16) return 1;
#ifdef HAVE_AVX512
    return K <= 16 && (dtype == I8 || (group > 0 && group % 16 == 0));
#else
    (void)group;
    return 0;
#endif
}

/* Returns 0, or 1 for arguments it does not take (the caller falls back to stock torch ops). The ranges run on
   OpenMP threads: the library links libgomp.so.1, which the loader resolves to the runtime torch has loaded, so
   the walk runs on torch's own worker threads, which a GEMM just before has left spinning, instead of on threads
   of its own that would share the cores with them. scale, rows, cols and group describe a
   quantised bank (NULL and zeros otherwise); ld is in elements of the storage. base (n,) may be NULL: merged then
   accumulates onto what it holds. */
int atlas_walk(const void *tau, int dtype, int64_t T, int64_t n, int64_t ld, const float *scale, int64_t rows,
               int64_t cols, int64_t group, const uint8_t *part, int64_t K, const float *coef, const float *base,
               float *merged, const float *g, float *dc, int nthreads) {
    if (!atlas_walk_takes(dtype, K, group) || (K > 1 && part == NULL) || nthreads < 1) return 1;
    if ((merged == NULL) != (coef == NULL) || (g == NULL) != (dc == NULL)) return 1;
    const int quantised = dtype == I8 || dtype == I4;
    if (quantised && (scale == NULL || rows < 1 || cols < 1 || rows * cols != n)) return 1;
    const struct bank bank = {tau, dtype, ld, scale, rows, cols, group};
    /* Ranges of whole blocks, or of whole rows for a quantised bank (its blocks are cut at rows). */
    int64_t unit = quantised ? cols : BLOCK;
    int64_t per = (n + nthreads - 1) / nthreads;
    per = (per + unit - 1) / unit * unit;
    int used = per > 0 ? (int)((n + per - 1) / per) : 1;
    if (used < 1) used = 1;
    double *acc = (double *)calloc((size_t)(used * T * K), sizeof(double));
    struct job *jobs = (struct job *)calloc((size_t)used, sizeof(struct job));
    int status = acc == NULL || jobs == NULL;
    if (!status) {
        for (int w = 0; w < used; w++) {
            int64_t lo = w * per, hi = lo + per < n ? lo + per : n;
            jobs[w] = (struct job){&bank, T, lo, hi, K, part, coef, base != NULL ? base : merged, g, merged,
                                   acc + w * T * K};
        }
#pragma omp parallel for num_threads(used) schedule(static, 1)
        for (int w = 0; w < used; w++) run_job(&jobs[w]);
        if (dc != NULL) {
            for (int64_t j = 0; j < T * K; j++) {
                double total = 0.0;
                for (int w = 0; w < used; w++) total += acc[w * T * K + j];
                dc[j] += (float)total;
            }
        }
    }
    free(jobs);
    free(acc);
    return status;
}
