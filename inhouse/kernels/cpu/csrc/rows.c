/* Row-wise ops of a decoder layer as one call each (a PyTorch op costs more than the arithmetic at
 * decode): RMSNorm, and the router's top-k with its softmax. Each row is computed on its own in a
 * fixed order (16 partial sums, added pairwise), so results do not depend on the batch, and every
 * build variant (target_clones: AVX-512, AVX2, baseline) gives the same bits. ISO C: no fused
 * multiply-adds. */
#include <math.h>

#include "common.h"
#include "kernels.h"

CLONES
static void rmsnorm_row(const void *x, int bf16, int64_t H, const float *w, float eps,
                        void *out) {
    float part[LANES] = {0}, t[LANES];
    int64_t i = 0;
    for (; i + LANES <= H; i += LANES) {
        for (int j = 0; j < LANES; j++) t[j] = load_as(x, bf16, i + j);
        for (int j = 0; j < LANES; j++) part[j] += t[j] * t[j];
    }
    for (; i < H; i++) {
        float v = load_as(x, bf16, i);
        part[i % LANES] += v * v;
    }
    const float r = 1.0f / sqrtf(sum_lanes(part) / (float)H + eps);
    for (i = 0; i < H; i++) store_as(out, bf16, i, (load_as(x, bf16, i) * r) * w[i]);
}

/* x [M, H] bf16 (bf16) or fp32, weight [H] fp32 -> out [M, H] in x's dtype:
 * x * (1 / sqrt(mean(x^2) + eps)) * weight, in fp32. Returns 0. */
int inhouse_rmsnorm(const void *x, int bf16, int64_t M, int64_t H, const float *weight, float eps,
                    void *out) {
    const size_t item = bf16 ? 2 : 4;
    for (int64_t m = 0; m < M; m++)
        rmsnorm_row((const char *)x + (size_t)(m * H) * item, bf16, H, weight, eps,
                    (char *)out + (size_t)(m * H) * item);
    return 0;
}

/* does logit a (expert i) come before b (expert j)? larger first, NaN above every number, ties to
 * the lower expert index */
static inline int ranks_before(float a, int64_t i, float b, int64_t j) {
    if (a != a || b != b) return b != b ? (a == a ? 0 : i < j) : 1;
    return a > b || (a == b && i < j);
}

/* The router's choice for each row: logits [M, E] (bf16 if bf16, else fp32) -> experts [M, k],
 * the k largest logits' experts, largest first (ranks_before), and weights [M, k] in the logits'
 * dtype: the softmax of those k logits in fp32 (e = expf(v - largest), divided by their sum taken
 * in that order), rounded once. Returns 0, or -2 if k is not in 1..E. */
int inhouse_route(const void *logits, int bf16, int64_t M, int64_t E, int64_t k, void *weights,
                  int64_t *experts) {
    if (k < 1 || k > E) return -2;
    for (int64_t m = 0; m < M; m++) {
        int64_t *top = experts + m * k;
        float v[k], e[k];
        int64_t n = 0;  /* insertion into the sorted top k */
        for (int64_t j = 0; j < E; j++) {
            const float x = load_as(logits, bf16, m * E + j);
            int64_t at = n;
            while (at > 0 && ranks_before(x, j, v[at - 1], top[at - 1])) at--;
            if (at >= k) continue;
            for (int64_t i = (n < k ? n : k - 1); i > at; i--) {
                v[i] = v[i - 1];
                top[i] = top[i - 1];
            }
            v[at] = x;
            top[at] = j;
            if (n < k) n++;
        }
        float sum = 0.0f;
        for (int64_t i = 0; i < k; i++) {
            e[i] = expf(v[i] - v[0]);
            sum += e[i];
        }
        for (int64_t i = 0; i < k; i++) store_as(weights, bf16, m * k + i, e[i] / sum);
    }
    return 0;
}
