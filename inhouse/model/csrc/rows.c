/* Row-wise ops of a decoder layer as one call each (a PyTorch op costs more than the arithmetic at
 * decode): RMSNorm. Each row is computed on its own in a fixed order (16 partial sums, added
 * pairwise), so results do not depend on the batch, and every build variant (target_clones:
 * AVX-512, AVX2, baseline) gives the same bits. ISO C: no fused multiply-adds. */
#include <math.h>

#include "common.h"

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
