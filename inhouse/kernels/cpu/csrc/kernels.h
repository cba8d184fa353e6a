/* The entry points of the kernels (one shared library, `inhouse.kernels.cpu._native`), declared once:
 * step.c calls them in sequence for a whole decode step, and each kernel's file includes this to
 * keep its definitions and these declarations the same. Their comments are at the definitions. */
#ifndef INHOUSE_KERNELS_H
#define INHOUSE_KERNELS_H
#include <stdint.h>

/* rows.c */
int inhouse_rmsnorm(const void *x, int bf16, int64_t M, int64_t H, const float *weight, float eps,
                    void *out);
int inhouse_route(const void *logits, int bf16, int64_t M, int64_t E, int64_t k, void *weights,
                  int64_t *experts);

/* dense.c: `dtypes` says which of x, bias and y are bf16 */
enum { X_BF16 = 1, BIAS_BF16 = 2, Y_BF16 = 4 };
int inhouse_dense_simd_level(void);
int inhouse_bf16_matmul_many(const void *x, int dtypes, int64_t M, int n, const uint16_t *const *w,
                             const void *const *bias, const int64_t *O, int64_t K, void *const *y,
                             int nthreads, int level);
void inhouse_int16_rows(const void *x, int x_bf16, int64_t M, int64_t K, int16_t *q,
                        float *row_scale);
int inhouse_int8_matmul_many(const void *x, int dtypes, int64_t M, int n, const int8_t *const *w,
                             const float *const *scale, const void *const *bias,
                             const int64_t *O, int64_t K, void *const *y, int nthreads,
                             int level);

/* attend.c */
int inhouse_attend_one(const void *q, const void *k, const void *v, int bf16, const float *sinks,
                       int64_t Hq, int64_t Hkv, int64_t head_stride, int64_t lo, int64_t hi,
                       int64_t D, float scale, void *out, int nthreads, int simd);
int inhouse_rotary(const void *x, int bf16, const float *cos, const float *sin, int64_t T,
                   int64_t H, int64_t D, void *out);

/* mxfp4.c */
int inhouse_mxfp4_simd_level(void);
int inhouse_moe_rows(const void *x, int bf16, int a16, int64_t M, int64_t k,
                     const int64_t *experts, const float *weights, const uint8_t *gu_blocks,
                     const uint8_t *gu_scales, const void *gu_bias, const uint8_t *dn_blocks,
                     const uint8_t *dn_scales, const void *dn_bias, int64_t H, int64_t I,
                     float alpha, float limit, void *out, int nthreads, int level);

/* mxfp4_a16.c: the int16-row arithmetic mxfp4.c's PATH_A16 runs */
void inhouse_pairs16(const uint16_t *x, int64_t M, int64_t G, uint16_t *xp);
int inhouse_a16_level(int level);
void inhouse_mxfp4_a16_rows(int lv, const int16_t *xp, const float *row_scale, int64_t M,
                            const uint8_t *blocks, const uint8_t *scales, int64_t G, float *y,
                            int64_t O);
#endif
