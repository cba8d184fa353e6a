/* Matrix-vector products for decode: y[m, o] = sum_k x[m, k] * W[o, k] (+ bias), W bf16 [O, K],
 * or W int8 [O, K] with one fp32 scale per row (y = scale[o] * sum_k x[m, k] * W[o, k]).
 *
 * A decode step reads each attention and unembedding weight once per token, so these products are
 * bound by memory bandwidth: the kernel streams W once, converts bf16 to fp32 with a 16-bit shift
 * (exact) once for up to 8 input rows, and keeps two FMA chains per row. Rows of W
 * are split over the OpenMP threads. Each (m, o) is computed the same way whatever M and the
 * thread count (batch-invariant), so the engine's reproducible mode can give several sequences'
 * rows to one call. AVX-512 BF16 (bf16 rows), AVX-512F or AVX2/FMA are chosen at run time; plain
 * C is the fallback. */
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)h << 16};
    return v.f;
}

static inline float i8_to_f32(int8_t q) { return (float)q; }

/* The dot products of up to MAX_ROWS input rows with one weight row, one per weight type (T, its
 * scalar conversion TO_F32, its 16- and 8-lane loads), written once as templates. The weight row is
 * loaded and converted once for all the input rows. For each input row the arithmetic is the same
 * whatever the number of rows (batch-invariant): two FMA chains (even and odd vector chunks), one
 * more chunk into the even chain, then the scalar tail. Scalar: 16 partial sums in a fixed order.
 * The SIMD bodies are called with R a literal (DISPATCH_ROWS), so rows unroll and accumulators stay
 * in registers. x is fp32 rows, except for dots_bf16x (bf16 rows). */
#define MAX_ROWS 8
typedef void (*dots_fn)(const void *x, int64_t K, int64_t R, const void *w, float *out);

#define DOTS_SCALAR(NAME, T, TO_F32)                                                             \
    static void NAME(const void *xv, int64_t K, int64_t R, const void *wv, float *out) {       \
        const float *x = (const float *)xv;                                                      \
        const T *w = (const T *)wv;                                                              \
        for (int64_t m = 0; m < R; m++) {                                                        \
            const float *xm = x + m * K;                                                         \
            float acc[16] = {0};                                                                 \
            int64_t k = 0;                                                                       \
            for (; k + 16 <= K; k += 16)                                                         \
                for (int j = 0; j < 16; j++) acc[j] += xm[k + j] * TO_F32(w[k + j]);             \
            float s = 0.0f;                                                                      \
            for (int j = 0; j < 16; j++) s += acc[j];                                            \
            for (; k < K; k++) s += xm[k] * TO_F32(w[k]);                                        \
            out[m] = s;                                                                          \
        }                                                                                        \
    }
DOTS_SCALAR(dots_scalar, uint16_t, bf16_to_f32)
DOTS_SCALAR(dots_scalar_i8, int8_t, i8_to_f32)

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

/* bf16 -> fp32 is a 16-bit shift (exact); int8 -> fp32 a sign-extend and convert */
#define BF16x16(p) _mm512_castsi512_ps(_mm512_slli_epi32( \
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define BF16x8(p) _mm256_castsi256_ps(_mm256_slli_epi32( \
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define I8x16(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define I8x8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
DOTS_SIMD(dots_avx512, "avx512f", uint16_t, bf16_to_f32, __m512, 16, BF16x16, _mm512_loadu_ps,
          _mm512_fmadd_ps, _mm512_setzero_ps, _mm512_add_ps, _mm512_reduce_add_ps)
DOTS_SIMD(dots_avx2, "avx2,fma", uint16_t, bf16_to_f32, __m256, 8, BF16x8, _mm256_loadu_ps,
          _mm256_fmadd_ps, _mm256_setzero_ps, _mm256_add_ps, hsum_avx2)
DOTS_SIMD(dots_avx512_i8, "avx512f", int8_t, i8_to_f32, __m512, 16, I8x16, _mm512_loadu_ps,
          _mm512_fmadd_ps, _mm512_setzero_ps, _mm512_add_ps, _mm512_reduce_add_ps)
DOTS_SIMD(dots_avx2_i8, "avx2,fma", int8_t, i8_to_f32, __m256, 8, I8x8, _mm256_loadu_ps,
          _mm256_fmadd_ps, _mm256_setzero_ps, _mm256_add_ps, hsum_avx2)

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

/* y[m, o] = scale[o] * dot(x[m], w[o]) + bias[o] (scale, bias optional), rows of W over threads,
 * input rows MAX_ROWS at a time against each weight row. */
static void matmul_rows(const char *x, size_t x_item, int64_t M, const char *w, size_t w_item,
                        dots_fn dots, const float *scale, const float *bias, int64_t O, int64_t K,
                        float *y, int nthreads) {
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t o = 0; o < O; o++) {
        const void *wo = w + (size_t)(o * K) * w_item;
        for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
            int64_t R = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS;
            float s[MAX_ROWS];
            dots(x + (size_t)(m0 * K) * x_item, K, R, wo, s);
            for (int64_t m = 0; m < R; m++) {
                float v = scale ? s[m] * scale[o] : s[m];
                y[(m0 + m) * O + o] = bias ? v + bias[o] : v;
            }
        }
    }
}

static int level_of(int level) {
    int lv = inhouse_dense_simd_level();
    return level < lv ? level : lv;
}

/* x [M, K] fp32 (x_bf16 = 0) or bf16 (x_bf16 = 1, AVX-512 BF16 only), w [O, K] bf16, scale
 * unused (NULL), bias [O] fp32 or NULL -> y [M, O] fp32. level: the most SIMD to use (0 = the
 * portable path). Returns 0, or -2 for bf16 rows where the CPU or `level` has no AVX-512 BF16. */
int inhouse_bf16_matmul(const void *x, int x_bf16, int64_t M, const uint16_t *w,
                        const float *scale, const float *bias, int64_t O, int64_t K, float *y,
                        int nthreads, int level) {
    (void)scale;
    int lv = level_of(level);
    dots_fn dots = dots_scalar;
#ifdef HAVE_X86
    if (x_bf16 && lv >= 3) dots = dots_bf16x;
    else if (lv >= 2) dots = dots_avx512;
    else if (lv == 1) dots = dots_avx2;
#endif
    if (x_bf16 && lv < 3) return -2;
    matmul_rows((const char *)x, x_bf16 ? 2 : 4, M, (const char *)w, sizeof *w, dots, NULL, bias,
                O, K, y, nthreads);
    return 0;
}

/* x [M, K] fp32 (x_bf16 must be 0), w [O, K] int8, scale [O] fp32, bias [O] fp32 or NULL ->
 * y [M, O] fp32: y = scale * (x . w) + bias, the dot product summed in fp32 before the row's
 * scale. Returns 0, or -2 for bf16 rows (not supported). */
int inhouse_int8_matmul(const void *x, int x_bf16, int64_t M, const int8_t *w, const float *scale,
                        const float *bias, int64_t O, int64_t K, float *y, int nthreads,
                        int level) {
    if (x_bf16) return -2;
    int lv = level_of(level);
    dots_fn dots = dots_scalar_i8;
#ifdef HAVE_X86
    if (lv >= 2) dots = dots_avx512_i8;
    else if (lv == 1) dots = dots_avx2_i8;
#endif
    matmul_rows((const char *)x, 4, M, (const char *)w, sizeof *w, dots, scale, bias, O, K, y,
                nthreads);
    return 0;
}
