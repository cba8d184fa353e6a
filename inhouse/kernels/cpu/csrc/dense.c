/* Matrix-vector products for decode: y[m, o] = sum_k x[m, k] * W[o, k] (+ bias), W bf16 [O, K],
 * or W int8 [O, K] with one fp32 scale per row (y = scale[o] * sum_k x[m, k] * W[o, k]).
 * int8 weights meet the rows rounded to int16 (one scale per row, |error| <= max|x[m]| / 65534):
 * 16-bit products summed exactly in integers (vpmaddwd), so every path gives the same bits, and
 * the weights are read at the memory bandwidth instead of being converted to floats.
 *
 * A decode step reads each attention and unembedding weight once per token, so these products are
 * bound by memory bandwidth: the kernel streams W once, converts bf16 to fp32 with a 16-bit shift
 * (exact) once for up to 8 input rows, and keeps two FMA chains per row. Rows of W
 * are split over the OpenMP threads. Each (m, o) is computed the same way whatever M and the
 * thread count (batch-invariant), so the engine's reproducible mode can give several sequences'
 * rows to one call. AVX-512 BF16 (bf16 rows), AVX-512F or AVX2/FMA are chosen at run time; plain
 * C is the fallback. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernels.h"

/* The dot products of up to MAX_ROWS input rows with one bf16 weight row (the SIMD bodies written
 * once as a template over the vector width; int8 weights have their own, DOTS_Q, below). The
 * weight row is loaded and converted once for all the input rows. For each input row the
 * arithmetic is the same whatever the number of rows (batch-invariant): two FMA chains (even and
 * odd vector chunks), one more chunk into the even chain, then the scalar tail. Scalar: 16 partial
 * sums in a fixed order.
 * The SIMD bodies are called with R a literal (DISPATCH_ROWS), so rows unroll and accumulators stay
 * in registers. x is fp32 rows, except for dots_bf16x (bf16 rows). */
#define MAX_ROWS 8

/* With more than two rows the products are bound by arithmetic, and the hardware prefetcher falls
 * behind the weights (8 rows against the 201088 x 2880 unembedding: 122-132 ms a call without
 * this, 85-97 ms with it), so those loops ask for the weights 16 KB ahead themselves; with one or
 * two, 2 KB ahead into L2 (PREFETCH_L2). It changes no arithmetic. Bytes past the thread's rows or
 * the matrix are never read: a prefetch does not fault. */
#define PREFETCH_AHEAD 16384
static inline void prefetch_ahead(const void *p, int R) {
    if (R > 2) __builtin_prefetch((const char *)p + PREFETCH_AHEAD);
    else PREFETCH_L2(p);  /* bound by reads in flight: common.h */
}
typedef void (*dots_fn)(const void *x, int64_t K, int64_t R, const void *w, float *out);

static void dots_scalar(const void *xv, int64_t K, int64_t R, const void *wv, float *out) {
    const float *x = (const float *)xv;
    const uint16_t *w = (const uint16_t *)wv;
    for (int64_t m = 0; m < R; m++) {
        const float *xm = x + m * K;
        float acc[16] = {0};
        int64_t k = 0;
        for (; k + 16 <= K; k += 16)
            for (int j = 0; j < 16; j++) acc[j] += xm[k + j] * bf16_to_f32(w[k + j]);
        float s = 0.0f;
        for (int j = 0; j < 16; j++) s += acc[j];
        for (; k < K; k++) s += xm[k] * bf16_to_f32(w[k]);
        out[m] = s;
    }
}

/* int16 rows . int8 weights, summed exactly: 32-bit lanes are folded into 64 bits every Q_CHUNK
 * elements (a lane then holds at most 512 products of |x| <= 32767 and |w| <= 128: < 2**31). */
#define Q_CHUNK 4096
static void dots_scalar_q(const void *xv, int64_t K, int64_t R, const void *wv, float *out) {
    const int16_t *x = (const int16_t *)xv;
    const int8_t *w = (const int8_t *)wv;
    for (int64_t m = 0; m < R; m++) {
        int64_t s = 0;
        for (int64_t k = 0; k < K; k++) s += (int32_t)x[m * K + k] * w[k];
        out[m] = (float)s;
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#include "simd.h"
#define HAVE_X86 1

/* VEC: __m512 or __m256; L: lanes; LOAD: the weight load-convert; X/FMA/ZERO/HSUM: intrinsics */
#define DOTS_SIMD(NAME, TARGET, T, TO_F32, VEC, L, LOAD, XLOAD, FMA, ZERO, ADD, HSUM)              \
    __attribute__((target(TARGET), always_inline))                                              \
    static inline void NAME##_rows(const float *x, int64_t K, const T *w, float *out,          \
                                   const int R) {                                                \
        VEC a0[MAX_ROWS], a1[MAX_ROWS];                                                          \
        for (int m = 0; m < R; m++) a0[m] = a1[m] = ZERO();                                      \
        int64_t k = 0;                                                                           \
        for (; k + 2 * L <= K; k += 2 * L) {                                                     \
            VEC w0 = LOAD(w + k), w1 = LOAD(w + k + L);                                          \
            prefetch_ahead(w + k, R);                                                            \
            for (int m = 0; m < R; m++) {                                                        \
                a0[m] = FMA(XLOAD(x + m * K + k), w0, a0[m]);                                    \
                a1[m] = FMA(XLOAD(x + m * K + k + L), w1, a1[m]);                                \
            }                                                                                    \
        }                                                                                        \
        if (k + L <= K) {                                                                        \
            VEC w0 = LOAD(w + k);                                                                \
            for (int m = 0; m < R; m++) a0[m] = FMA(XLOAD(x + m * K + k), w0, a0[m]);            \
            k += L;                                                                              \
        }                                                                                        \
        for (int m = 0; m < R; m++) {                                                            \
            float s = HSUM(ADD(a0[m], a1[m]));                                                   \
            for (int64_t j = k; j < K; j++) s += x[m * K + j] * TO_F32(w[j]);                    \
            out[m] = s;                                                                          \
        }                                                                                        \
    }                                                                                            \
    __attribute__((target(TARGET)))                                                             \
    static void NAME(const void *x, int64_t K, int64_t R, const void *w, float *out) {         \
        DISPATCH_ROWS(R, NAME##_rows, (const float *)x, K, (const T *)w, out)                    \
    }

/* bf16 -> fp32 is a 16-bit shift (exact) */
#define BF16x16(p) _mm512_castsi512_ps(_mm512_slli_epi32( \
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define BF16x8(p) _mm256_castsi256_ps(_mm256_slli_epi32( \
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
DOTS_SIMD(dots_avx512, "avx512f", uint16_t, bf16_to_f32, __m512, 16, BF16x16, _mm512_loadu_ps,
          _mm512_fmadd_ps, _mm512_setzero_ps, _mm512_add_ps, _mm512_reduce_add_ps)
DOTS_SIMD(dots_avx2, "avx2,fma", uint16_t, bf16_to_f32, __m256, 8, BF16x8, _mm256_loadu_ps,
          _mm256_fmadd_ps, _mm256_setzero_ps, _mm256_add_ps, hsum_avx2)

/* int16 rows . int8 weights: the weights widen to 16 bits once for all rows, vpmaddwd multiplies
 * and adds pairs into 32-bit lanes; VEC/L: the vector and its int16 lanes, WLOAD the widening
 * load, LANES64 the lanes' sum in 64 bits. */
#define DOTS_Q(NAME, TARGET, VEC, L, WLOAD, XLOAD, MADD, ADD, ZERO, LANES64)                        \
    __attribute__((target(TARGET), always_inline))                                              \
    static inline void NAME##_rows(const int16_t *x, int64_t K, const int8_t *w, float *out,   \
                                   const int R) {                                                \
        int64_t total[MAX_ROWS] = {0};                                                           \
        for (int64_t k0 = 0; k0 < K; k0 += Q_CHUNK) {                                            \
            const int64_t end = K - k0 < Q_CHUNK ? K : k0 + Q_CHUNK;                             \
            VEC acc[MAX_ROWS];                                                                   \
            for (int m = 0; m < R; m++) acc[m] = ZERO();                                         \
            int64_t k = k0;                                                                      \
            for (; k + L <= end; k += L) {                                                       \
                VEC wv = WLOAD(w + k);                                                           \
                prefetch_ahead(w + k, R);                                                        \
                for (int m = 0; m < R; m++)                                                      \
                    acc[m] = ADD(acc[m], MADD(XLOAD(x + m * K + k), wv));                        \
            }                                                                                    \
            for (int m = 0; m < R; m++) {                                                        \
                total[m] += LANES64(acc[m]);                                                     \
                for (int64_t j = k; j < end; j++) total[m] += (int32_t)x[m * K + j] * w[j];      \
            }                                                                                    \
        }                                                                                        \
        for (int m = 0; m < R; m++) out[m] = (float)total[m];                                    \
    }                                                                                            \
    __attribute__((target(TARGET)))                                                             \
    static void NAME(const void *x, int64_t K, int64_t R, const void *w, float *out) {         \
        DISPATCH_ROWS(R, NAME##_rows, (const int16_t *)x, K, (const int8_t *)w, out)             \
    }

__attribute__((target("avx512f,avx512bw"))) static inline int64_t lanes64_avx512(__m512i v) {
    return _mm512_reduce_add_epi64(_mm512_add_epi64(
        _mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)),
        _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1))));
}

__attribute__((target("avx2"))) static inline int64_t lanes64_avx2(__m256i v) {
    __m256i s = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                 _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
    __m128i h = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    return _mm_cvtsi128_si64(h) + _mm_extract_epi64(h, 1);
}

#define W8x32(p) _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p)))
#define W8x16(p) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p)))
#define X16x32(p) _mm512_loadu_si512((const void *)(p))
#define X16x16(p) _mm256_loadu_si256((const __m256i *)(p))
DOTS_Q(dots_avx512_q, "avx512f,avx512bw", __m512i, 32, W8x32, X16x32, _mm512_madd_epi16,
       _mm512_add_epi32, _mm512_setzero_si512, lanes64_avx512)
DOTS_Q(dots_avx2_q, "avx2", __m256i, 16, W8x16, X16x16, _mm256_madd_epi16, _mm256_add_epi32,
       _mm256_setzero_si256, lanes64_avx2)

/* bf16 rows (the model's activations) with bf16 weights, on AVX-512 BF16: vdpbf16ps multiplies
 * them as stored, no conversion, exact products summed in fp32, 32 weights per instruction and half
 * the row bytes of the fp32 path to keep in cache. The same chain structure as DOTS_SIMD. */
__attribute__((target("avx512f,avx512bf16"), always_inline))
static inline void dots_bf16x_rows(const uint16_t *x, int64_t K, const uint16_t *w, float *out,
                                   const int R) {
#define BH(p) ((__m512bh)_mm512_loadu_si512((const void *)(p)))
    __m512 a0[MAX_ROWS], a1[MAX_ROWS];
    for (int m = 0; m < R; m++) a0[m] = a1[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        __m512bh w0 = BH(w + k), w1 = BH(w + k + 32);
        prefetch_ahead(w + k, R);
        prefetch_ahead(w + k + 32, R);
        for (int m = 0; m < R; m++) {
            a0[m] = _mm512_dpbf16_ps(a0[m], BH(x + m * K + k), w0);
            a1[m] = _mm512_dpbf16_ps(a1[m], BH(x + m * K + k + 32), w1);
        }
    }
    if (k + 32 <= K) {
        __m512bh w0 = BH(w + k);
        for (int m = 0; m < R; m++) a0[m] = _mm512_dpbf16_ps(a0[m], BH(x + m * K + k), w0);
        k += 32;
    }
#undef BH
    for (int m = 0; m < R; m++) {
        float s = _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m]));
        for (int64_t j = k; j < K; j++) s += bf16_to_f32(x[m * K + j]) * bf16_to_f32(w[j]);
        out[m] = s;
    }
}

__attribute__((target("avx512f,avx512bf16")))
static void dots_bf16x(const void *x, int64_t K, int64_t R, const void *w, float *out) {
    DISPATCH_ROWS(R, dots_bf16x_rows, (const uint16_t *)x, K, (const uint16_t *)w, out)
}
#endif

/* 3 = AVX-512 with BF16, 2 = AVX-512F, 1 = AVX2 + FMA, 0 = neither */
int inhouse_dense_simd_level(void) {
#ifdef HAVE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16")) return 3;
    if (__builtin_cpu_supports("avx512f")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
    return 0;
}

/* The dtypes argument of both entry points (X_BF16, BIAS_BF16, Y_BF16: kernels.h) says which of
 * x, bias and y are bf16 (else fp32). */

/* For n matrices w[i] [O[i], K] (with scale[i], bias[i], output y[i] [M, O[i]]):
 * y[i][m, o] = dot(x[m], w[i][o]) * row_scale[m] * scale[i][o] + bias[i][o] (row_scale, scale and
 * bias optional; bias and y bf16 or fp32 as `dtypes` says, y rounded once). The rows of all the
 * matrices are shared out over the threads in one parallel loop (one call for a layer's q, k and
 * v), input rows MAX_ROWS at a time against each weight row. */
static void matmul_rows(const char *x, size_t x_item, int64_t M, int n, const char *const *w,
                        size_t w_item, dots_fn dots, const float *row_scale,
                        const float *const *scale, const void *const *bias, int dtypes,
                        const int64_t *O, int64_t K, void *const *y, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    int64_t total = 0;
    for (int i = 0; i < n; i++) total += O[i];
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, chunk_of(total, nthreads))
    for (int64_t r = 0; r < total; r++) {
        int i = 0;
        int64_t o = r;
        while (o >= O[i]) o -= O[i++];
        const void *wo = w[i] + (size_t)(o * K) * w_item;
        const float *sc = scale ? scale[i] : NULL;
        const void *b = bias ? bias[i] : NULL;
        for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
            int64_t R = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS;
            float s[MAX_ROWS];
            dots(x + (size_t)(m0 * K) * x_item, K, R, wo, s);
            for (int64_t m = 0; m < R; m++) {
                float v = row_scale ? s[m] * row_scale[m0 + m] : s[m];
                v = sc ? v * sc[o] : v;
                v = b ? v + load_as(b, dtypes & BIAS_BF16, o) : v;
                store_as(y[i], dtypes & Y_BF16, (m0 + m) * O[i] + o, v);
            }
        }
    }
}

static int level_of(int level) {
    int lv = inhouse_dense_simd_level();
    return level < lv ? level : lv;
}

/* x [M, K] fp32 or bf16 (X_BF16 in dtypes; AVX-512 BF16 only) against n bf16 matrices w[i]
 * [O[i], K] with bias[i] [O[i]] (bias NULL, or an entry NULL: none) -> y[i] [M, O[i]] (bias and y:
 * fp32, or bf16 as dtypes says). level: the most SIMD to use (0 = the portable path). Returns 0,
 * or -2 for bf16 rows where the CPU or `level` has no AVX-512 BF16. */
int inhouse_bf16_matmul_many(const void *x, int dtypes, int64_t M, int n, const uint16_t *const *w,
                             const void *const *bias, const int64_t *O, int64_t K, void *const *y,
                             int nthreads, int level) {
    const int x_bf16 = dtypes & X_BF16;
    int lv = level_of(level);
    dots_fn dots = dots_scalar;
#ifdef HAVE_X86
    if (x_bf16 && lv >= 3) dots = dots_bf16x;
    else if (lv >= 2) dots = dots_avx512;
    else if (lv == 1) dots = dots_avx2;
#endif
    if (x_bf16 && lv < 3) return -2;
    matmul_rows((const char *)x, x_bf16 ? 2 : 4, M, n, (const char *const *)w, sizeof **w, dots,
                NULL, NULL, bias, dtypes, O, K, y, nthreads);
    return 0;
}

/* Each row to int16 with one scale: q = round(x * 32767 / max|x|), row_scale = max|x| / 32767
 * (0 for a zero row, NaN for a row with a NaN or an infinity). The int8 projections' rows, and
 * the experts' of int8 models (mxfp4.c's PATH_A16). */
void inhouse_int16_rows(const void *x, int x_bf16, int64_t M, int64_t K, int16_t *q,
                        float *row_scale) {
    for (int64_t m = 0; m < M; m++) {
        float amax = 0.0f;
        int finite = 1;
        for (int64_t k = 0; k < K; k++) {
            float a = fabsf(load_as(x, x_bf16, m * K + k));
            if (!(a <= FLT_MAX)) finite = 0;  /* NaN or infinity */
            else if (a > amax) amax = a;
        }
        float inv = finite && amax > 0.0f ? 32767.0f / amax : 0.0f;
        for (int64_t k = 0; k < K; k++) {
            float r = nearbyintf(load_as(x, x_bf16, m * K + k) * inv);
            q[m * K + k] = (int16_t)(r > 32767.0f ? 32767.0f : (r < -32767.0f ? -32767.0f : r));
        }
        row_scale[m] = finite ? amax / 32767.0f : NAN;
    }
}

/* x [M, K] fp32 or bf16 against n int8 matrices w[i] [O[i], K] with scale[i] [O[i]] fp32 and
 * bias[i] [O[i]] (or none) -> y[i] [M, O[i]] (x, bias and y: fp32, or bf16 as dtypes says):
 * y = (q . w) * row_scale * scale + bias, the rows rounded to int16 once (inhouse_int16_rows)
 * and each dot product summed exactly. Every path gives the same bits. Returns 0, or -1 if memory
 * ran out. */
int inhouse_int8_matmul_many(const void *x, int dtypes, int64_t M, int n, const int8_t *const *w,
                             const float *const *scale, const void *const *bias,
                             const int64_t *O, int64_t K, void *const *y, int nthreads,
                             int level) {
    int lv = level_of(level);
    dots_fn dots = dots_scalar_q;
#ifdef HAVE_X86
    if (lv >= 2 && __builtin_cpu_supports("avx512bw")) dots = dots_avx512_q;
    else if (lv >= 1) dots = dots_avx2_q;
#endif
    int16_t *q = (int16_t *)malloc((size_t)(M * K) * sizeof(int16_t));
    float *row_scale = (float *)malloc((size_t)M * sizeof(float));
    if (!q || !row_scale) {
        free(q);
        free(row_scale);
        return -1;
    }
    inhouse_int16_rows(x, dtypes & X_BF16, M, K, q, row_scale);
    matmul_rows((const char *)q, sizeof *q, M, n, (const char *const *)w, sizeof **w, dots,
                row_scale, scale, bias, dtypes, O, K, y, nthreads);
    free(q);
    free(row_scale);
    return 0;
}
