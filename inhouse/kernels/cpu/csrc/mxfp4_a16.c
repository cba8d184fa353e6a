/* MXFP4 weights against int16 rows ("a16"): the experts' arithmetic of int8 models, whose
 * projections already meet rows rounded to int16 (dense.c). mxfp4.c calls these for its a16 paths.
 *
 * Each input row is rounded to int16 with one scale (inhouse_int16_rows: max|x| / 32767) and
 * reordered per block pair as [even elements of g, even of g+1, odd of g, odd of g+1] (16 each;
 * a last odd block as [even, odd]): the order in which the packed bytes decode (inhouse_pairs16).
 * The weights decode to int16 as twice their FP4 value (exact), and the products are summed
 * exactly in 32-bit integers, four at a time: lane L (0..15) of a pair sums words 2L, 2L+1 of its
 * first 32 and of its last 32 words (a single block: words 2L, 2L+1). Each lane's integer times
 * its block's scale, halved (lanes 0-7 the pair's first block, 8-15 its second), is exact (an
 * integer below 2**21 times a power of two), and is added to that lane's fp32 sum, the pairs in
 * order; the 16 sums meet in sum_lanes' tree, and the result is times the row's scale. Every path
 * (AVX-512BW, AVX2, portable) computes exactly this, so all give the same bits, on every machine.
 *
 * Per 64 weights and row this is two vpmaddwd, one add, one convert and one FMA on AVX-512,
 * against six multiplies on the fp32 path, and the rows take half the cache. From cache on an Ice
 * Lake (2 threads): 8 rows 26 -> 54 GMAC/s, where arithmetic bounds the experts; 1 row 25 -> 27,
 * and from memory about the same, where the reads in flight bound them (common.h's PREFETCH_L2).
 * The rounding to int16 is the only approximation: per element at most max|x| / 65534. */
#include <math.h>
#include <stdint.h>

#include "common.h"
#include "kernels.h"

/* twice the FP4 values (exact integers), indexed by a nibble; FP4X2_WORDS by a word's low 5 bits
 * (a low nibble plus the high nibble's lowest bit: the table twice over) */
static const int8_t FP4X2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
static const int16_t FP4X2_WORDS[32] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12,
                                        0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

#define MAX_A16_ROWS 8  /* input rows multiplied with each decoded block pair at once */
#define A16_LANES 16

void inhouse_pairs16(const uint16_t *x, int64_t M, int64_t G, uint16_t *xp) {
    const int64_t n = G * 32;
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *xr = x + m * n;
        uint16_t *out = xp + m * n;
        int64_t g = 0;
        for (; g + 2 <= G; g += 2, out += 64)
            for (int j = 0; j < 16; j++) {
                out[j] = xr[g * 32 + 2 * j];
                out[16 + j] = xr[(g + 1) * 32 + 2 * j];
                out[32 + j] = xr[g * 32 + 2 * j + 1];
                out[48 + j] = xr[(g + 1) * 32 + 2 * j + 1];
            }
        if (g < G)
            for (int j = 0; j < 16; j++) {
                out[j] = xr[g * 32 + 2 * j];
                out[16 + j] = xr[g * 32 + 2 * j + 1];
            }
    }
}

/* the weights' words of a pair (64) or of a last single block (32), in the rows' order */
static void decode_words(const uint8_t *b, int pair, int16_t *w) {
    const int nb = pair ? 2 : 1;
    for (int h = 0; h < nb; h++)
        for (int j = 0; j < 16; j++) {
            w[h * 16 + j] = FP4X2[b[h * 16 + j] & 15];           /* even elements */
            w[nb * 16 + h * 16 + j] = FP4X2[b[h * 16 + j] >> 4];  /* odd elements */
        }
}

/* ---- portable path -------------------------------------------------------------------------- */
static void rows_portable(const int16_t *xp, const float *row_scale, int64_t R,
                          const uint8_t *blocks, const uint8_t *scales, int64_t G, float *y,
                          int64_t O) {
    const int64_t n = G * 32;
    for (int64_t m = 0; m < R; m++) {
        const int16_t *x = xp + m * n;
        float acc[A16_LANES] = {0};
        int16_t w[64];
        int64_t g = 0;
        for (; g + 2 <= G; g += 2, x += 64) {
            decode_words(blocks + g * 16, 1, w);
            const float s0 = half_scale_of(scales[g]), s1 = half_scale_of(scales[g + 1]);
            for (int L = 0; L < A16_LANES; L++) {
                int32_t d = x[2 * L] * w[2 * L] + x[2 * L + 1] * w[2 * L + 1] +
                            x[32 + 2 * L] * w[32 + 2 * L] + x[33 + 2 * L] * w[33 + 2 * L];
                acc[L] += (float)d * (L < 8 ? s0 : s1);
            }
        }
        if (g < G) {
            decode_words(blocks + g * 16, 0, w);
            const float s = half_scale_of(scales[g]);
            for (int L = 0; L < A16_LANES; L++)
                acc[L] += (float)(x[2 * L] * w[2 * L] + x[2 * L + 1] * w[2 * L + 1]) * s;
        }
        y[m * O] = sum_lanes(acc) * row_scale[m];
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#include "simd.h"
#define HAVE_X86 1

/* ---- AVX-512BW: a pair's 32 bytes widen to words, two vpermw give its 64 weights ------------ */
__attribute__((target("avx512f,avx512bw"), always_inline))
static inline void rows_avx512(const int16_t *xp, const float *row_scale, int64_t G,
                               const uint8_t *blocks, const uint8_t *scales, float *y, int64_t O,
                               const int R) {
    const int64_t n = G * 32;
    const __m512i lut = _mm512_loadu_si512((const void *)FP4X2_WORDS);
    __m512 acc[MAX_A16_ROWS];
    for (int m = 0; m < R; m++) acc[m] = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 2 <= G; g += 2) {
        if (!(g & 3)) PREFETCH_L2(blocks + g * 16);
        __m512i t = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(blocks + g * 16)));
        __m512i even = _mm512_permutexvar_epi16(t, lut);
        __m512i odd = _mm512_permutexvar_epi16(_mm512_srli_epi16(t, 4), lut);
        __m512 s = _mm512_mask_broadcastss_ps(_mm512_set1_ps(half_scale_of(scales[g])), 0xFF00,
                                              _mm_set_ss(half_scale_of(scales[g + 1])));
        for (int m = 0; m < R; m++) {
            const int16_t *x = xp + m * n + g * 32;
            __m512i d = _mm512_add_epi32(
                _mm512_madd_epi16(_mm512_loadu_si512((const void *)x), even),
                _mm512_madd_epi16(_mm512_loadu_si512((const void *)(x + 32)), odd));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[m]);
        }
    }
    if (g < G) {  /* a last single block: [even, odd] in one vector */
        __m256i t = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(blocks + g * 16)));
        __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(t), _mm256_srli_epi16(t, 4), 1);
        __m512i w = _mm512_permutexvar_epi16(idx, lut);
        __m512 s = _mm512_set1_ps(half_scale_of(scales[g]));
        for (int m = 0; m < R; m++) {
            __m512i x = _mm512_loadu_si512((const void *)(xp + m * n + g * 32));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(x, w)), s, acc[m]);
        }
    }
    for (int m = 0; m < R; m++) {
        float lanes[A16_LANES];
        _mm512_storeu_ps(lanes, acc[m]);
        y[m * O] = sum_lanes(lanes) * row_scale[m];
    }
}

__attribute__((target("avx512f,avx512bw")))
static void rows_fused_avx512(const int16_t *xp, const float *row_scale, int64_t R,
                              const uint8_t *blocks, const uint8_t *scales, int64_t G, float *y,
                              int64_t O) {
    DISPATCH_ROWS(R, rows_avx512, xp, row_scale, G, blocks, scales, y, O)
}

/* ---- AVX2: lanes 0-7 and 8-15 in two vectors; nibbles decode through vpshufb ---------------- */
/* 16 bytes' nibbles (low: the even elements, high: the odd) as two vectors of 16 words */
__attribute__((target("avx2"), always_inline))
static inline void words_avx2(const uint8_t *b, __m256i *even, __m256i *odd) {
    const __m128i lut = _mm_loadu_si128((const __m128i *)FP4X2), low4 = _mm_set1_epi8(0x0F);
    __m128i v = _mm_loadu_si128((const __m128i *)b);
    *even = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(lut, _mm_and_si128(v, low4)));
    *odd = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(v, 4), low4)));
}

/* exact: the products are integers times a power of two, so mul then add is the FMA's result */
#define ACC8(acc, d, s) _mm256_add_ps(acc, _mm256_mul_ps(_mm256_cvtepi32_ps(d), s))

__attribute__((target("avx2"), always_inline))
static inline void rows_avx2(const int16_t *xp, const float *row_scale, int64_t G,
                             const uint8_t *blocks, const uint8_t *scales, float *y, int64_t O,
                             const int R) {
    const int64_t n = G * 32;
    __m256 lo[MAX_A16_ROWS], hi[MAX_A16_ROWS];  /* lanes 0-7, 8-15 */
    for (int m = 0; m < R; m++) lo[m] = hi[m] = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 2 <= G; g += 2) {
        __m256i e0, o0, e1, o1;
        words_avx2(blocks + g * 16, &e0, &o0);
        words_avx2(blocks + (g + 1) * 16, &e1, &o1);
        __m256 s0 = _mm256_set1_ps(half_scale_of(scales[g]));
        __m256 s1 = _mm256_set1_ps(half_scale_of(scales[g + 1]));
        for (int m = 0; m < R; m++) {
            const __m256i *x = (const __m256i *)(xp + m * n + g * 32);
            __m256i d0 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_loadu_si256(x), e0),
                                          _mm256_madd_epi16(_mm256_loadu_si256(x + 2), o0));
            __m256i d1 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_loadu_si256(x + 1), e1),
                                          _mm256_madd_epi16(_mm256_loadu_si256(x + 3), o1));
            lo[m] = ACC8(lo[m], d0, s0);
            hi[m] = ACC8(hi[m], d1, s1);
        }
    }
    if (g < G) {
        __m256i e, o;
        words_avx2(blocks + g * 16, &e, &o);
        __m256 s = _mm256_set1_ps(half_scale_of(scales[g]));
        for (int m = 0; m < R; m++) {
            const __m256i *x = (const __m256i *)(xp + m * n + g * 32);
            lo[m] = ACC8(lo[m], _mm256_madd_epi16(_mm256_loadu_si256(x), e), s);
            hi[m] = ACC8(hi[m], _mm256_madd_epi16(_mm256_loadu_si256(x + 1), o), s);
        }
    }
    for (int m = 0; m < R; m++) {
        float lanes[A16_LANES];
        _mm256_storeu_ps(lanes, lo[m]);
        _mm256_storeu_ps(lanes + 8, hi[m]);
        y[m * O] = sum_lanes(lanes) * row_scale[m];
    }
}
#undef ACC8

__attribute__((target("avx2")))
static void rows_fused_avx2(const int16_t *xp, const float *row_scale, int64_t R,
                            const uint8_t *blocks, const uint8_t *scales, int64_t G, float *y,
                            int64_t O) {
    DISPATCH_ROWS(R, rows_avx2, xp, row_scale, G, blocks, scales, y, O)
}
#endif

/* 2 = AVX-512BW, 1 = AVX2, 0 = portable: the most of `level` (mxfp4.c's levels, 3 and 2 both
 * AVX-512) that this CPU has */
int inhouse_a16_level(int level) {
#ifdef HAVE_X86
    __builtin_cpu_init();
    if (level >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
        return 2;
    if (level >= 1 && __builtin_cpu_supports("avx2")) return 1;
#endif
    (void)level;
    return 0;
}

void inhouse_mxfp4_a16_rows(int lv, const int16_t *xp, const float *row_scale, int64_t M,
                            const uint8_t *blocks, const uint8_t *scales, int64_t G, float *y,
                            int64_t O) {
    for (int64_t m0 = 0; m0 < M; m0 += MAX_A16_ROWS) {
        const int64_t R = M - m0 < MAX_A16_ROWS ? M - m0 : MAX_A16_ROWS;
        const int16_t *x = xp + m0 * G * 32;
#ifdef HAVE_X86
        if (lv == 2) {
            rows_fused_avx512(x, row_scale + m0, R, blocks, scales, G, y + m0 * O, O);
            continue;
        }
        if (lv == 1) {
            rows_fused_avx2(x, row_scale + m0, R, blocks, scales, G, y + m0 * O, O);
            continue;
        }
#endif
        rows_portable(x, row_scale + m0, R, blocks, scales, G, y + m0 * O, O);
    }
}
