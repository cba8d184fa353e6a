/* Small SIMD helpers shared by the kernels (x86-64 with GCC or clang only). */
#ifndef INHOUSE_SIMD_H
#define INHOUSE_SIMD_H
#include <immintrin.h>

/* Calls F(args..., R) with R a literal 1..8 (8 for anything larger). F is always_inline, so its
 * loops over the R rows unroll and its per-row accumulators stay in registers; with a run-time
 * count they stay in memory, a store-to-load chain per step. */
#define DISPATCH_ROWS(R, F, ...)                                                                 \
    switch (R) {                                                                                 \
    case 1: F(__VA_ARGS__, 1); break;                                                            \
    case 2: F(__VA_ARGS__, 2); break;                                                            \
    case 3: F(__VA_ARGS__, 3); break;                                                            \
    case 4: F(__VA_ARGS__, 4); break;                                                            \
    case 5: F(__VA_ARGS__, 5); break;                                                            \
    case 6: F(__VA_ARGS__, 6); break;                                                            \
    case 7: F(__VA_ARGS__, 7); break;                                                            \
    default: F(__VA_ARGS__, 8); break;                                                           \
    }

/* the sum of a vector's 8 floats, in a fixed order */
__attribute__((target("avx2,fma")))
static inline float hsum_avx2(__m256 s) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}
#endif
