/* Fused MXFP4 matmul for CPU: y[m, o] = sum_i x[m, i] * W[o, i], W packed as in gpt-oss checkpoints
 * (blocks [O, G, 16] uint8: low nibble = element 2j, high nibble = 2j+1; scales [O, G] E8M0).
 *
 * AVX-512 BF16 (bf16 rows): blocks go in pairs, whose 32 bytes widen to words that index a bf16
 * table (vpermw) and meet the reordered rows in vdpbf16ps. AVX-512 (fp32 rows): the rows are
 * reordered within each block (even elements, then odd), so a block's 16 bytes widen to 16 int32
 * lanes whose low and high nibbles index a 16-float table (vpermps). AVX2: each block is decoded
 * in registers (pshufb + int-to-float). The SIMD paths multiply each decoded block with up to
 * MAX_FUSED_ROWS (8) input rows. Portable: each output row is decoded once into a small buffer
 * (L1-resident) and dotted with every input row.
 * NOTE: on each path the dot product for (m, o) is computed the same way whatever M and the thread
 * count, so results are batch-invariant (the engine's reproducible mode relies on this). The paths
 * sum in different orders, so they differ from each other in the last bits.
 * The SIMD path is chosen at run time; the scalar path is the portable fallback. Plain C on raw
 * pointers, called through ctypes (which releases the GIL).
 * inhouse_moe_rows runs a whole MoE layer for a few rows (decode) in one call and one parallel
 * region: gate_up, the clamped SwiGLU, down and the weighted sum, as moe.Experts does it.
 * PATH_A16 (int8 models' experts) rounds the rows to int16 and sums integer products instead:
 * mxfp4_a16.c. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernels.h"

static const float FP4[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                              -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

/* input rows multiplied with each decoded block at once (SIMD paths) */
#define MAX_FUSED_ROWS 8

/* 2**(e-127), the E8M0 scale, from the exponent bits (no libm call; the table below is filled
 * once per call); e == 0 is the subnormal 2**-127, e == 255 infinity, as ldexpf gives them. */
static float scale_of(uint8_t e) {
    union { uint32_t u; float f; } v = {.u = e ? (uint32_t)e << 23 : 0x00400000u};
    return v.f;
}

static void fill_scale_table(float table[256]) {
    for (int e = 0; e < 256; e++) table[e] = scale_of((uint8_t)e);
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
#include "simd.h"
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

/* Output row o for R input rows, decoded and multiplied in registers: per block, the 32 products
 * are summed unscaled, then the block's scale is applied with one FMA. Each (m, o) is the same
 * chain of operations whatever M (batch-invariant). Called with R a literal (1..MAX_FUSED_ROWS) so
 * the row loops unroll and the accumulators stay in registers. */
__attribute__((target("avx2,fma"), always_inline))
static inline void rows_avx2(const float *x, const uint8_t *blocks, const uint8_t *scales,
                             int64_t G, float *y, int64_t O, const int R) {
    const int64_t n = G * 32;
    __m256 acc[MAX_FUSED_ROWS];
    for (int m = 0; m < R; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m256 v[4];
        block_values_avx2(blocks + g * 16, v);
        __m256 s = _mm256_set1_ps(half_scale_of(scales[g]));
        for (int m = 0; m < R; m++) {
            const float *xg = x + m * n + g * 32;
            __m256 p = _mm256_mul_ps(_mm256_loadu_ps(xg), v[0]);
            __m256 q = _mm256_mul_ps(_mm256_loadu_ps(xg + 8), v[1]);
            p = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 16), v[2], p);
            q = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 24), v[3], q);
            acc[m] = _mm256_fmadd_ps(_mm256_add_ps(p, q), s, acc[m]);
        }
    }
    for (int m = 0; m < R; m++) y[m * O] = hsum_avx2(acc[m]);
}

__attribute__((target("avx2,fma")))
static void row_fused_avx2(const float *x, int64_t M, const uint8_t *blocks, const uint8_t *scales,
                           int64_t G, float *y, int64_t O) {
    DISPATCH_ROWS(M, rows_avx2, x, blocks, scales, G, y, O)
}


/* ---- AVX-512 path ---------------------------------------------------------------------------- */
/* Rows reordered per block (prepare_rows): even elements, then odd ones. */
__attribute__((target("avx512f"), always_inline))
static inline void rows_avx512(const float *xp, const uint8_t *blocks, const uint8_t *scales,
                               int64_t G, float *y, int64_t O, const float *scale_table,
                               const int R) {
    const int64_t n = G * 32;
    const __m512 lut = _mm512_loadu_ps(FP4);
    __m512 acc[MAX_FUSED_ROWS];
    for (int m = 0; m < R; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        if (!(g & 3)) PREFETCH_L2(blocks + g * 16);
        __m512i t = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blocks + g * 16)));
        __m512 w_even = _mm512_permutexvar_ps(t, lut);  /* index = low 4 bits of each lane */
        __m512 w_odd = _mm512_permutexvar_ps(_mm512_srli_epi32(t, 4), lut);
        __m512 s = _mm512_set1_ps(scale_table[scales[g]]);
        for (int m = 0; m < R; m++) {
            const float *xg = xp + m * n + g * 32;
            __m512 p = _mm512_mul_ps(_mm512_loadu_ps(xg), w_even);
            p = _mm512_fmadd_ps(_mm512_loadu_ps(xg + 16), w_odd, p);
            acc[m] = _mm512_fmadd_ps(p, s, acc[m]);
        }
    }
    for (int m = 0; m < R; m++) y[m * O] = _mm512_reduce_add_ps(acc[m]);
}

__attribute__((target("avx512f")))
static void row_fused_avx512(const float *xp, int64_t M, const uint8_t *blocks,
                             const uint8_t *scales, int64_t G, float *y, int64_t O,
                             const float *scale_table) {
    DISPATCH_ROWS(M, rows_avx512, xp, blocks, scales, G, y, O, scale_table)
}

/* ---- AVX-512 BF16 path (bf16 input rows) ----------------------------------------------------- */
/* Blocks go in pairs: the 32 bytes of blocks g and g+1 widen to 32 words whose low nibbles (the
 * even elements of both blocks) and high nibbles (the odd ones) each index a 32-entry bf16 table in
 * one vpermw. So each row is reordered per pair as [even of g, even of g+1, odd of g, odd of g+1]
 * (16 values each; an odd last block as [even, odd]): inhouse_pairs16, shared with the int16 rows
 * of mxfp4_a16.c, which decode the same way. */

/* The weights decoded to bf16 (e2m1 values are exact in bf16) meet the bf16 input rows in
 * vdpbf16ps: the products are exact and summed in fp32, as the fp32 paths do. */
__attribute__((target("avx512f,avx512bw,avx512bf16"), always_inline))
static inline void rows_avx512bf16(const uint16_t *xp, int64_t n, const uint8_t *blocks,
                                   const uint8_t *scales, int64_t G, float *y, int64_t O,
                                   const float *scale_table, __m512i lut, const int R) {
    __m512 acc[MAX_FUSED_ROWS];
    for (int m = 0; m < R; m++) acc[m] = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 2 <= G; g += 2) {
        __m512i t = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(blocks + g * 16)));
        __m512bh w_even = (__m512bh)_mm512_permutexvar_epi16(t, lut);  /* index: low 5 bits */
        __m512bh w_odd = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(t, 4), lut);
        /* lanes 0-7 hold block g's sums, lanes 8-15 block g+1's */
        __m512 s = _mm512_mask_broadcastss_ps(_mm512_set1_ps(scale_table[scales[g]]), 0xFF00,
                                              _mm_set_ss(scale_table[scales[g + 1]]));
        for (int m = 0; m < R; m++) {
            const uint16_t *xg = xp + m * n + g * 32;
            __m512 p = _mm512_dpbf16_ps(_mm512_setzero_ps(),
                                        (__m512bh)_mm512_loadu_si512((const void *)xg), w_even);
            p = _mm512_dpbf16_ps(p, (__m512bh)_mm512_loadu_si512((const void *)(xg + 32)), w_odd);
            acc[m] = _mm512_fmadd_ps(p, s, acc[m]);
        }
    }
    if (g < G) {  /* an odd last block: [even, odd] in one vector */
        __m256i t = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(blocks + g * 16)));
        __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(t), _mm256_srli_epi16(t, 4), 1);
        __m512bh w = (__m512bh)_mm512_permutexvar_epi16(idx, lut);
        __m512 s = _mm512_set1_ps(scale_table[scales[g]]);
        for (int m = 0; m < R; m++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(xp + m * n + g * 32));
            acc[m] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), xv, w), s, acc[m]);
        }
    }
    for (int m = 0; m < R; m++) y[m * O] = _mm512_reduce_add_ps(acc[m]);
}

__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void row_fused_avx512bf16(const uint16_t *xp, int64_t M, const uint8_t *blocks,
                                 const uint8_t *scales, int64_t G, float *y, int64_t O,
                                 const float *scale_table, const uint16_t *table) {
    const int64_t n = G * 32;
    const __m512i lut = _mm512_loadu_si512((const void *)table);
    DISPATCH_ROWS(M, rows_avx512bf16, xp, n, blocks, scales, G, y, O, scale_table, lut)
}

/* FP4 values as bf16, twice over (a low nibble's index carries the high nibble's bit 4). */
static void bf16_table(uint16_t t[32]) {
    for (int i = 0; i < 32; i++) {
        union { float f; uint32_t u; } v = {.f = FP4[i & 15]};
        t[i] = (uint16_t)(v.u >> 16);
    }
}
#endif

/* 3 = AVX-512 with BF16 (and BW), 2 = AVX-512F, 1 = AVX2 + FMA, 0 = neither */
int inhouse_mxfp4_simd_level(void) {
#ifdef HAVE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512bf16")) return 3;
    if (__builtin_cpu_supports("avx512f")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
    return 0;
}

/* ---- one entry for every path --------------------------------------------------------------- */
/* 3: bf16 rows reordered per block pair (AVX-512 BF16); 2: fp32 rows reordered per block (AVX-512);
 * 1: fp32 rows as given (AVX2); 0: fp32 rows as given, each output row decoded (portable);
 * PATH_A16: rows rounded to int16, reordered per block pair (mxfp4_a16.c, the same bits on every
 * SIMD level). */
#define PATH_A16 4
static int path_for(int level, int x_bf16, int a16) {
    if (a16) return PATH_A16;
    int lv = inhouse_mxfp4_simd_level();
    if (level < lv) lv = level;
    if (lv >= 3 && !x_bf16) lv = 2;
    return lv;
}

static size_t prepared_item(int path) {
    return path == 3 || path == PATH_A16 ? sizeof(uint16_t) : sizeof(float);
}

/* M rows of G*32 (bf16 if x_bf16, else fp32) into the layout `path` reads (path 3 needs bf16);
 * PATH_A16 also writes each row's scale to row_scale, and rounds the rows in q (M*G*32 int16). */
static void prepare_rows(int path, const void *x, int x_bf16, int64_t M, int64_t G, void *xp,
                         float *row_scale, int16_t *q) {
    if (path == PATH_A16) {  /* rounding is per element, so it may come before the reordering */
        inhouse_int16_rows(x, x_bf16, M, G * 32, q, row_scale);
        inhouse_pairs16((const uint16_t *)q, M, G, (uint16_t *)xp);
        return;
    }
    if (path == 3) {
        inhouse_pairs16((const uint16_t *)x, M, G, (uint16_t *)xp);
        return;
    }
    float *out = (float *)xp;
    for (int64_t i = 0; i < M * G * 32; i += 32)
        for (int j = 0; j < 16; j++) {
            float even = load_as(x, x_bf16, i + 2 * j), odd = load_as(x, x_bf16, i + 2 * j + 1);
            if (path == 2) {
                out[i + j] = even;
                out[i + 16 + j] = odd;
            } else {
                out[i + 2 * j] = even;
                out[i + 2 * j + 1] = odd;
            }
        }
}

/* The tables the paths read, filled once per call. */
typedef struct {
    float scale[256];
    uint16_t bf16[32];
    int a16_level;  /* PATH_A16's SIMD level (inhouse_a16_level) */
} tables_t;

static void fill_tables(tables_t *t, int level) {
    fill_scale_table(t->scale);
    t->a16_level = inhouse_a16_level(level);
#ifdef HAVE_X86
    bf16_table(t->bf16);
#endif
}

/* y[m * O] for R <= MAX_FUSED_ROWS prepared rows against one output row (blocks b, scales s);
 * wbuf: G*32 floats, used by the portable path. */
static void fused_rows(int path, const void *xp, int64_t R, const uint8_t *b, const uint8_t *s,
                       int64_t G, float *y, int64_t O, const tables_t *t, float *wbuf) {
#ifdef HAVE_X86
    if (path == 3) {
        row_fused_avx512bf16((const uint16_t *)xp, R, b, s, G, y, O, t->scale, t->bf16);
        return;
    }
    if (path == 2) {
        row_fused_avx512((const float *)xp, R, b, s, G, y, O, t->scale);
        return;
    }
    if (path == 1) {
        row_fused_avx2((const float *)xp, R, b, s, G, y, O);
        return;
    }
#endif
    (void)t;
    decode_row_scalar(b, s, G, wbuf);
    for (int64_t m = 0; m < R; m++)
        y[m * O] = dot_scalar((const float *)xp + m * G * 32, wbuf, G * 32);
}

/* y[m * O] for M prepared rows (row_bytes apart; row_scale: theirs, PATH_A16 only) against one
 * output row, MAX_FUSED_ROWS at a time: every (m, o) is the same chain whatever M. */
static void all_rows(int path, const char *xp, size_t row_bytes, const float *row_scale, int64_t M,
                     const uint8_t *b, const uint8_t *s, int64_t G, float *y, int64_t O,
                     const tables_t *t, float *wbuf) {
    if (path == PATH_A16) {
        inhouse_mxfp4_a16_rows(t->a16_level, (const int16_t *)xp, row_scale, M, b, s, G, y, O);
        return;
    }
    for (int64_t m0 = 0; m0 < M; m0 += MAX_FUSED_ROWS) {
        int64_t rows = M - m0 < MAX_FUSED_ROWS ? M - m0 : MAX_FUSED_ROWS;
        fused_rows(path, xp + m0 * row_bytes, rows, b, s, G, y + m0 * O, O, t, wbuf);
    }
}

/* y [M, O] for the prepared rows xp [M, G*32] (row_scale: theirs, PATH_A16 only) and one matrix.
 * Inside a parallel region: the output rows are shared out over the threads. */
static void matmul_shared(int path, const char *xp, const float *row_scale, int64_t M,
                          const uint8_t *blocks, const uint8_t *scales, int64_t O, int64_t G,
                          float *y, const tables_t *t, float *wbuf) {
    const size_t row_bytes = (size_t)(G * 32) * prepared_item(path);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, chunk_of(O, omp_get_num_threads()))
#endif
    for (int64_t o = 0; o < O; o++)
        all_rows(path, xp, row_bytes, row_scale, M, blocks + o * G * 16, scales + o * G, G, y + o,
                 O, t, wbuf);
}

/* The portable path's decode buffers, G*32 floats per thread, allocated before the parallel region
 * (so that every thread runs the same loops); NULL on the SIMD paths (and if memory ran out). */
static float *decode_buffers(int path, int nthreads, int64_t G) {
    return path ? NULL : (float *)malloc((size_t)nthreads * (size_t)(G * 32) * sizeof(float));
}

static int matmul(const void *x, int x_bf16, int a16, int64_t M, const uint8_t *blocks,
                  const uint8_t *scales, int64_t O, int64_t G, float *y, int nthreads, int level) {
    const int path = path_for(level, x_bf16, a16);
    tables_t t;
    fill_tables(&t, level);
    if (nthreads < 1) nthreads = 1;
    char *xp = (char *)malloc((size_t)(M * G * 32) * prepared_item(path));
    float *row_scale = (float *)malloc((size_t)M * sizeof(float));
    int16_t *q = path == PATH_A16 ? (int16_t *)malloc((size_t)(M * G * 32) * sizeof(int16_t))
                                  : NULL;
    float *wbufs = decode_buffers(path, nthreads, G);
    int failed = !xp || !row_scale || (path == PATH_A16 && !q) || (!path && !wbufs);
    if (!failed) {
        prepare_rows(path, x, x_bf16, M, G, xp, row_scale, q);
#pragma omp parallel num_threads(nthreads)
        matmul_shared(path, xp, row_scale, M, blocks, scales, O, G, y, &t,
                      thread_slice(wbufs, (size_t)(G * 32)));
    }
    free(xp);
    free(row_scale);
    free(q);
    free(wbufs);
    return failed ? -1 : 0;
}

/* x [M, G*32] fp32, blocks [O, G, 16], scales [O, G] -> y [M, O] fp32. level: the most SIMD to
 * use (2 = AVX-512, 1 = AVX2, 0 = the portable path). Returns 0, or -1 if memory ran out. */
int inhouse_mxfp4_matmul(const float *x, int64_t M, const uint8_t *blocks, const uint8_t *scales,
                         int64_t O, int64_t G, float *y, int nthreads, int level) {
    return matmul(x, 0, 0, M, blocks, scales, O, G, y, nthreads, level);
}

/* x [M, G*32] (bf16 if x_bf16, else fp32) rounded to int16 rows -> y [M, O] fp32 (mxfp4_a16.c:
 * the same bits at every level). Returns 0, or -1 if memory ran out. */
int inhouse_mxfp4_matmul_a16(const void *x, int x_bf16, int64_t M, const uint8_t *blocks,
                             const uint8_t *scales, int64_t O, int64_t G, float *y, int nthreads,
                             int level) {
    return matmul(x, x_bf16, 1, M, blocks, scales, O, G, y, nthreads, level);
}

/* x [M, G*32] bf16 -> y [M, O] fp32, on CPUs with AVX-512 BF16 (inhouse_mxfp4_simd_level() == 3;
 * -2 if not). Returns 0, -1 if memory ran out. */
int inhouse_mxfp4_matmul_bf16(const uint16_t *x, int64_t M, const uint8_t *blocks,
                              const uint8_t *scales, int64_t O, int64_t G, float *y, int nthreads) {
    if (inhouse_mxfp4_simd_level() < 3) return -2;
    return matmul(x, 1, 0, M, blocks, scales, O, G, y, nthreads, 3);
}

/* ---- decoding whole matrices (prefill: decode once, then a GEMM) --------------------------- */
/* Rows [o0, o1) of blocks [O, G, 16] / scales [O, G] -> out [O, G*32] in element order, fp32 or
 * bf16 (out_bf16): FP4 value times 2**(e-127), as twice the value times half_scale_of(e), which
 * is exact (ldexp's value, also for e = 0 and 255), and exact in bf16 too (the same exponent
 * range, and at most 2 significant bits), so the bf16 result is the fp32 one's top half. */
static const float FP4X2F[16] = {0, 1, 2, 3, 4, 6, 8, 12, -0.0f, -1, -2, -3, -4, -6, -8, -12};

static void decode_rows_c(const uint8_t *blocks, const uint8_t *scales, int64_t o0, int64_t o1,
                          int64_t G, void *out, int out_bf16) {
    for (int64_t i = o0 * G; i < o1 * G; i++) {  /* block i of the matrix */
        const uint8_t *b = blocks + i * 16;
        const float s = half_scale_of(scales[i]);
        for (int j = 0; j < 32; j++) {
            const float v = FP4X2F[j & 1 ? b[j / 2] >> 4 : b[j / 2] & 15] * s;
            if (out_bf16) ((uint16_t *)out)[i * 32 + j] = (uint16_t)(
                ((union { float f; uint32_t u; }){.f = v}).u >> 16);
            else ((float *)out)[i * 32 + j] = v;
        }
    }
}

#ifdef HAVE_X86
/* The same values: a block's even and odd elements through the table (vpermps), interleaved
 * back into element order (vpermt2ps), times the scale. */
__attribute__((target("avx512f")))
static void decode_rows_avx512(const uint8_t *blocks, const uint8_t *scales, int64_t o0,
                               int64_t o1, int64_t G, void *out, int out_bf16) {
    const __m512 lut = _mm512_loadu_ps(FP4X2F);
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    for (int64_t i = o0 * G; i < o1 * G; i++) {
        __m512i t = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blocks + i * 16)));
        __m512 even = _mm512_permutexvar_ps(t, lut), odd = _mm512_permutexvar_ps(
                                                          _mm512_srli_epi32(t, 4), lut);
        __m512 s = _mm512_set1_ps(half_scale_of(scales[i]));
        __m512 lo = _mm512_mul_ps(_mm512_permutex2var_ps(even, first, odd), s);
        __m512 hi = _mm512_mul_ps(_mm512_permutex2var_ps(even, second, odd), s);
        if (out_bf16) {
            uint16_t *o = (uint16_t *)out + i * 32;
            _mm256_storeu_si256((__m256i *)o, _mm512_cvtepi32_epi16(
                                                  _mm512_srli_epi32(_mm512_castps_si512(lo), 16)));
            _mm256_storeu_si256((__m256i *)(o + 16), _mm512_cvtepi32_epi16(
                                                  _mm512_srli_epi32(_mm512_castps_si512(hi), 16)));
        } else {
            _mm512_storeu_ps((float *)out + i * 32, lo);
            _mm512_storeu_ps((float *)out + i * 32 + 16, hi);
        }
    }
}
#endif

/* blocks [O, G, 16], scales [O, G] -> out [O, G*32] fp32 or bf16 (out_bf16), the same values as
 * mxfp4.dequantize on every path, the rows shared out over the threads. level: the most SIMD to
 * use (2 or more: AVX-512). Returns 0. */
int inhouse_mxfp4_decode(const uint8_t *blocks, const uint8_t *scales, int64_t O, int64_t G,
                         void *out, int out_bf16, int nthreads, int level) {
    if (nthreads < 1) nthreads = 1;
    const int64_t step = 16;
    const int simd = level >= 2 && inhouse_mxfp4_simd_level() >= 2;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t o0 = 0; o0 < O; o0 += step) {
        const int64_t o1 = o0 + step < O ? o0 + step : O;
#ifdef HAVE_X86
        if (simd) {
            decode_rows_avx512(blocks, scales, o0, o1, G, out, out_bf16);
            continue;
        }
#endif
        decode_rows_c(blocks, scales, o0, o1, G, out, out_bf16);
    }
    (void)simd;
    return 0;
}

/* ---- one MoE layer for a few rows ----------------------------------------------------------- */
/* y [S, O] for S prepared rows (row_scale: theirs, PATH_A16 only) grouped by expert (group gi:
 * rows group[gi]..group[gi+1]-1, all routed to expert experts[slot[group[gi]]]) against that
 * expert's matrix of the layer's [E, O, G, 16] blocks. Inside a parallel region: (group, output
 * row) pairs are shared out. */
static void experts_shared(int path, const char *xp, const float *row_scale, int64_t ng,
                           const int64_t *group, const int64_t *slot, const int64_t *experts,
                           const uint8_t *blocks, const uint8_t *scales, int64_t O, int64_t G,
                           float *y, const tables_t *t, float *wbuf) {
    const size_t row_bytes = (size_t)(G * 32) * prepared_item(path);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, chunk_of(ng * O, omp_get_num_threads()))
#endif
    for (int64_t i = 0; i < ng * O; i++) {
        const int64_t gi = i / O, o = i % O, e = experts[slot[group[gi]]], s0 = group[gi];
        all_rows(path, xp + s0 * row_bytes, row_bytes, row_scale + s0, group[gi + 1] - s0,
                 blocks + (e * O + o) * G * 16, scales + (e * O + o) * G, G, y + s0 * O + o, O, t,
                 wbuf);
    }
}

/* The clamped SwiGLU of moe.Experts (layers.swiglu) on one slot's gate_up row h [2I] (gate and up
 * interleaved, before the bias b, in the model's dtype), with its bf16 roundings (bf16) or none
 * (fp32), in two halves around the exp (libm's expf, called by the caller): swiglu_in gives the
 * clamped gate and up and z = alpha * gate; swiglu_out, given e = exp(-z), the activation
 * (up + 1) * gate * sigmoid(z) in the model's dtype. Split out of the loop so that these
 * vectorise: each is compiled once per dtype (bf16 a literal) and per SIMD level (CLONES), the
 * same operations in the same order; no sums, so every variant gives the same bits. */
__attribute__((always_inline))
static inline void swiglu_in(const int bf16, const float *h, const void *b, int64_t I, float alpha,
                             float limit, float *gate, float *up, float *z) {
    for (int64_t j = 0; j < I; j++) {
        float g = round_as(bf16, round_as(bf16, h[2 * j]) + load_as(b, bf16, 2 * j));
        float u = round_as(bf16, round_as(bf16, h[2 * j + 1]) + load_as(b, bf16, 2 * j + 1));
        gate[j] = g > limit ? limit : g;  /* NaN stays NaN, as in torch.clamp */
        up[j] = u < -limit ? -limit : (u > limit ? limit : u);
        z[j] = round_as(bf16, alpha * gate[j]);
    }
}

__attribute__((always_inline))
static inline void swiglu_out(const int bf16, const float *gate, const float *up, const float *e,
                              int64_t I, void *a) {
    for (int64_t j = 0; j < I; j++) {
        float sig = round_as(bf16, 1.0f / (1.0f + e[j]));
        store_as(a, bf16, j, round_as(bf16, up[j] + 1.0f) * round_as(bf16, gate[j] * sig));
    }
}

CLONES static void swiglu_in_bf16(const float *h, const void *b, int64_t I, float alpha,
                                  float limit, float *gate, float *up, float *z) {
    swiglu_in(1, h, b, I, alpha, limit, gate, up, z);
}
CLONES static void swiglu_in_f32(const float *h, const void *b, int64_t I, float alpha,
                                 float limit, float *gate, float *up, float *z) {
    swiglu_in(0, h, b, I, alpha, limit, gate, up, z);
}
CLONES static void swiglu_out_bf16(const float *gate, const float *up, const float *e, int64_t I,
                                   void *a) {
    swiglu_out(1, gate, up, e, I, a);
}
CLONES static void swiglu_out_f32(const float *gate, const float *up, const float *e, int64_t I,
                                  void *a) {
    swiglu_out(0, gate, up, e, I, a);
}

/* x [M, H] (bf16 if bf16, else fp32), experts/weights [M, k] (the router's choice and its weights,
 * fp32 values of the model's dtype), the layer's packed experts (gate_up [E, 2I, H/32, 16] with
 * gate and up interleaved, down [E, H, I/32, 16]) and biases [E, 2I], [E, H] in the model's dtype
 * -> out [M, H] in the model's dtype. The same operations as the PyTorch path (moe.Experts), in
 * its order and with its bf16 roundings: gate_up + bias, the clamped SwiGLU, down + bias, times
 * the routing weight, summed over the row's experts in ascending order. One parallel region for
 * the layer: each expert's weights are read once for all rows routed to it, and every row is
 * computed as if it were alone (batch-invariant). a16: both matrices meet their rows rounded to
 * int16 (PATH_A16) instead. Returns 0, or -1 if memory ran out. */
int inhouse_moe_rows(const void *x, int bf16, int a16, int64_t M, int64_t k,
                     const int64_t *experts, const float *weights, const uint8_t *gu_blocks,
                     const uint8_t *gu_scales, const void *gu_bias, const uint8_t *dn_blocks,
                     const uint8_t *dn_scales, const void *dn_bias, int64_t H, int64_t I,
                     float alpha, float limit, void *out, int nthreads, int level) {
    const int path = path_for(level, bf16, a16);
    const int64_t S = M * k, GH = H / 32, GI = I / 32, O1 = 2 * I, HI = H > I ? H : I;
    const size_t item = prepared_item(path), act_item = bf16 ? 2 : 4;
    /* slots (row, choice) ordered by expert, then row: each expert's rows are contiguous */
    int64_t *slot = (int64_t *)malloc((size_t)S * sizeof(int64_t));
    int64_t *group = (int64_t *)malloc((size_t)(S + 1) * sizeof(int64_t));  /* first slots */
    char *xp = (char *)malloc((size_t)(S * H) * item);
    char *ap = (char *)malloc((size_t)(S * I) * item);
    char *act = (char *)malloc((size_t)(S * I) * act_item);
    float *h1 = (float *)malloc((size_t)(S * O1) * sizeof(float));
    float *h2 = (float *)malloc((size_t)(S * H) * sizeof(float));
    float *x_scale = (float *)malloc((size_t)(2 * S) * sizeof(float)), *a_scale = x_scale + S;
    if (nthreads < 1) nthreads = 1;
    /* a row's rounding to int16 (PATH_A16), per thread */
    int16_t *q = path == PATH_A16 ? (int16_t *)malloc((size_t)(nthreads * HI) * sizeof(int16_t))
                                  : NULL;
    float *wbufs = decode_buffers(path, nthreads, GH > GI ? GH : GI);
    float *swiglu_bufs = (float *)malloc((size_t)nthreads * (size_t)(3 * I) * sizeof(float));
    int failed = !slot || !group || !xp || !ap || !act || !h1 || !h2 || !x_scale ||
                 (path == PATH_A16 && !q) || !swiglu_bufs || (!path && !wbufs);
    int64_t groups = 0;
    if (!failed) {
        for (int64_t s = 0; s < S; s++) {  /* insertion sort: S is small */
            int64_t j = s;
            while (j > 0 && experts[slot[j - 1]] > experts[s]) {
                slot[j] = slot[j - 1];
                j--;
            }
            slot[j] = s;
        }
        for (int64_t s = 0; s < S; s++)
            if (s == 0 || experts[slot[s]] != experts[slot[s - 1]]) group[groups++] = s;
        group[groups] = S;
        for (int64_t s = 0; s < S; s++)
            prepare_rows(path, (const char *)x + (size_t)(slot[s] / k * H) * act_item, bf16, 1,
                         GH, xp + (size_t)(s * H) * item, x_scale + s, q);
    }
    tables_t t;
    fill_tables(&t, level);
    const int64_t ng = failed ? 0 : groups;  /* every thread runs the same loops */
#pragma omp parallel num_threads(nthreads)
    {
        float *wbuf = thread_slice(wbufs, (size_t)((GH > GI ? GH : GI) * 32));
        /* gate_up for every (expert, output row), then SwiGLU per slot, then down */
        experts_shared(path, xp, x_scale, ng, group, slot, experts, gu_blocks, gu_scales, O1, GH,
                       h1, &t, wbuf);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t s = 0; s < (ng ? S : 0); s++) {
            char *a = act + (size_t)(s * I) * act_item;
            float *gate = thread_slice(swiglu_bufs, (size_t)(3 * I)), *up = gate + I, *z = up + I;
            const float *h = h1 + s * O1;
            const char *b = (const char *)gu_bias + (size_t)(experts[slot[s]] * O1) * act_item;
            /* in three loops, so that the two without the exp vectorise: the same operations */
            if (bf16) swiglu_in_bf16(h, b, I, alpha, limit, gate, up, z);
            else swiglu_in_f32(h, b, I, alpha, limit, gate, up, z);
            for (int64_t j = 0; j < I; j++) z[j] = expf(-z[j]);
            if (bf16) swiglu_out_bf16(gate, up, z, I, a);
            else swiglu_out_f32(gate, up, z, I, a);
            prepare_rows(path, a, bf16, 1, GI, ap + (size_t)(s * I) * item, a_scale + s,
                         q ? q + (size_t)thread_index() * HI : NULL);
        }
        experts_shared(path, ap, a_scale, ng, group, slot, experts, dn_blocks, dn_scales, H, GI,
                       h2, &t, wbuf);
        /* each row's experts in ascending order (the slots' order), as torch's index_add_; the
         * (row, column) pairs are shared out, so that one row (decode) uses every thread */
#ifdef _OPENMP
#pragma omp for schedule(dynamic, chunk_of(M * H, omp_get_num_threads()))
#endif
        for (int64_t i = 0; i < (ng ? M * H : 0); i++) {
            const int64_t m = i / H, o = i % H;
            float acc = 0.0f;
            for (int64_t s = 0; s < S; s++) {
                if (slot[s] / k != m) continue;
                const int64_t e = experts[slot[s]];
                float y = round_as(bf16, round_as(bf16, h2[s * H + o]) +
                                             load_as(dn_bias, bf16, e * H + o));
                acc = round_as(bf16, acc + round_as(bf16, y * weights[slot[s]]));
            }
            store_as(out, bf16, m * H + o, acc);
        }
    }
    free(slot); free(group); free(xp); free(ap); free(act); free(h1); free(h2); free(x_scale);
    free(q); free(wbufs); free(swiglu_bufs);
    return failed ? -1 : 0;
}
