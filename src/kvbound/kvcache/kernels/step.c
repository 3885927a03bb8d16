/* One single-token decode step through every layer of a Llama-family model, in one call.
 *
 * Eager PyTorch runs a decode step of the default model as ~3,000 small operators; for a 135M model each costs more
 * to dispatch than to compute, so the step took twice what its weight bytes take to read. Here a layer is one
 * pass: RMSNorm, the fused q/k/v matrix, RoPE, the new token's K/V written into its pool slot, attention over the
 * sequence's blocks (qattn.c), the output matrix and residual, RMSNorm, the fused gate/up matrix, SwiGLU, the down
 * matrix and residual. Values are rounded to bfloat16 where the eager path rounds them (after each operator), so
 * the two paths agree to accumulation order.
 *
 * Matrices are int4 in PyTorch's CPU packing (`_convert_weight_to_int4pack_for_cpu`, kvbound's Int4Linear): per
 * block of 64 output rows, for each input k, 32 bytes whose low nibbles are rows 0..31 and high nibbles rows 32..63;
 * per group of 32 inputs a bf16 (scale, zero) pair per row, w = (q - 8) * scale + zero. Activations and norms are
 * bfloat16; KV is fp32/bf16 blocks, or KIVI int8/int4 blocks with a fp32/bf16 residual window for the new token.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kvb.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef struct {
    const uint8_t *packed;  /* (padded / 64, k, 32) */
    const uint16_t *sz;     /* (k / 32, padded, 2) bf16 */
    const uint16_t *bias;   /* (n,) bf16 or NULL */
    int64_t n, k, padded;
} kvb_int4;

typedef struct {
    const uint16_t *in_norm, *post_norm; /* (hidden,) bf16 */
    kvb_int4 qkv, o, gate_up, down;
} kvb_layer;

enum { HEAD_NONE = 0, HEAD_INT8 = 1, HEAD_INT4 = 2 };

typedef struct {
    int n_layers, hidden, n_heads, n_kv, head_dim, inter;
    float eps;
    const kvb_layer *layers;
    const uint16_t *final_norm; /* (hidden,) bf16 */
    int head_kind;              /* the output matrix: int8 rows with a bf16 scale each, int4, or none (the caller's) */
    const int8_t *head_w;       /* int8: (vocab, hidden) */
    const uint16_t *head_scale; /* int8: (vocab,) bf16 */
    kvb_int4 head4;
    int64_t vocab;
    void *k_pool, *v_pool; /* float KV: (n_layers, n_kv, slots, head_dim) of kv_kind; quantized: the codes */
    int kv_kind, block;    /* kv_kind KIND_QUANT: KIVI int8/int4 blocks (qattn.c's layout) and a residual window */
    int64_t slots;
    const uint16_t *k_scale, *k_zero, *v_scale, *v_zero; /* quantized: fp16 (n_layers, n_kv, blocks or slots, .) */
    int bits, group;
    int64_t num_blocks;
    void *res_k, *res_v; /* quantized: (n_layers, n_kv, block, head_dim) of res_kind; the new token goes at `rest` */
    int res_kind;
    int64_t rest;
} kvb_model;

static inline float round_bf16(float f) { return bf2f(f2bf(f)); }

/* y[r] (r in the blocks' rows) = sum_k w[r, k] x[k], fp32; xsum[g] = sum of x over group g. */
static void int4_rows(const kvb_int4 *w, const float *restrict x, const float *restrict xsum, float *restrict y,
                      int64_t b0, int64_t b1) {
    const int64_t K = w->k, G = K / 32, N = w->padded;
    for (int64_t nb = b0; nb < b1; nb++) {
        const uint8_t *blk = w->packed + nb * K * 32;
#if defined(__AVX512F__)
        __m512 o[4];
        for (int i = 0; i < 4; i++) o[i] = _mm512_setzero_ps();
        const __m512i low = _mm512_set1_epi32(15);
        for (int64_t g = 0; g < G; g++) {
            __m512 a[4];
            for (int i = 0; i < 4; i++) a[i] = _mm512_setzero_ps();
            const uint8_t *row = blk + g * 32 * 32;
            for (int kk = 0; kk < 32; kk++) {
                const __m512 xk = _mm512_set1_ps(x[g * 32 + kk]);
                const __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + kk * 32)));
                const __m512i i1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + kk * 32 + 16)));
                a[0] = _mm512_fmadd_ps(xk, _mm512_cvtepi32_ps(_mm512_and_si512(i0, low)), a[0]);
                a[1] = _mm512_fmadd_ps(xk, _mm512_cvtepi32_ps(_mm512_and_si512(i1, low)), a[1]);
                a[2] = _mm512_fmadd_ps(xk, _mm512_cvtepi32_ps(_mm512_srli_epi32(i0, 4)), a[2]);
                a[3] = _mm512_fmadd_ps(xk, _mm512_cvtepi32_ps(_mm512_srli_epi32(i1, 4)), a[3]);
            }
            /* y += scale * (sum q x - 8 sum x) + zero * sum x; a (scale, zero) pair is one 32-bit lane */
            const __m512 sx = _mm512_set1_ps(xsum[g]), sx8 = _mm512_set1_ps(8.f * xsum[g]);
            const uint32_t *pairs = (const uint32_t *)(w->sz + (g * N + nb * 64) * 2);
            for (int i = 0; i < 4; i++) {
                const __m512i p = _mm512_loadu_si512((const void *)(pairs + 16 * i));
                const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(p, 16));
                const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(p, _mm512_set1_epi32((int)0xffff0000u)));
                o[i] = _mm512_fmadd_ps(scale, _mm512_sub_ps(a[i], sx8), o[i]);
                o[i] = _mm512_fmadd_ps(zero, sx, o[i]);
            }
        }
        float out[64];
        for (int i = 0; i < 4; i++) _mm512_storeu_ps(out + 16 * i, o[i]);
#else
        float out[64] = {0};
        for (int64_t g = 0; g < G; g++) {
            float a[64] = {0};
            for (int kk = 0; kk < 32; kk++) {
                const float xk = x[g * 32 + kk];
                const uint8_t *b = blk + (g * 32 + kk) * 32;
                for (int r = 0; r < 32; r++) {
                    a[r] += xk * (float)(b[r] & 15);
                    a[r + 32] += xk * (float)(b[r] >> 4);
                }
            }
            const uint16_t *sz = w->sz + (g * N + nb * 64) * 2;
            for (int r = 0; r < 64; r++)
                out[r] += bf2f(sz[2 * r]) * (a[r] - 8.f * xsum[g]) + bf2f(sz[2 * r + 1]) * xsum[g];
        }
#endif
        const int64_t first = nb * 64, last = first + 64 < w->n ? first + 64 : w->n;
        for (int64_t r = first; r < last; r++) y[r] = out[r - first];
    }
}

typedef struct {
    const kvb_int4 *w;
    const float *x, *xsum;
    float *y;
} gemv_job;

static void gemv_part(void *arg, int part, int parts) {
    const gemv_job *j = arg;
    const int64_t blocks = j->w->padded / 64;
    int4_rows(j->w, j->x, j->xsum, j->y, blocks * part / parts, blocks * (part + 1) / parts);
}

/* y = W x, the 64-row blocks split among `threads` threads (kvb_parallel) */
static void int4_gemv(const kvb_int4 *w, const float *x, const float *xsum, float *y, int threads) {
    gemv_job job = {w, x, xsum, y};
    const int64_t blocks = w->padded / 64;
    kvb_parallel(gemv_part, &job, blocks < 2 * (int64_t)threads ? 1 : threads);
}

/* y[r] = bf16(scale[r] * sum_k w[r, k] x[k]) for rows [r0, r1) of an int8 matrix (the int8 kernel's bf16 output) */
static void int8_rows(const int8_t *restrict w, const uint16_t *restrict scale, int64_t K, const float *restrict x,
                      float *restrict y, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *row = w + r * K;
        float s = 0.f;
        int64_t k = 0;
#if defined(__AVX512F__)
        __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
        for (; k + 32 <= K; k += 32) {
            a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + k)))),
                                _mm512_loadu_ps(x + k), a);
            b = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                    _mm_loadu_si128((const __m128i *)(row + k + 16)))), _mm512_loadu_ps(x + k + 16), b);
        }
        s = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
#endif
        for (; k < K; k++) s += (float)row[k] * x[k];
        y[r] = round_bf16(s * bf2f(scale[r]));
    }
}

typedef struct {
    const kvb_model *m;
    const float *x;
    float *y;
} head_job;

static void head_part(void *arg, int part, int parts) {
    const head_job *j = arg;
    const int64_t V = j->m->vocab;
    int8_rows(j->m->head_w, j->m->head_scale, j->m->hidden, j->x, j->y, V * part / parts, V * (part + 1) / parts);
}

/* out (bf16-rounded, as float) = W x + bias, with x already bf16-rounded */
static void matrix(const kvb_int4 *w, const float *x, float *xsum, float *out, int threads) {
    for (int64_t g = 0; g < w->k / 32; g++) {
        float s = 0.f;
        for (int i = 0; i < 32; i++) s += x[g * 32 + i];
        xsum[g] = s;
    }
    int4_gemv(w, x, xsum, out, threads);
    for (int64_t r = 0; r < w->n; r++) {
        out[r] = round_bf16(out[r]); /* the int4 kernel's bf16 output */
        if (w->bias) out[r] = round_bf16(out[r] + bf2f(w->bias[r]));
    }
}

static void rms_norm(const float *x, const uint16_t *weight, int n, float eps, float *out) {
    float ss = 0.f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float rstd = 1.f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = round_bf16(x[i] * rstd * bf2f(weight[i]));
}

/* rotate-half RoPE on `heads` heads of D, in bf16 steps as apply_rope does: x*cos + rotated*sin */
static void rope(float *x, int heads, int D, const float *cos, const float *sin) {
    const int half = D / 2;
    float tmp[256];
    for (int h = 0; h < heads; h++) {
        float *v = x + (int64_t)h * D;
        for (int d = 0; d < D; d++) {
            const float rotated = d < half ? -v[d + half] : v[d - half];
            tmp[d] = round_bf16(round_bf16(v[d] * cos[d]) + round_bf16(rotated * sin[d]));
        }
        memcpy(v, tmp, sizeof(float) * (size_t)D);
    }
}

/* x (hidden,) bf16: the token's embedding in, the last layer's output out. logits (vocab,) fp32 or NULL: the final
 * norm and the output matrix too (when the model has a head this step reads; the caller's otherwise). cos/sin (head_dim,) bf16 of the token's
 * position. slot: the new token's pool slot; table/nblocks/held: the sequence's blocks and tokens, the new one
 * included (quantized KV: the whole blocks, `held` counting the residual window too). scores (n_layers, n_kv, g,
 * held) fp32 or NULL: each layer's raw scaled attention logits. Returns 0, or
 * -1 when a size is past this kernel's buffers (the caller runs the eager step; nothing was written). */
int kvb_decode_step(const kvb_model *m, uint16_t *x, const uint16_t *cos16, const uint16_t *sin16, int64_t slot,
                    const int64_t *table, int64_t nblocks, int64_t held, float *scores, float *logits, int threads) {
    const int H = m->hidden, D = m->head_dim, nq = m->n_heads * D, nkv = m->n_kv * D, I = m->inter;
    const int quant = m->kv_kind == KIND_QUANT;
    if (D > 256 || D % 2 || m->n_heads % m->n_kv || m->n_heads / m->n_kv > 32 || m->block > 128 ||
        (!quant && m->kv_kind != KIND_F32 && m->kv_kind != KIND_BF16) || H % 32 || I % 32 || nq % 32 ||
        (quant && (m->rest + 1 >= m->block || (m->res_kind != KIND_F32 && m->res_kind != KIND_BF16))))
        return -1; /* past the attention kernel's tiles, a layout this step does not write, or a step that fills a
                    * quantized block (the eager step quantizes it) */
    const int64_t widest = nq + 2 * (int64_t)nkv > 2 * (int64_t)I ? nq + 2 * (int64_t)nkv : 2 * (int64_t)I;
    float *buf = malloc(sizeof(float) * (size_t)(3 * H + widest + nq + I + 2 * D + widest / 32 + 64));
    uint16_t *q16 = malloc(sizeof(uint16_t) * (size_t)(2 * nq));
    if (!buf || !q16) {
        free(buf);
        free(q16);
        return -1;
    }
    float *xf = buf, *h = xf + H, *t = h + H, *wide = t + H, *att = wide + widest, *act = att + nq,
          *cos = act + I, *sin = cos + D, *xsum = sin + D;
    uint16_t *out16 = q16 + nq;
    for (int i = 0; i < H; i++) xf[i] = bf2f(x[i]);
    for (int d = 0; d < D; d++) { cos[d] = bf2f(cos16[d]); sin[d] = bf2f(sin16[d]); }
    const int64_t elem = quant ? (m->res_kind == KIND_F32 ? 4 : 2) : m->kv_kind == KIND_F32 ? 4 : 2;
    const int64_t W = quant ? D * m->bits / 8 : 0, ngroups = quant ? D / m->group : 0;
    const int g = m->n_heads / m->n_kv;
    int rc = 0;
    for (int l = 0; l < m->n_layers && rc == 0; l++) {
        const kvb_layer *L = &m->layers[l];
        rms_norm(xf, L->in_norm, H, m->eps, h);
        matrix(&L->qkv, h, xsum, wide, threads);   /* q (n_heads*D) | k (n_kv*D) | v (n_kv*D) */
        rope(wide, m->n_heads + m->n_kv, D, cos, sin);
        for (int kv = 0; kv < m->n_kv; kv++) { /* the new token's K/V: its pool slot, or the residual window */
            const int64_t at = quant ? (((int64_t)l * m->n_kv + kv) * m->block + m->rest) * D * elem
                                     : (((int64_t)l * m->n_kv + kv) * m->slots + slot) * D * elem;
            uint8_t *kdst = (uint8_t *)(quant ? m->res_k : m->k_pool), *vdst = (uint8_t *)(quant ? m->res_v : m->v_pool);
            narrow(wide + nq + kv * D, quant ? m->res_kind : m->kv_kind, D, kdst + at);
            narrow(wide + nq + nkv + kv * D, quant ? m->res_kind : m->kv_kind, D, vdst + at);
        }
        for (int i = 0; i < nq; i++) q16[i] = f2bf(wide[i]);
        float *layer_scores = scores ? scores + (int64_t)l * m->n_kv * g * held : NULL;
        if (quant) {
            const int64_t codes = (int64_t)l * m->n_kv * m->slots * W, per_block = (int64_t)l * m->n_kv * m->num_blocks * D,
                          per_slot = (int64_t)l * m->n_kv * m->slots * ngroups,
                          res = (int64_t)l * m->n_kv * m->block * D * elem;
            rc = kvb_qattn_decode(q16, KIND_BF16, 1.f / sqrtf((float)D), m->n_kv, g, D,
                                  (const uint8_t *)m->k_pool + codes, m->k_scale + per_block, m->k_zero + per_block,
                                  (const uint8_t *)m->v_pool + codes, m->v_scale + per_slot, m->v_zero + per_slot,
                                  m->slots, m->num_blocks, m->block, m->group, m->bits, table, nblocks,
                                  (const uint8_t *)m->res_k + res, (const uint8_t *)m->res_v + res, m->rest + 1,
                                  m->block, m->res_kind, out16, layer_scores, threads);
        } else {
            const int64_t layer_at = (int64_t)l * m->n_kv * m->slots * D * elem;
            rc = kvb_fattn_decode(q16, KIND_BF16, 1.f / sqrtf((float)D), m->n_kv, g, D, m->kv_kind,
                                  (uint8_t *)m->k_pool + layer_at, (uint8_t *)m->v_pool + layer_at, m->slots, m->block,
                                  table, nblocks, held, out16, layer_scores, threads);
        }
        for (int i = 0; i < nq; i++) att[i] = bf2f(out16[i]);
        matrix(&L->o, att, xsum, t, threads);
        for (int i = 0; i < H; i++) xf[i] = round_bf16(xf[i] + t[i]);
        rms_norm(xf, L->post_norm, H, m->eps, h);
        matrix(&L->gate_up, h, xsum, wide, threads); /* gate (I) | up (I) */
        for (int i = 0; i < I; i++) {
            const float gate = wide[i], silu = round_bf16(gate / (1.f + expf(-gate)));
            act[i] = round_bf16(silu * wide[I + i]);
        }
        matrix(&L->down, act, xsum, t, threads);
        for (int i = 0; i < H; i++) xf[i] = round_bf16(xf[i] + t[i]);
    }
    if (rc == 0)
        for (int i = 0; i < H; i++) x[i] = f2bf(xf[i]);
    if (rc == 0 && logits && m->head_kind != HEAD_NONE) {
        rms_norm(xf, m->final_norm, H, m->eps, h);
        if (m->head_kind == HEAD_INT8) {
            head_job job = {m, h, logits};
            kvb_parallel(head_part, &job, threads);
        } else {
            matrix(&m->head4, h, xsum, logits, threads);
        }
    }
    free(buf);
    free(q16);
    return rc;
}
