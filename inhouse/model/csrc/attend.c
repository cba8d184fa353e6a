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
 * ISO C (-std=c11) keeps the compiler from fusing multiplies and adds. */
#include <stdint.h>
#include <stdlib.h>

#include "common.h"

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

/* The G query heads q [G, D] (fp32) of one kv head: keys/values rows [n] at kh/vh (storage
 * dtype) -> out [G, D] fp32. scores: G * n floats of scratch. Each key and value row is converted
 * once for the G heads; a score is 16 partial sums over d, added pairwise. */
CLONES
static void attend_group(const float *q, int64_t G, const char *kh, const char *vh, int bf16,
                         size_t item, int64_t n, int64_t D, float scale, const float *sinks,
                         float *scores, float *out) {
    float row[MAX_HEAD_DIM], part[LANES];
    for (int64_t s = 0; s < n; s++) {
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
        int64_t s = 0;
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
    for (int64_t s = 0; s < n; s++) {  /* values: each row converted once for the G heads */
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
 * and out [Hq, D] bf16 if bf16, else fp32. Returns 0, -1 if memory ran out, or -2 if D is not a
 * multiple of 16 or above MAX_HEAD_DIM, or Hq / Hkv above MAX_GROUP. */
int inhouse_attend_one(const void *q, const void *k, const void *v, int bf16, const float *sinks,
                       int64_t Hq, int64_t Hkv, int64_t head_stride, int64_t lo, int64_t hi,
                       int64_t D, float scale, void *out, int nthreads) {
    const int64_t G = Hq / Hkv, n = hi > lo ? hi - lo : 0;
    if (D > MAX_HEAD_DIM || D % LANES || G > MAX_GROUP || G * Hkv != Hq) return -2;
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
                     scale, sinks + j * G, scores, o);
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
