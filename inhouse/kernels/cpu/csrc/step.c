/* One decode step through every decoder layer in one call: M rows (one new token of each of M
 * sequences) of a bf16 model whose projections are bf16 or int8 and whose experts are MXFP4.
 *
 * Each layer is the same sequence of kernel calls the PyTorch module path makes at decode
 * (transformer.DecoderLayer with every kernel applying), with the same arguments, so the result is
 * the same bits: RMSNorm, q/k/v in one dense call, rotary, the new key and value written into each
 * sequence's cache buffer, attention over its allowed keys, o_proj, the residual add (fp32 sum
 * rounded to bf16, as torch adds bf16 tensors), RMSNorm, the router's logits, top-k and softmax,
 * the MoE layer, the residual add. What it saves is the Python between the calls: about twenty
 * wrapper and tensor calls per layer, some 10 ms per decoded token on the 20b shape. The caller
 * (decode_step.py) reserves each new key's slot in the caches and says which keys each row may
 * see; this file only computes. */
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "kernels.h"

/* One layer's weights (decode_step.Layer mirrors it). Projections 0..3 are q, k, v, o: bf16
 * [out, in], or int8 with an fp32 scale per output row; biases in the model's dtype or NULL. */
typedef struct {
    const float *attn_norm, *mlp_norm;  /* [H] fp32 */
    const void *proj[4];
    const float *proj_scale[4];         /* int8 projections only */
    const void *proj_bias[4];
    const float *sinks;                 /* [Hq] fp32 */
    const uint16_t *router;             /* [E, H] bf16 */
    const void *router_bias;            /* [E] */
    const uint8_t *gu_blocks, *gu_scales, *dn_blocks, *dn_scales;
    const void *gu_bias, *dn_bias;      /* [E, 2I], [E, H] */
} step_layer_t;

/* One row's cache at one layer (decode_step.Slot): the buffer [Hkv, capacity, D] of keys and of
 * values, head_stride = capacity * D; the new key goes to position `at` of the buffer; the row
 * attends over the keys from position `first` on, of which [lo, hi) are allowed. */
typedef struct {
    void *k, *v;
    int64_t head_stride, at, first, lo, hi;
} step_slot_t;

/* The shapes and settings of the step (decode_step.Shape). */
typedef struct {
    int64_t layers, M, H, Hq, Hkv, D, E, k, I;
    float eps, scale, alpha, limit;
    int int8;            /* projections: 1 int8, 0 bf16 */
    int experts_a16;     /* experts: 1 rows rounded to int16 (mxfp4_a16.c), 0 bf16 rows */
    int proj_dtypes;     /* BIAS_BF16 if their biases are bf16 (dense.c's flags) */
    int router_dtypes;   /* likewise for the router's bias */
    int dense_level, mxfp4_level, attend_simd, nthreads;
} step_shape_t;

/* x [M, H] += y, each sum in fp32 rounded to bf16 */
static void add_rows(uint16_t *x, const uint16_t *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(y[i]));
}

/* rows h [M, K] bf16 as the bf16 weights' kernel takes them: as they are (X_BF16 in *flag) on
 * AVX-512 BF16, else converted to fp32 in h32 (as dense_kernel._run does) */
static const void *rows_for_bf16_weights(const step_shape_t *c, const uint16_t *h, float *h32,
                                         int64_t K, int *flag) {
    *flag = c->dense_level >= 3 ? X_BF16 : 0;
    if (*flag) return h;
    for (int64_t i = 0; i < c->M * K; i++) h32[i] = bf16_to_f32(h[i]);
    return h32;
}

/* the n projections p..p+n-1 of rows h [M, K] bf16 (h32: room for them in fp32) -> bf16 outputs
 * y[i] [M, O[i]] */
static int project(const step_shape_t *c, const step_layer_t *w, int p, int n, const uint16_t *h,
                   float *h32, int64_t K, const int64_t *O, void *const *y) {
    const int dtypes = c->proj_dtypes | Y_BF16;
    if (c->int8)
        return inhouse_int8_matmul_many(h, dtypes | X_BF16, c->M, n,
                                        (const int8_t *const *)(w->proj + p), w->proj_scale + p,
                                        w->proj_bias + p, O, K, y, c->nthreads, c->dense_level);
    int x_bf16;
    const void *x = rows_for_bf16_weights(c, h, h32, K, &x_bf16);
    return inhouse_bf16_matmul_many(x, dtypes | x_bf16, c->M, n,
                                    (const uint16_t *const *)(w->proj + p), w->proj_bias + p, O,
                                    K, y, c->nthreads, c->dense_level);
}

/* row m's attention at one layer: its new key and value into the cache, then attend */
static int attend_row(const step_shape_t *c, const step_layer_t *w, const step_slot_t *s,
                      const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out) {
    const int64_t D = c->D;
    for (int64_t j = 0; j < c->Hkv; j++) {
        const size_t to = (size_t)(j * s->head_stride + s->at * D);
        memcpy((uint16_t *)s->k + to, k + j * D, (size_t)D * 2);
        memcpy((uint16_t *)s->v + to, v + j * D, (size_t)D * 2);
    }
    const size_t first = (size_t)(s->first * D);
    return inhouse_attend_one(q, (const uint16_t *)s->k + first, (const uint16_t *)s->v + first, 1,
                              w->sinks, c->Hq, c->Hkv, s->head_stride, s->lo, s->hi, D, c->scale,
                              out, c->nthreads, c->attend_simd);
}

/* Scratch of one step, in bf16 unless said: */
typedef struct {
    uint16_t *h, *q, *k, *v, *qr, *kr, *attn, *y, *logits, *weights;
    float *h32, *weights32;  /* rows for fp32 kernels; routing weights for moe_rows */
    int64_t *experts;
} scratch_t;

static int layer(const step_shape_t *c, const step_layer_t *w, const step_slot_t *slots,
                 const float *cos, const float *sin, uint16_t *x, scratch_t *b) {
    const int64_t M = c->M, H = c->H, QD = c->Hq * c->D, KD = c->Hkv * c->D;
    int rc = inhouse_rmsnorm(x, 1, M, H, w->attn_norm, c->eps, b->h);
    const int64_t O_qkv[3] = {QD, KD, KD};
    void *qkv[3] = {b->q, b->k, b->v};
    rc = rc ? rc : project(c, w, 0, 3, b->h, b->h32, H, O_qkv, qkv);
    rc = rc ? rc : inhouse_rotary(b->q, 1, cos, sin, M, c->Hq, c->D, b->qr);
    rc = rc ? rc : inhouse_rotary(b->k, 1, cos, sin, M, c->Hkv, c->D, b->kr);
    for (int64_t m = 0; m < M && !rc; m++)
        rc = attend_row(c, w, slots + m, b->qr + m * QD, b->kr + m * KD, b->v + m * KD,
                        b->attn + m * QD);
    void *o[1] = {b->y};
    rc = rc ? rc : project(c, w, 3, 1, b->attn, b->h32, QD, &H, o);
    if (rc) return rc;
    add_rows(x, b->y, M * H);
    rc = inhouse_rmsnorm(x, 1, M, H, w->mlp_norm, c->eps, b->h);
    const void *router_bias[1] = {w->router_bias};
    const uint16_t *router[1] = {w->router};
    void *logits[1] = {b->logits};
    int x_bf16;
    const void *hr = rows_for_bf16_weights(c, b->h, b->h32, H, &x_bf16);
    rc = rc ? rc : inhouse_bf16_matmul_many(hr, c->router_dtypes | Y_BF16 | x_bf16, M, 1, router,
                                            router_bias, &c->E, H, logits, c->nthreads,
                                            c->dense_level);
    rc = rc ? rc : inhouse_route(b->logits, 1, M, c->E, c->k, b->weights, b->experts);
    if (rc) return rc;
    for (int64_t i = 0; i < M * c->k; i++) b->weights32[i] = bf16_to_f32(b->weights[i]);
    rc = inhouse_moe_rows(b->h, 1, c->experts_a16, M, c->k, b->experts, b->weights32,
                          w->gu_blocks, w->gu_scales, w->gu_bias, w->dn_blocks, w->dn_scales,
                          w->dn_bias, H, c->I, c->alpha, c->limit, b->y, c->nthreads,
                          c->mxfp4_level);
    if (rc) return rc;
    add_rows(x, b->y, M * H);
    return 0;
}

/* x [M, H] bf16, the embedded rows, through all c->layers layers in place; slots [layers, M]; cos,
 * sin [M, D/2] fp32 at each row's position. Returns 0, -1 if memory ran out, or a kernel's code;
 * x is then not to be used. */
int inhouse_decode_step(const step_shape_t *c, const step_layer_t *layers,
                        const step_slot_t *slots, const float *cos, const float *sin, void *x) {
    const int64_t M = c->M, QD = c->Hq * c->D, KD = c->Hkv * c->D;
    const int64_t wide = c->H > QD ? c->H : QD;
    /* h, q, k, v, qr, kr, attn, y, logits, weights (bf16); h32, weights32 (fp32); experts */
    const size_t halves = (size_t)(M * (c->H + QD + KD + KD + QD + KD + QD + c->H + c->E + c->k));
    char *mem = (char *)malloc(halves * 2 + (size_t)(M * (wide + c->k)) * 4 +
                               (size_t)(M * c->k) * 8 + 64);
    if (!mem) return -1;
    scratch_t b;
    uint16_t *p = (uint16_t *)mem;
    b.h = p; p += M * c->H;
    b.q = p; p += M * QD;
    b.k = p; p += M * KD;
    b.v = p; p += M * KD;
    b.qr = p; p += M * QD;
    b.kr = p; p += M * KD;
    b.attn = p; p += M * QD;
    b.y = p; p += M * c->H;
    b.logits = p; p += M * c->E;
    b.weights = p; p += M * c->k;
    /* fp32 and int64 parts start 8-byte aligned */
    char *rest = (char *)(((uintptr_t)p + 7) & ~(uintptr_t)7);
    b.h32 = (float *)rest;
    b.weights32 = b.h32 + M * wide;
    b.experts = (int64_t *)(((uintptr_t)(b.weights32 + M * c->k) + 7) & ~(uintptr_t)7);
    int rc = 0;
    for (int64_t l = 0; l < c->layers && !rc; l++)
        rc = layer(c, layers + l, slots + l * M, cos, sin, (uint16_t *)x, &b);
    free(mem);
    return rc;
}
