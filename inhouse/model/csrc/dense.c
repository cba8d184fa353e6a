/* Matrix-vector products for decode: y[m, o] = sum_k x[m, k] * W[o, k] (+ bias), W bf16 [O, K],
 * or W int8 [O, K] with one fp32 scale per row (y = scale[o] * sum_k x[m, k] * W[o, k]).
 *
 * A decode step reads each attention and unembedding weight once per token, so these products are
 * bound by memory bandwidth: the kernel streams W once, converts bf16 to fp32 with a 16-bit shift
 * (exact), and keeps four independent FMA chains per row so the core is never the limit. Rows of W
 * are split over the OpenMP threads. Each (m, o) is computed the same way whatever M and the
 * thread count (batch-invariant), so the engine's reproducible mode can give several sequences'
 * rows to one call. AVX-512F or AVX2/FMA are chosen at run time; plain C is the fallback. */
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)h << 16};
    return v.f;
}

static inline float i8_to_f32(int8_t q) { return (float)q; }

/* The dot products, one per weight type (T, its scalar conversion TO_F32, and its 16- and 8-lane
 * loads), written once as templates. Scalar: 16 partial sums in a fixed order (like the SIMD
 * paths' lanes; not bit-identical to them). SIMD: four independent FMA chains, then the tail. */
#define DOT_SCALAR(NAME, T, TO_F32)                                                              \
    static float NAME(const float *x, const void *wv, int64_t K) {                             \
        const T *w = (const T *)wv;                                                              \
        float acc[16] = {0};                                                                     \
        int64_t k = 0;                                                                           \
        for (; k + 16 <= K; k += 16)                                                             \
            for (int j = 0; j < 16; j++) acc[j] += x[k + j] * TO_F32(w[k + j]);                  \
        float s = 0.0f;                                                                          \
        for (int j = 0; j < 16; j++) s += acc[j];                                                \
        for (; k < K; k++) s += x[k] * TO_F32(w[k]);                                             \
        return s;                                                                                \
    }
DOT_SCALAR(dot_scalar, uint16_t, bf16_to_f32)
DOT_SCALAR(dot_scalar_i8, int8_t, i8_to_f32)

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_X86 1

#define DOT_AVX512(NAME, T, TO_F32, LOAD16)                                                      \
    __attribute__((target("avx512f")))                                                         \
    static float NAME(const float *x, const void *wv, int64_t K) {                             \
        const T *w = (const T *)wv;                                                              \
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                             \
        int64_t k = 0;                                                                           \
        for (; k + 64 <= K; k += 64) {                                                           \
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), LOAD16(w + k), a0);                     \
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), LOAD16(w + k + 16), a1);           \
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), LOAD16(w + k + 32), a2);           \
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), LOAD16(w + k + 48), a3);           \
        }                                                                                        \
        for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), LOAD16(w + k), a0); \
        float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))); \
        for (; k < K; k++) s += x[k] * TO_F32(w[k]);                                             \
        return s;                                                                                \
    }

#define DOT_AVX2(NAME, T, TO_F32, LOAD8)                                                         \
    __attribute__((target("avx2,fma")))                                                        \
    static float NAME(const float *x, const void *wv, int64_t K) {                             \
        const T *w = (const T *)wv;                                                              \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                             \
        int64_t k = 0;                                                                           \
        for (; k + 32 <= K; k += 32) {                                                           \
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), LOAD8(w + k), a0);                      \
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), LOAD8(w + k + 8), a1);              \
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), LOAD8(w + k + 16), a2);            \
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), LOAD8(w + k + 24), a3);            \
        }                                                                                        \
        for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), LOAD8(w + k), a0); \
        __m256 t = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));                 \
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));           \
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));                                                  \
        h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));                                              \
        float s = _mm_cvtss_f32(h);                                                              \
        for (; k < K; k++) s += x[k] * TO_F32(w[k]);                                             \
        return s;                                                                                \
    }

/* bf16 -> fp32 is a 16-bit shift (exact); int8 -> fp32 a sign-extend and convert */
#define BF16x16(p) _mm512_castsi512_ps(_mm512_slli_epi32( \
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define BF16x8(p) _mm256_castsi256_ps(_mm256_slli_epi32( \
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define I8x16(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define I8x8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
DOT_AVX512(dot_avx512, uint16_t, bf16_to_f32, BF16x16)
DOT_AVX2(dot_avx2, uint16_t, bf16_to_f32, BF16x8)
DOT_AVX512(dot_avx512_i8, int8_t, i8_to_f32, I8x16)
DOT_AVX2(dot_avx2_i8, int8_t, i8_to_f32, I8x8)
#endif

/* 2 = AVX-512F, 1 = AVX2 + FMA, 0 = neither */
int inhouse_dense_simd_level(void) {
#ifdef HAVE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
    return 0;
}

typedef float (*dot_fn)(const float *, const void *, int64_t);

/* y[m, o] = scale[o] * dot(x[m], w[o]) + bias[o] (scale, bias optional), rows of W over threads. */
static void matmul_rows(const float *x, int64_t M, const char *w, size_t w_item, dot_fn dot,
                        const float *scale, const float *bias, int64_t O, int64_t K, float *y,
                        int nthreads) {
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t o = 0; o < O; o++) {
        const void *wo = w + (size_t)(o * K) * w_item;
        for (int64_t m = 0; m < M; m++) {
            float s = dot(x + m * K, wo, K);
            if (scale) s *= scale[o];
            y[m * O + o] = bias ? s + bias[o] : s;
        }
    }
}

static int level_of(int level) {
    int lv = inhouse_dense_simd_level();
    return level < lv ? level : lv;
}

/* x [M, K] fp32, w [O, K] bf16, bias [O] fp32 or NULL -> y [M, O] fp32. level: the most SIMD to
 * use (0 = the portable path). */
void inhouse_bf16_matmul(const float *x, int64_t M, const uint16_t *w, const float *bias,
                         int64_t O, int64_t K, float *y, int nthreads, int level) {
    dot_fn dot = dot_scalar;
#ifdef HAVE_X86
    int lv = level_of(level);
    if (lv == 2) dot = dot_avx512;
    else if (lv == 1) dot = dot_avx2;
#else
    (void)level;
#endif
    matmul_rows(x, M, (const char *)w, sizeof *w, dot, NULL, bias, O, K, y, nthreads);
}

/* x [M, K] fp32, w [O, K] int8, scale [O] fp32, bias [O] fp32 or NULL -> y [M, O] fp32:
 * y = scale * (x . w) + bias, the dot product summed in fp32 before the row's scale. */
void inhouse_int8_matmul(const float *x, int64_t M, const int8_t *w, const float *scale,
                         const float *bias, int64_t O, int64_t K, float *y, int nthreads,
                         int level) {
    dot_fn dot = dot_scalar_i8;
#ifdef HAVE_X86
    int lv = level_of(level);
    if (lv == 2) dot = dot_avx512_i8;
    else if (lv == 1) dot = dot_avx2_i8;
#else
    (void)level;
#endif
    matmul_rows(x, M, (const char *)w, sizeof *w, dot, scale, bias, O, K, y, nthreads);
}
