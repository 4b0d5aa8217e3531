/* A decode step's decoder layers in one call: the fused path of engine/models/llama.py
 * (``forward_fused``) for a batch of decode tokens whose GEMMs all run in these kernels,
 * without going back to Python between the ~10 kernels of each layer.
 *
 * Each layer runs exactly the kernels the Python fused path calls, in the same order, on
 * the same inputs, so the result is bit-identical to it:
 *
 *   qkv = linear(h, Wqkv, bqkv); rope_qkv(qkv); kv_write(k, v -> cache);
 *   attn = paged_decode(q); o = linear(attn, Wo); add_rms_norm(x += o -> h, post);
 *   gu = linear(h, Wgu); act = silu_mul(gu); m = linear(act, Wdown);
 *   add_rms_norm(x += m -> h, next layer's input norm, or the final norm).
 *
 * `linear` is one of the small-batch products: the GEMV of small_linear.c / bf16_ops.c on
 * the plain weight [O, I], vnni_linear_bf16 / amx_linear_bf16 on its tile-layout copy
 * (amx_gemm.c), or fp32_tile_linear on its fp32 blocks (fp32_gemm.c). At batch 1 the
 * Python between kernels cost about as much as the elementwise work and attention
 * together (a quarter of the step).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1 };
enum { LINEAR_GEMV = 0, LINEAR_VNNI = 1, LINEAR_AMX = 2, LINEAR_FP32_TILE = 3 };

/* The pointers each layer takes, in this order, in the `layers` table. */
enum { P_IN_NORM, P_POST_NORM, P_QKV, P_QKV_BIAS, P_O, P_GATE_UP, P_DOWN, P_K_CACHE,
       P_V_CACHE, P_COUNT };

int decode_layer_pointers(void) { return P_COUNT; }

/* The kernels this driver strings together (the other .c files of this library). */
int add_rms_norm(float *, const float *, const float *, float *, int64_t, int64_t, float);
int add_rms_norm_bf16(bf16 *, const bf16 *, const bf16 *, bf16 *, int64_t, int64_t, float);
int rope_qkv(float *, const float *, const float *, const int64_t *, int64_t, int64_t,
             int64_t, int64_t);
int rope_qkv_bf16(bf16 *, const float *, const float *, const int64_t *, int64_t, int64_t,
                  int64_t, int64_t);
int silu_mul(const float *, float *, int64_t, int64_t);
int silu_mul_bf16(const bf16 *, bf16 *, int64_t, int64_t);
int small_linear(const float *, const float *, const float *, float *, int64_t, int64_t,
                 int64_t);
int small_linear_bf16(const bf16 *, const bf16 *, const bf16 *, bf16 *, int64_t, int64_t,
                      int64_t);
int fp32_tile_linear(const float *, const float *, const float *, float *, int64_t, int64_t,
                     int64_t);
int vnni_linear_bf16(const bf16 *, const bf16 *, const bf16 *, bf16 *, int64_t, int64_t,
                     int64_t);
int amx_linear_bf16(const bf16 *, const bf16 *, const bf16 *, bf16 *, int64_t, int64_t,
                    int64_t);
int kv_write(const char *, const char *, int64_t, char *, char *, const int64_t *, int64_t,
             int64_t, int64_t, int64_t, int64_t);
int paged_decode_attention(const float *, const float *, const float *, const int64_t *,
                           const int64_t *, float *, float *, int64_t, int64_t, int64_t,
                           int64_t, int64_t, int64_t, int64_t, int64_t, float);
int paged_decode_attention_bf16(const bf16 *, const bf16 *, const bf16 *, const int64_t *,
                                const int64_t *, bf16 *, float *, int64_t, int64_t, int64_t,
                                int64_t, int64_t, int64_t, int64_t, int64_t, float);

typedef struct {
    int bf; /* bf16 (else fp32) */
    int kind; /* LINEAR_* */
} step_kind;

static int linear(step_kind k, const void *x, const void *w, const void *b, void *y, int64_t T,
                  int64_t O, int64_t I) {
    if (!k.bf)
        return k.kind == LINEAR_FP32_TILE ? fp32_tile_linear(x, w, b, y, T, O, I)
                                          : small_linear(x, w, b, y, T, O, I);
    switch (k.kind) {
    case LINEAR_VNNI: return vnni_linear_bf16(x, w, b, y, T, O, I);
    case LINEAR_AMX: return amx_linear_bf16(x, w, b, y, T, O, I);
    default: return small_linear_bf16(x, w, b, y, T, O, I);
    }
}

static void norm(step_kind k, void *x, const void *r, const void *w, void *out, int64_t T,
                 int64_t D, float eps) {
    if (k.bf) add_rms_norm_bf16(x, r, w, out, T, D, eps);
    else add_rms_norm(x, r, w, out, T, D, eps);
}

/* x: [T, D], the residual stream (the embedded tokens on entry, updated in place); h: [T, D]
 * out, the final norm of the last layer's output; both of `dtype`.
 * layers: [L, P_COUNT] addresses (see P_*; P_QKV_BIAS may be 0); final_norm: [D].
 * cos, sin: [P, Dh] fp32 tables; positions, slots: [T]; tables: [T, W] block ids; lens: [T]
 * context lengths (max_len their largest); caches [Hkv, N, bs, Dh] of `dtype`.
 * Returns 0; -1 a shape the linear kernel does not take; -2 that kernel is not available
 * here; -3 out of memory; -4 a slot outside the cache (every layer writes the same slots,
 * so the first layer finds it, before any write to x or a cache). */
int decode_layers(int dtype, int linear_kind, void *x, void *h, const int64_t *layers,
                  int64_t L, const void *final_norm, int64_t T, int64_t D, int64_t H,
                  int64_t Hkv, int64_t Dh, int64_t I, float eps, const float *cos_t,
                  const float *sin_t, const int64_t *positions, const int64_t *slots,
                  const int64_t *tables, int64_t W, const int64_t *lens, int64_t max_len,
                  int64_t bs, int64_t N, float scale) {
    const step_kind k = {dtype == DTYPE_BF16, linear_kind};
    const size_t es = k.bf ? sizeof(bf16) : sizeof(float);
    const int64_t qs = H * Dh, kvs = Hkv * Dh, wqkv = qs + 2 * kvs;
    /* One allocation for the step: qkv rows, q (contiguous), attention out, o / down out,
     * gate_up, act (of dtype), then the attention's fp32 scratch (see scratch_size). */
    const size_t n_act = (size_t)T * (size_t)(wqkv + 2 * qs + D + 3 * I);
    const size_t n_scr = (size_t)T * (size_t)H * (size_t)(max_len + (k.bf ? Dh : 0));
    char *ws = malloc(n_act * es + n_scr * sizeof(float) + 64);
    if (!ws) return -3;
    char *qkv = ws, *q = qkv + T * wqkv * es, *att = q + T * qs * es, *mo = att + T * qs * es;
    char *gu = mo + T * D * es, *act = gu + T * 2 * I * es;
    float *scratch = (float *)(((uintptr_t)(act + T * I * es) + 63) & ~(uintptr_t)63);
    int err = 0;
    norm(k, x, NULL, (const void *)layers[P_IN_NORM], h, T, D, eps);
    for (int64_t l = 0; l < L && !err; l++) {
        const int64_t *p = layers + l * P_COUNT;
        const void *next = l + 1 < L ? (const void *)layers[(l + 1) * P_COUNT + P_IN_NORM]
                                     : final_norm;
        char *kc = (char *)p[P_K_CACHE], *vc = (char *)p[P_V_CACHE];
        if ((err = linear(k, h, (void *)p[P_QKV], (void *)p[P_QKV_BIAS], qkv, T, wqkv, D)))
            break;
        if (k.bf) rope_qkv_bf16((bf16 *)qkv, cos_t, sin_t, positions, T, wqkv, H + Hkv, Dh);
        else rope_qkv((float *)qkv, cos_t, sin_t, positions, T, wqkv, H + Hkv, Dh);
        if (kv_write(qkv + qs * es, qkv + (qs + kvs) * es, wqkv, kc, vc, slots, T, Hkv, Dh,
                     N * bs, (int64_t)es)) {
            err = -4;
            break;
        }
        for (int64_t t = 0; t < T; t++)
            memcpy(q + t * qs * es, qkv + t * wqkv * es, (size_t)qs * es);
        if (k.bf)
            paged_decode_attention_bf16((bf16 *)q, (bf16 *)kc, (bf16 *)vc, tables, lens,
                                        (bf16 *)att, scratch, T, H, Hkv, Dh, bs, N, W, max_len,
                                        scale);
        else
            paged_decode_attention((float *)q, (float *)kc, (float *)vc, tables, lens,
                                   (float *)att, scratch, T, H, Hkv, Dh, bs, N, W, max_len,
                                   scale);
        if ((err = linear(k, att, (void *)p[P_O], NULL, mo, T, D, qs))) break;
        norm(k, x, mo, (const void *)p[P_POST_NORM], h, T, D, eps);
        if ((err = linear(k, h, (void *)p[P_GATE_UP], NULL, gu, T, 2 * I, D))) break;
        if (k.bf) silu_mul_bf16((bf16 *)gu, (bf16 *)act, T, I);
        else silu_mul((float *)gu, (float *)act, T, I);
        if ((err = linear(k, act, (void *)p[P_DOWN], NULL, mo, T, D, I))) break;
        norm(k, x, mo, next, h, T, D, eps);
    }
    free(ws);
    return err;
}
