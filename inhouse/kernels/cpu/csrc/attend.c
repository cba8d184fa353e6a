/* Attention of one query row per head over a KV cache (decode), with gpt-oss's sinks:
 * out[h] = sum_s p[h, s] * V[h / G, s], p = softmax over the allowed keys' scaled scores plus one
 * extra logit, the head's sink, that takes probability and carries no value.
 *
 * The work is small (heads x keys x head_dim); PyTorch's version of it is some twenty ops per
 * layer and segment, which cost more than the arithmetic. This is one call: heads are split over
 * the OpenMP threads; each head computes its scores, their maximum (with the sink), the
 * exponentials and the weighted sum of values, in fp32 whatever the storage dtype, rounded once at
 * the end. Sums run in a fixed order (16 partial sums where a loop is vectorised), and the exp is
 * our own (Cephes' polynomial, within 2 ulp of libm), so every build variant of the function
 * (target_clones: AVX-512, AVX2, baseline) gives the same bits, whatever the thread count.
 * ISO C (-std=c11) keeps the compiler from fusing multiplies and adds.
 * On AVX-512 the scores of 16 keys at a time and the weighted sum of values run in registers
 * (score_tiles_avx512, values_avx512): the same multiplies and adds in the same order, so the same
 * bits as the plain loops, which still do the keys after the last full tile (and everything on
 * other CPUs). simd = 0 keeps to the plain loops (the tests compare the two). */
#include <stdint.h>
#include <stdlib.h>

#include "common.h"
#include "kernels.h"

#define MAX_HEAD_DIM 256
#define MAX_GROUP 64 /* query heads per kv head */

/* e**x for x <= 0 (below -87 as at -87, about 1.6e-38): x = n ln2 + r, |r| <= ln2 / 2, and
 * 2**n * (1 + r + r**2 p(r)); branch-free, so loops over it vectorise. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float shifter = 12582912.0f;  /* 1.5 * 2**23: adding it rounds to an integer */
    float n = (x * 1.44269504088896341f + shifter) - shifter;
    float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float e = (p * (r * r) + r) + 1.0f;
    union { uint32_t u; float f; } two_n = {.u = (uint32_t)((int32_t)n + 127) << 23};
    return e * two_n.f;
}

static inline void load_row(const void *p, int bf16, int64_t D, float *out) {
    for (int64_t d = 0; d < D; d++) out[d] = load_as(p, bf16, d);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_X86 1

/* r[t] (16 floats each) -> r[j] = {r[0][j], r[1][j], ..., r[15][j]}: a 16 x 16 transpose. */
__attribute__((target("avx512f"), always_inline))
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  /* pairs of floats as doubles */
        __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
        __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    /* each 128-bit lane of r[i] now holds 4 floats of one column: regroup the lanes */
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);       /* lanes 0,2 of each */
        t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xDD);   /* lanes 1,3 of each */
        t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
        t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xDD);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
        r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
        r[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
        r[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xDD);
    }
}

/* 16 floats of row p (storage dtype) from element d */
__attribute__((target("avx512f"), always_inline))
static inline __m512 load16_avx512(const char *p, int bf16, int64_t d) {
    if (bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(p + 2 * d));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)(p + 4 * d));
}

/* Scores of keys 0..16*tiles-1 (rows D apart at kh) for the G heads: for each tile, the keys'
 * elements are transposed (kt[d] = element d of the 16 keys), then per head part[j] (16 vectors,
 * a lane per key) takes q[j] * kt[j], + q[16 + j] * kt[16 + j], ... in the plain loop's order and
 * sum_lanes' tree adds them: the plain loop's arithmetic for 16 keys at once. */
__attribute__((target("avx512f")))
static void score_tiles_avx512(const float *q, int64_t G, const char *kh, int bf16, size_t item,
                               int64_t tiles, int64_t n, int64_t D, float scale, float *scores) {
    __m512 kt[MAX_HEAD_DIM];
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t tile = 0; tile < tiles; tile++) {
        const char *k0 = kh + (size_t)(tile * 16 * D) * item;
        for (int64_t c = 0; c < D; c += 16) {
            __m512 r[16];
            for (int t = 0; t < 16; t++)
                r[t] = load16_avx512(k0 + (size_t)(t * D) * item, bf16, c);
            transpose16(r);
            for (int j = 0; j < 16; j++) kt[c + j] = r[j];
        }
        for (int64_t g = 0; g < G; g++) {
            const float *qg = q + g * D;
            __m512 part[16];
            for (int j = 0; j < 16; j++) part[j] = _mm512_mul_ps(_mm512_set1_ps(qg[j]), kt[j]);
            for (int64_t d = 16; d < D; d += 16)
                for (int j = 0; j < 16; j++)
                    part[j] = _mm512_add_ps(part[j],
                                            _mm512_mul_ps(_mm512_set1_ps(qg[d + j]), kt[d + j]));
            __m512 a[8];
            for (int i = 0; i < 8; i++) a[i] = _mm512_add_ps(part[i], part[i + 8]);
            __m512 b0 = _mm512_add_ps(a[0], a[4]), b1 = _mm512_add_ps(a[1], a[5]);
            __m512 b2 = _mm512_add_ps(a[2], a[6]), b3 = _mm512_add_ps(a[3], a[7]);
            __m512 sum = _mm512_add_ps(_mm512_add_ps(b0, b2), _mm512_add_ps(b1, b3));
            _mm512_storeu_ps(scores + g * n + tile * 16, _mm512_mul_ps(sum, sc));
        }
    }
}

/* out[g, d] (zeros on entry) += p[g, s] * V[s, d] for s = 0..n-1 in order, as the plain loop: the
 * sums of 4 heads x 64 elements stay in registers over all the keys. */
__attribute__((target("avx512f")))
static void values_avx512(const float *scores, int64_t G, const char *vh, int bf16, size_t item,
                          int64_t n, int64_t D, float *out) {
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
        const int chunks = (int)((D - d0) / 16 < 4 ? (D - d0) / 16 : 4);
        for (int64_t g0 = 0; g0 < G; g0 += 4) {
            const int heads = (int)(G - g0 < 4 ? G - g0 : 4);
            __m512 acc[4][4];
            for (int h = 0; h < 4; h++)
                for (int c = 0; c < 4; c++) acc[h][c] = _mm512_setzero_ps();
            for (int64_t s = 0; s < n; s++) {
                const char *row = vh + (size_t)(s * D) * item;
                __m512 v[4];
                for (int c = 0; c < chunks; c++) v[c] = load16_avx512(row, bf16, d0 + 16 * c);
                for (int h = 0; h < heads; h++) {
                    const __m512 p = _mm512_set1_ps(scores[(g0 + h) * n + s]);
                    for (int c = 0; c < chunks; c++)
                        acc[h][c] = _mm512_add_ps(acc[h][c], _mm512_mul_ps(p, v[c]));
                }
            }
            for (int h = 0; h < heads; h++)
                for (int c = 0; c < chunks; c++)
                    _mm512_storeu_ps(out + (g0 + h) * D + d0 + 16 * c, acc[h][c]);
        }
    }
}
#endif

static int has_avx512(void) {
#ifdef HAVE_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
#else
    return 0;
#endif
}

/* The G query heads q [G, D] (fp32) of one kv head: keys/values rows [n] at kh/vh (storage
 * dtype) -> out [G, D] fp32. scores: G * n floats of scratch. Each key and value row is converted
 * once for the G heads; a score is 16 partial sums over d, added pairwise. */
CLONES
static void attend_group(const float *q, int64_t G, const char *kh, const char *vh, int bf16,
                         size_t item, int64_t n, int64_t D, float scale, const float *sinks,
                         float *scores, float *out, int simd) {
    float row[MAX_HEAD_DIM], part[LANES];
    int64_t s = 0;
#ifdef HAVE_X86
    if (simd) {
        score_tiles_avx512(q, G, kh, bf16, item, n / 16, n, D, scale, scores);
        s = n / 16 * 16;
    }
#endif
    for (; s < n; s++) {
        load_row(kh + (size_t)(s * D) * item, bf16, D, row);
        for (int64_t g = 0; g < G; g++) {
            const float *qg = q + g * D;
            for (int j = 0; j < LANES; j++) part[j] = qg[j] * row[j];
            for (int64_t d = LANES; d < D; d += LANES)
                for (int j = 0; j < LANES; j++) part[j] += qg[d + j] * row[d + j];
            scores[g * n + s] = sum_lanes(part) * scale;
        }
    }
    float totals[MAX_GROUP];
    for (int64_t g = 0; g < G; g++) {  /* softmax with the sink, unnormalised; and its total */
        float *sc = scores + g * n, m = sinks[g];
        for (int64_t s = 0; s < n; s++) m = sc[s] > m ? sc[s] : m;
        for (int j = 0; j < LANES; j++) part[j] = 0.0f;
        s = 0;
        for (; s + LANES <= n; s += LANES)
            for (int j = 0; j < LANES; j++) {
                sc[s + j] = exp_nonpositive(sc[s + j] - m);
                part[j] += sc[s + j];
            }
        for (; s < n; s++) {
            sc[s] = exp_nonpositive(sc[s] - m);
            part[s % LANES] += sc[s];
        }
        totals[g] = sum_lanes(part) + exp_nonpositive(sinks[g] - m);
    }
    for (int64_t i = 0; i < G * D; i++) out[i] = 0.0f;
    s = 0;
#ifdef HAVE_X86
    if (simd) {
        values_avx512(scores, G, vh, bf16, item, n, D, out);
        s = n;
    }
#endif
    for (; s < n; s++) {  /* values: each row converted once for the G heads */
        load_row(vh + (size_t)(s * D) * item, bf16, D, row);
        for (int64_t g = 0; g < G; g++) {
            const float p = scores[g * n + s];
            for (int64_t d = 0; d < D; d++) out[g * D + d] += p * row[d];
        }
    }
    for (int64_t g = 0; g < G; g++)
        for (int64_t d = 0; d < D; d++) out[g * D + d] = out[g * D + d] / totals[g];
}

/* q [Hq, D]; k, v: Hkv heads of keys s = 0..S-1, row s of head j at (j * head_stride + s * D)
 * elements; keys [lo, hi) are allowed (causal and window: the caller's); sinks [Hq] fp32; q, k, v
 * and out [Hq, D] bf16 if bf16, else fp32; simd = 0 keeps to the plain loops (same bits). Returns
 * 0, -1 if memory ran out, or -2 if D is not a multiple of 16 or above MAX_HEAD_DIM, or Hq / Hkv
 * above MAX_GROUP. */
int inhouse_attend_one(const void *q, const void *k, const void *v, int bf16, const float *sinks,
                       int64_t Hq, int64_t Hkv, int64_t head_stride, int64_t lo, int64_t hi,
                       int64_t D, float scale, void *out, int nthreads, int simd) {
    const int64_t G = Hq / Hkv, n = hi > lo ? hi - lo : 0;
    if (D > MAX_HEAD_DIM || D % LANES || G > MAX_GROUP || G * Hkv != Hq) return -2;
    simd = simd && has_avx512();
    if (nthreads < 1) nthreads = 1;
    const size_t item = bf16 ? 2 : 4;
    /* per thread: G * n scores, G * D query and G * D output floats */
    const size_t per_thread = (size_t)(G * n + 2 * G * D);
    float *scratch = (float *)malloc((size_t)nthreads * per_thread * sizeof(float));
    if (!scratch) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t j = 0; j < Hkv; j++) {
        float *scores = thread_slice(scratch, per_thread), *qf = scores + G * n, *o = qf + G * D;
        for (int64_t g = 0; g < G; g++)
            load_row((const char *)q + (size_t)((j * G + g) * D) * item, bf16, D, qf + g * D);
        const size_t first = (size_t)(j * head_stride + lo * D) * item;
        attend_group(qf, G, (const char *)k + first, (const char *)v + first, bf16, item, n, D,
                     scale, sinks + j * G, scores, o, simd);
        for (int64_t i = 0; i < G * D; i++) store_as(out, bf16, j * G * D + i, o[i]);
    }
    free(scratch);
    return 0;
}

/* Rotary embedding in place of PyTorch's ops (layers.apply_rotary), with their roundings: x [T, H,
 * D] bf16 (bf16) or fp32, cos/sin [T, D/2] fp32 (rounded to x's dtype first, as .to(x.dtype)),
 * out [T, H, D]: [x1 * cos - x2 * sin, x2 * cos + x1 * sin], each product and sum rounded. */

int inhouse_rotary(const void *x, int bf16, const float *cos, const float *sin, int64_t T,
                   int64_t H, int64_t D, void *out) {
    const int64_t half = D / 2;
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++) {
            const int64_t base = (t * H + h) * D;
            for (int64_t i = 0; i < half; i++) {
                float c = round_as(bf16, cos[t * half + i]), s = round_as(bf16, sin[t * half + i]);
                float x1 = load_as(x, bf16, base + i), x2 = load_as(x, bf16, base + half + i);
                store_as(out, bf16, base + i, round_as(bf16, x1 * c) - round_as(bf16, x2 * s));
                store_as(out, bf16, base + half + i,
                         round_as(bf16, x2 * c) + round_as(bf16, x1 * s));
            }
        }
    return 0;
}
