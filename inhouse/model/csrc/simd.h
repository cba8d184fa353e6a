/* Small SIMD helpers shared by the kernels (x86-64 with GCC or clang only). */
#ifndef INHOUSE_SIMD_H
#define INHOUSE_SIMD_H
#include <immintrin.h>

/* the sum of a vector's 8 floats, in a fixed order */
__attribute__((target("avx2,fma")))
static inline float hsum_avx2(__m256 s) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}
#endif
