/* Fused MXFP4 matmul for CPU: y[m, o] = sum_i x[m, i] * W[o, i], W packed as in gpt-oss checkpoints
 * (blocks [O, G, 16] uint8: low nibble = element 2j, high nibble = 2j+1; scales [O, G] E8M0).
 *
 * AVX2: each block is decoded in registers and multiplied with up to 32 input rows at once
 * (row_fused_avx2). Portable: each output row is decoded once into a small buffer (L1-resident)
 * and dotted with every input row. NOTE: the dot product for (m, o) is computed the same way whatever M and the thread count,
 * so results are batch-invariant (the engine's reproducible mode relies on this).
 * The AVX2/FMA path is chosen at run time; the scalar path is the portable fallback. Plain C on raw
 * pointers, called through ctypes (which releases the GIL). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static const float FP4[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                              -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

static float scale_of(uint8_t e) { return ldexpf(1.0f, (int)e - 127); }

/* 2**(e-128), i.e. scale_of(e) * 0.5, built from the exponent bits (no libm call); e <= 1 gives a
 * subnormal, done by ldexpf. Exact: a power of two either way. */
static inline float half_scale_of(uint8_t e) {
    if (e <= 1) return ldexpf(1.0f, (int)e - 128);
    union { uint32_t u; float f; } v = {.u = (uint32_t)(e - 1) << 23};
    return v.f;
}

/* ---- portable path -------------------------------------------------------------------------- */
static void decode_row_scalar(const uint8_t *blocks, const uint8_t *scales, int64_t G, float *w) {
    for (int64_t g = 0; g < G; g++) {
        float s = scale_of(scales[g]);
        const uint8_t *b = blocks + g * 16;
        for (int j = 0; j < 16; j++) {
            w[g * 32 + 2 * j] = FP4[b[j] & 15] * s;
            w[g * 32 + 2 * j + 1] = FP4[b[j] >> 4] * s;
        }
    }
}

static float dot_scalar(const float *x, const float *w, int64_t n) {
    /* 8 partial sums in a fixed order, like the AVX2 path's lanes (not bit-identical to it) */
    float acc[8] = {0};
    for (int64_t i = 0; i < n; i += 8)
        for (int k = 0; k < 8; k++) acc[k] += x[i + k] * w[i + k];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

/* ---- AVX2 + FMA path ------------------------------------------------------------------------ */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_X86 1

/* The 32 values of one block as 4 x 8 floats, times 2 (the 0.5 goes into the scale). */
__attribute__((target("avx2,fma")))
static inline void block_values_avx2(const uint8_t *block, __m256 v[4]) {
    const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m128i b = _mm_loadu_si128((const __m128i *)block);
    __m128i lo = _mm_and_si128(b, low4);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
    __m128i v0 = _mm_shuffle_epi8(lut, _mm_unpacklo_epi8(lo, hi)); /* elements 0..15 */
    __m128i v1 = _mm_shuffle_epi8(lut, _mm_unpackhi_epi8(lo, hi)); /* elements 16..31 */
    v[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v0));
    v[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v0, 8)));
    v[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v1));
    v[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v1, 8)));
}

__attribute__((target("avx2,fma")))
static inline float hsum_avx2(__m256 s) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}

/* Output row o for the M input rows, decoded and multiplied in registers: per block, the 32
 * products are summed unscaled, then the block's scale is applied with one FMA. Each (m, o) is
 * the same chain of operations whatever M (batch-invariant). M <= MAX_FUSED_ROWS. */
#define MAX_FUSED_ROWS 32
__attribute__((target("avx2,fma")))
static void row_fused_avx2(const float *x, int64_t M, const uint8_t *blocks, const uint8_t *scales,
                           int64_t G, float *y, int64_t O) {
    const int64_t n = G * 32;
    __m256 acc[MAX_FUSED_ROWS];
    for (int64_t m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m256 v[4];
        block_values_avx2(blocks + g * 16, v);
        __m256 s = _mm256_set1_ps(half_scale_of(scales[g]));
        for (int64_t m = 0; m < M; m++) {
            const float *xg = x + m * n + g * 32;
            __m256 p = _mm256_mul_ps(_mm256_loadu_ps(xg), v[0]);
            __m256 q = _mm256_mul_ps(_mm256_loadu_ps(xg + 8), v[1]);
            p = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 16), v[2], p);
            q = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 24), v[3], q);
            acc[m] = _mm256_fmadd_ps(_mm256_add_ps(p, q), s, acc[m]);
        }
    }
    for (int64_t m = 0; m < M; m++) y[m * O] = hsum_avx2(acc[m]);
}

#endif

int inhouse_mxfp4_has_avx2(void) {
#ifdef HAVE_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* x [M, G*32] fp32, blocks [O, G, 16], scales [O, G] -> y [M, O] fp32. use_simd: 1 = AVX2 if the
 * CPU has it, 0 = the portable path. Returns 0, or -1 if memory ran out. */
int inhouse_mxfp4_matmul(const float *x, int64_t M, const uint8_t *blocks, const uint8_t *scales,
                         int64_t O, int64_t G, float *y, int nthreads, int use_simd) {
    const int64_t n = G * 32;
    int simd = use_simd && inhouse_mxfp4_has_avx2();
    int failed = 0;
#ifdef _OPENMP
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
#endif
    {
        float *w = (float *)malloc((size_t)n * sizeof(float));
        if (!w) {
            failed = 1;
        } else {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (int64_t o = 0; o < O; o++) {
                const uint8_t *b = blocks + o * G * 16;
                const uint8_t *s = scales + o * G;
#ifdef HAVE_X86
                if (simd) {  /* rows in chunks: every (m, o) is the same chain whatever M */
                    for (int64_t m0 = 0; m0 < M; m0 += MAX_FUSED_ROWS) {
                        int64_t rows = M - m0 < MAX_FUSED_ROWS ? M - m0 : MAX_FUSED_ROWS;
                        row_fused_avx2(x + m0 * n, rows, b, s, G, y + m0 * O + o, O);
                    }
                    continue;
                }
#endif
                decode_row_scalar(b, s, G, w);
                for (int64_t m = 0; m < M; m++) y[m * O + o] = dot_scalar(x + m * n, w, n);
            }
            free(w);
        }
    }
    return failed ? -1 : 0;
}
