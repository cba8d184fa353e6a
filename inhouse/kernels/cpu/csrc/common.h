/* Plain-C helpers shared by the kernels (no intrinsics): bf16 conversions as torch does them,
 * per-thread scratch, and the fixed-order sums of the target_clones kernels. */
#ifndef INHOUSE_COMMON_H
#define INHOUSE_COMMON_H
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)h << 16};
    return v.f;
}

/* to nearest even, as torch; NaN stays NaN */
static inline uint16_t f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = {.f = f};
    if ((v.u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

/* 2**(e-128): an E8M0 scale (2**(e-127)) halved, for FP4 values held doubled as integers; built
 * from the exponent bits (no libm call), e <= 1 gives a subnormal, done by ldexpf. Exact: a power
 * of two either way. */
static inline float half_scale_of(uint8_t e) {
    if (e <= 1) return ldexpf(1.0f, (int)e - 128);
    union { uint32_t u; float f; } v = {.u = (uint32_t)(e - 1) << 23};
    return v.f;
}

/* At one or two rows the weight-streaming kernels are bound by the reads in flight, not by
 * arithmetic: from memory the MXFP4 kernels streamed 10-12 GB/s on an Ice Lake where a plain read
 * does 17.6 (2 threads), and a load into L1 holds one of the core's few fill buffers until its
 * line arrives. Asking for the weights L2_AHEAD bytes ahead into L2 (prefetcht1) adds reads that
 * hold none. Interleaved A/B, builds side by side in one process: MXFP4 one row 9.5-12.8 ->
 * 11.0-16.2 GB/s (1, 2 and 4 KB ahead all gained; into L1, 0.5-4 KB ahead, nothing), the dense
 * kernel at one and two rows bf16 17.6-18.9 -> 20.4-20.9, int8 15.6-17.6 -> 19.4-20.1. Once per
 * 64-byte line; a prefetch past the matrix never faults, and no arithmetic changes. */
#define L2_AHEAD 2048
#define PREFETCH_L2(p) __builtin_prefetch((const char *)(p) + L2_AHEAD, 0, 2)

/* v as stored in the model's dtype: rounded to bf16 (bf16), or as it is (fp32) */
static inline float round_as(int bf16, float v) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

static inline float load_as(const void *x, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

static inline void store_as(void *x, int bf16, int64_t i, float v) {
    if (bf16) ((uint16_t *)x)[i] = f32_to_bf16(v);
    else ((float *)x)[i] = v;
}

/* this thread's number inside a parallel region (0 outside one, or without OpenMP) */
static inline int thread_index(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* This thread's part of a scratch buffer of per_thread floats per thread, allocated before the
 * parallel region (so that every thread runs the same loops); NULL stays NULL. */
static inline float *thread_slice(float *buffer, size_t per_thread) {
    return buffer ? buffer + (size_t)thread_index() * per_thread : NULL;
}

/* Loops over output rows hand them out in chunks, CHUNKS_PER_THREAD per thread on average, to
 * whichever thread is free (schedule(dynamic, chunk_of(...))): on a shared machine one core is
 * often slower for a while, and a static split makes the other wait for it (decode step, 20b shape,
 * 2 cores, interleaved: median 146 ms against 159 ms static). A row's result does not depend on
 * the thread that computes it, so the split changes no bits. */
#define CHUNKS_PER_THREAD 16
static inline int64_t chunk_of(int64_t n, int nthreads) {
    const int64_t parts = (int64_t)(nthreads < 1 ? 1 : nthreads) * CHUNKS_PER_THREAD;
    return n > parts ? (n + parts - 1) / parts : 1;
}

/* Loops written over LANES partial sums vectorise without reordering a sum, so the build variants
 * of a function (CLONES: AVX-512, AVX2, baseline; ISO C fuses no multiply-adds) give the same
 * bits. */
#define LANES 16
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

/* the sum of LANES partial sums, pairwise (a fixed tree, written out to stay in registers) */
static inline float sum_lanes(const float p[LANES]) {
    float a0 = p[0] + p[8], a1 = p[1] + p[9], a2 = p[2] + p[10], a3 = p[3] + p[11];
    float a4 = p[4] + p[12], a5 = p[5] + p[13], a6 = p[6] + p[14], a7 = p[7] + p[15];
    float b0 = a0 + a4, b1 = a1 + a5, b2 = a2 + a6, b3 = a3 + a7;
    return (b0 + b2) + (b1 + b3);
}
#endif
