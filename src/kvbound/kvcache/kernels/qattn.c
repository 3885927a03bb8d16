/* Decode attention straight from paged KV: one query per query head, every held token, blocks read in place
 * through the sequence's block table. Two storage families share one online-softmax core:
 *
 *   quantized (KIVI int8/int4): each block of B tokens is dequantized into a tile that stays in L1 and consumed at
 *     once, so the codes are read once (the eager path dequantized the whole layer into a scratch, then ran SDPA).
 *   float (fp32 / bf16 / fp16): fp32 blocks are read where they lie; bf16 keys are dotted in place against bf16
 *     queries (AVX512-BF16); other bf16/fp16 rows are widened into the L1 tile. No gather copy and no per-step
 *     upcast of the layer: every KV byte is read once per step.
 *
 * In both, the g query heads of a KV head attend to the same tile while it is in L1 (GQA: one read per KV head).
 *
 * Layouts (one layer, as kvbound's BlockPool stores it; W = D * bits / 8 bytes a row):
 *   kc, vc      (n_kv, slots, W)       uint8 codes; int4 packs element 2i in the low nibble
 *   ks, kz      (n_kv, num_blocks, D)  fp16 key scale/zero, per channel over a block's tokens
 *   vs, vz      (n_kv, slots, D / G)   fp16 value scale/zero, per token and group of G channels
 *   kf, vf      (n_kv, slots, D)       float rows (fp32, bf16 or fp16)
 *   table       (nblocks,)             the sequence's blocks in order
 *   held        tokens in those blocks (float: the last block may be partial; quantized: nblocks * B)
 *   rk, rv      (n_kv, rest, D)        residual window of kind res_kind (quantized only: the newest, partial
 *                                      block), its rows for head h starting at h * res_stride
 *   q           (n_kv, g, D)           query heads grouped by KV head, in the float kind q_kind
 *   out         (n_kv, g, D)           written in q_kind
 *   scores      (n_kv, g, held + rest) or NULL: the raw scaled logits, in sequence order
 *   threads     how many threads may share the blocks (long sequences only)
 * Returns 0, or -1 when a dimension is past the tile sizes below (the caller falls back to the eager path).
 */
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#include "kvb.h"

#define MAX_D 256
#define MAX_G 32
#define MAX_B 128

#if defined(__F16C__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#ifdef __F16C__
static inline float h2f(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float h2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: shift until the implicit bit appears */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400u));
            bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
#endif

/* n floats of kind `kind` (F32 / BF16 / F16) widened to fp32 */
static inline void widen(const void *src, int kind, int64_t n, float *restrict dst) {
    if (kind == KIND_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    const uint16_t *restrict s = src;
    int64_t i = 0;
#if defined(__AVX512F__)
    if (kind == KIND_BF16)
        for (; i + 16 <= n; i += 16) {
            const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(s + i)));
            _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
        }
#endif
#if defined(__AVX2__)
    if (kind == KIND_BF16)
        for (; i + 8 <= n; i += 8) {
            const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i)));
            _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
        }
#endif
#ifdef __F16C__
    if (kind == KIND_F16)
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
#endif
    if (kind == KIND_BF16)
        for (; i < n; i++) dst[i] = bf2f(s[i]);
    else
        for (; i < n; i++) dst[i] = h2f(s[i]);
}

/* exp(x) for x <= 0 in a form the compiler vectorizes (libm's expf is a scalar call): 2^(x log2 e) split into an
 * integer power, set in the exponent bits, and 2^f for f in [-0.5, 0.5] by a degree-6 polynomial (rel. error ~2e-7).
 * Below -87 (and for -inf) it returns 0. */
static inline float exp_nonpos(float x) {
    x = x < -87.f ? -87.f : x;
    const float t = x * 1.44269504088896341f;
    const float n = (t + 12582912.f) - 12582912.f; /* round to nearest by the 1.5 * 2^23 trick: vectorizes */
    const float f = t - n;
    float p = 1.53533179e-4f;
    p = p * f + 1.33989216e-3f;
    p = p * f + 9.61827491e-3f;
    p = p * f + 5.55041086e-2f;
    p = p * f + 2.40226507e-1f;
    p = p * f + 6.93147182e-1f;
    p = p * f + 1.0f;
    int32_t bits;
    memcpy(&bits, &p, sizeof bits);
    bits += (int32_t)n << 23;
    float r;
    memcpy(&r, &bits, sizeof r);
    return x <= -87.f ? 0.f : r;
}

static inline __attribute__((always_inline)) void unpack_row(const uint8_t *restrict c, int D, int bits,
                                                               float *restrict dst) {
    if (bits == 8) {
#pragma omp simd
        for (int d = 0; d < D; d++) dst[d] = (float)c[d];
    } else {
#pragma omp simd
        for (int i = 0; i < D / 2; i++) {
            dst[2 * i] = (float)(c[i] & 15);
            dst[2 * i + 1] = (float)(c[i] >> 4);
        }
    }
}

/* out[i] = q . k[i] for 8 rows of k (row-major, D apart). With AVX2 the 8 dot products are reduced together by a
 * tree of horizontal adds instead of one horizontal sum per row, which cost more than the products themselves. */
static inline __attribute__((always_inline)) void dot8(const float *restrict q, const float *restrict k, int D,
                                                       float *restrict out) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
    if (D % 16 == 0) { /* half the instructions of the AVX2 loop; the 512-bit sums fold into the same tree */
        __m512 a[8];
        for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
        for (int d = 0; d < D; d += 16) {
            const __m512 qv = _mm512_loadu_ps(q + d);
            for (int i = 0; i < 8; i++) a[i] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k + (int64_t)i * D + d), a[i]);
        }
        __m256 b[8];
        for (int i = 0; i < 8; i++) b[i] = _mm256_add_ps(_mm512_castps512_ps256(a[i]), _mm512_extractf32x8_ps(a[i], 1));
        const __m256 h0123 = _mm256_hadd_ps(_mm256_hadd_ps(b[0], b[1]), _mm256_hadd_ps(b[2], b[3]));
        const __m256 h4567 = _mm256_hadd_ps(_mm256_hadd_ps(b[4], b[5]), _mm256_hadd_ps(b[6], b[7]));
        _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                                            _mm256_permute2f128_ps(h0123, h4567, 0x31)));
        return;
    }
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (D % 8 == 0) {
        __m256 a[8];
        for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
        for (int d = 0; d < D; d += 8) {
            const __m256 qv = _mm256_loadu_ps(q + d);
            for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + (int64_t)i * D + d), a[i]);
        }
        const __m256 h0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        const __m256 h4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                                            _mm256_permute2f128_ps(h0123, h4567, 0x31)));
        return;
    }
#endif
    for (int i = 0; i < 8; i++) {
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int d = 0; d < D; d++) s += q[d] * k[(int64_t)i * D + d];
        out[i] = s;
    }
}

/* a[0:D] += sum_t p[t] * v[t, 0:D]. With AVX2 a 64-wide slice of the accumulator stays in 8 registers for the
 * whole tile instead of being loaded and stored once per token. */
static inline __attribute__((always_inline)) void accumulate(float *restrict a, const float *restrict p,
                                                             const float *restrict vt, int n, int D) {
#if defined(__AVX512F__)
    if (D % 64 == 0) {
        for (int d0 = 0; d0 < D; d0 += 64) {
            __m512 r[4];
            for (int i = 0; i < 4; i++) r[i] = _mm512_loadu_ps(a + d0 + 16 * i);
            for (int t = 0; t < n; t++) {
                const __m512 pt = _mm512_set1_ps(p[t]);
                const float *vr = vt + (int64_t)t * D + d0;
                for (int i = 0; i < 4; i++) r[i] = _mm512_fmadd_ps(pt, _mm512_loadu_ps(vr + 16 * i), r[i]);
            }
            for (int i = 0; i < 4; i++) _mm512_storeu_ps(a + d0 + 16 * i, r[i]);
        }
        return;
    }
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (D % 64 == 0) {
        for (int d0 = 0; d0 < D; d0 += 64) {
            __m256 r[8];
            for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(a + d0 + 8 * i);
            for (int t = 0; t < n; t++) {
                const __m256 pt = _mm256_set1_ps(p[t]);
                const float *vr = vt + (int64_t)t * D + d0;
                for (int i = 0; i < 8; i++) r[i] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(vr + 8 * i), r[i]);
            }
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(a + d0 + 8 * i, r[i]);
        }
        return;
    }
#endif
    for (int t = 0; t < n; t++) {
        const float *vr = vt + (int64_t)t * D;
        const float pt = p[t];
#pragma omp simd
        for (int d = 0; d < D; d++) a[d] += pt * vr[d];
    }
}

#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
#define HAVE_BF16_DOT 1
/* out[i] = scale * (q . k[i]) for 8 bf16 rows of k against a bf16 q (D % 32 == 0): the products of two bf16 values
 * are exact in fp32, so this equals widening both and multiplying in fp32, without the widening pass. */
static inline __attribute__((always_inline)) void dot8_bf16(const uint16_t *restrict q, const uint16_t *restrict k,
                                                            int D, float scale, float *restrict out) {
    __m512 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 32) {
        const __m512bh qv = (__m512bh)_mm512_loadu_si512((const void *)(q + d));
        for (int i = 0; i < 8; i++)
            a[i] = _mm512_dpbf16_ps(a[i], qv, (__m512bh)_mm512_loadu_si512((const void *)(k + (int64_t)i * D + d)));
    }
    __m256 b[8];
    for (int i = 0; i < 8; i++) b[i] = _mm256_add_ps(_mm512_castps512_ps256(a[i]), _mm512_extractf32x8_ps(a[i], 1));
    const __m256 h0123 = _mm256_hadd_ps(_mm256_hadd_ps(b[0], b[1]), _mm256_hadd_ps(b[2], b[3]));
    const __m256 h4567 = _mm256_hadd_ps(_mm256_hadd_ps(b[4], b[5]), _mm256_hadd_ps(b[6], b[7]));
    _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_set1_ps(scale),
                                        _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                                                      _mm256_permute2f128_ps(h0123, h4567, 0x31))));
}
#endif

/* Online-softmax update of g query rows with a tile of n keys/values (fp32, row-major n x D). With kb (bf16 keys
 * read in place) and q16 (the bf16 queries, unscaled), the logits come from bf16 dot products instead of kt. */
static inline __attribute__((always_inline)) void attend_tile(
        const float *restrict q, int g, int D, const float *restrict kt, const float *restrict vt, int n,
        float *restrict m, float *restrict l, float *restrict acc, float *scores, int64_t score_stride,
        const uint16_t *kb, const uint16_t *q16, float scale) {
    float p[MAX_B];
    for (int j = 0; j < g; j++) {
        const float *qj = q + (int64_t)j * D;
        float mx = -INFINITY;
        int t = 0;
        if (kb) {
            const uint16_t *q16j = q16 + (int64_t)j * D;
#ifdef HAVE_BF16_DOT
            for (; t + 8 <= n; t += 8) dot8_bf16(q16j, kb + (int64_t)t * D, D, scale, p + t);
#endif
            for (; t < n; t++) {
                float s = 0.f;
                for (int d = 0; d < D; d++) s += bf2f(q16j[d]) * bf2f(kb[(int64_t)t * D + d]);
                p[t] = s * scale;
            }
        } else {
            for (; t + 8 <= n; t += 8) dot8(qj, kt + (int64_t)t * D, D, p + t);
        }
        for (; t < n; t++) {
            const float *kr = kt + (int64_t)t * D;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int d = 0; d < D; d++) s += qj[d] * kr[d];
            p[t] = s;
        }
        for (t = 0; t < n; t++) mx = p[t] > mx ? p[t] : mx;
        if (scores) memcpy(scores + j * score_stride, p, (size_t)n * sizeof(float));
        float mnew = mx > m[j] ? mx : m[j];
        float corr = m[j] == -INFINITY ? 0.f : exp_nonpos(m[j] - mnew);
        float *a = acc + (int64_t)j * D;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int t = 0; t < n; t++) {
            p[t] = exp_nonpos(p[t] - mnew);
            sum += p[t];
        }
        l[j] = l[j] * corr + sum;
        m[j] = mnew;
#pragma omp simd
        for (int d = 0; d < D; d++) a[d] *= corr;
        accumulate(a, p, vt, n, D);
    }
}

/* One share of the work: blocks [b0, b1) of the sequence (and the residual window when with_rest) for every head,
 * left as online-softmax state (m, l, unnormalized acc) per query row for the merge. */
struct share {
    const float *q;          /* fp32, already scaled by the softmax scale */
    const uint16_t *q16;     /* the bf16 queries as given (unscaled), or NULL when q was not bf16 */
    float scale;
    int n_kv, g, D, B, G, bits, kind;
    const uint8_t *kc, *vc; /* quantized codes, or the float pool's rows (as bytes) */
    const uint16_t *ks, *kz, *vs, *vz;
    int64_t slots, num_blocks, S, held, b0, b1, rest, res_stride;
    const int64_t *table;
    const void *rk, *rv;
    int res_kind, with_rest, parts_total;
    float *m, *l, *acc, *scores; /* m, l: (n_kv * g); acc: (n_kv * g * D) */
    float *tiles;                /* 2 * B * D: one block's keys and values as fp32 (on the heap, not the stack:
                                  * the caller's thread may have a small one) */
};

static inline void start_head(const struct share *w, int h, float **m, float **l, float **acc, float **sc) {
    const int g = w->g, D = w->D;
    *m = w->m + h * g, *l = w->l + h * g, *acc = w->acc + (int64_t)h * g * D;
    *sc = w->scores ? w->scores + (int64_t)h * g * w->S : NULL;
    for (int j = 0; j < g; j++) { (*m)[j] = -INFINITY; (*l)[j] = 0.f; }
    memset(*acc, 0, sizeof(float) * (size_t)g * D);
}

/* the residual window (after the blocks, in sequence order), widened into the tiles */
static inline void attend_rest(const struct share *w, int h, const int D, float *m, float *l, float *acc, float *sc) {
    if (!w->with_rest || w->rest <= 0) return;
    const int64_t elem = w->res_kind == KIND_F32 ? 4 : 2, off = (int64_t)h * w->res_stride * D * elem;
    float *kt = w->tiles, *vt = w->tiles + (int64_t)w->B * D;
    widen((const uint8_t *)w->rk + off, w->res_kind, w->rest * D, kt);
    widen((const uint8_t *)w->rv + off, w->res_kind, w->rest * D, vt);
    attend_tile(w->q + (int64_t)h * w->g * D, w->g, D, kt, vt, (int)w->rest, m, l, acc, sc ? sc + w->held : NULL,
                w->S, NULL, NULL, 0.f);
}

static inline __attribute__((always_inline)) void run_quant(const struct share *w, const int D, const int G,
                                                              const int bits) {
    /* the share's fields as locals: stores into the tiles could otherwise alias *w and force reloads */
    const int W = D * bits / 8, ngroups = D / G, g = w->g, B = w->B;
    const uint8_t *restrict kc = w->kc, *restrict vc = w->vc;
    const uint16_t *restrict ks = w->ks, *restrict kz = w->kz, *restrict vs = w->vs, *restrict vz = w->vz;
    const int64_t *restrict table = w->table;
    const int64_t slots = w->slots, num_blocks = w->num_blocks;
    float *restrict kt = w->tiles, *restrict vt = w->tiles + (int64_t)B * D, scale[MAX_D], zero[MAX_D];
    for (int h = 0; h < w->n_kv; h++) {
        const float *qh = w->q + (int64_t)h * g * D;
        float *m, *l, *acc, *sc;
        start_head(w, h, &m, &l, &acc, &sc);
        for (int64_t bi = w->b0; bi < w->b1; bi++) {
            const int64_t blk = table[bi], row0 = h * slots + blk * B;
            const uint16_t *ksb = ks + (h * num_blocks + blk) * D, *kzb = kz + (h * num_blocks + blk) * D;
            for (int d = 0; d < D; d++) { scale[d] = h2f(ksb[d]); zero[d] = h2f(kzb[d]); }
            for (int t = 0; t < B; t++) {
                float *kr = kt + t * D, *vr = vt + t * D;
                unpack_row(kc + (row0 + t) * W, D, bits, kr);
#pragma omp simd
                for (int d = 0; d < D; d++) kr[d] = kr[d] * scale[d] + zero[d];
                unpack_row(vc + (row0 + t) * W, D, bits, vr);
                const uint16_t *vsr = vs + (row0 + t) * ngroups, *vzr = vz + (row0 + t) * ngroups;
                for (int gi = 0; gi < ngroups; gi++) {
                    const float s = h2f(vsr[gi]), z = h2f(vzr[gi]);
                    float *seg = vr + gi * G;
#pragma omp simd
                    for (int d = 0; d < G; d++) seg[d] = seg[d] * s + z;
                }
            }
            attend_tile(qh, g, D, kt, vt, B, m, l, acc, sc ? sc + bi * B : NULL, w->S, NULL, NULL, 0.f);
        }
        attend_rest(w, h, D, m, l, acc, sc);
    }
}

static inline __attribute__((always_inline)) void run_float(const struct share *w, const int D) {
    const int g = w->g, B = w->B, kind = w->kind;
    const int64_t elem = kind == KIND_F32 ? 4 : 2, slots = w->slots, held = w->held;
    const int64_t *restrict table = w->table;
    float *restrict kt = w->tiles, *restrict vt = w->tiles + (int64_t)B * D;
#ifdef HAVE_BF16_DOT
    const int bf16_keys = kind == KIND_BF16 && w->q16 != NULL && D % 32 == 0;
#else
    const int bf16_keys = 0;
#endif
    for (int h = 0; h < w->n_kv; h++) {
        const float *qh = w->q + (int64_t)h * g * D;
        float *m, *l, *acc, *sc;
        start_head(w, h, &m, &l, &acc, &sc);
        for (int64_t bi = w->b0; bi < w->b1; bi++) {
            const int64_t row0 = h * slots + table[bi] * B, left = held - bi * B;
            const int n = left < B ? (int)left : B;
            const uint8_t *kb = w->kc + row0 * D * elem, *vb = w->vc + row0 * D * elem;
            if (kind == KIND_F32) { /* fp32 blocks are read where they lie */
                attend_tile(qh, g, D, (const float *)kb, (const float *)vb, n, m, l, acc,
                            sc ? sc + bi * B : NULL, w->S, NULL, NULL, 0.f);
                continue;
            }
            widen(vb, kind, (int64_t)n * D, vt);
            if (bf16_keys) { /* bf16 keys are dotted where they lie */
                attend_tile(qh, g, D, NULL, vt, n, m, l, acc, sc ? sc + bi * B : NULL, w->S, (const uint16_t *)kb,
                            w->q16 + (int64_t)h * g * D, w->scale);
                continue;
            }
            widen(kb, kind, (int64_t)n * D, kt);
            attend_tile(qh, g, D, kt, vt, n, m, l, acc, sc ? sc + bi * B : NULL, w->S, NULL, NULL, 0.f);
        }
        attend_rest(w, h, D, m, l, acc, sc);
    }
}

/* Specialized for the common head sizes, group and bit widths, so the inner loops have constant trip counts. */
static void run(const struct share *w) {
    if (w->kind != KIND_QUANT) {
        if (w->D == 64) run_float(w, 64);
        else if (w->D == 128) run_float(w, 128);
        else run_float(w, w->D);
    } else if (w->D == 64 && w->G == 32 && w->bits == 8) run_quant(w, 64, 32, 8);
    else if (w->D == 64 && w->G == 32 && w->bits == 4) run_quant(w, 64, 32, 4);
    else if (w->D == 128 && w->G == 32 && w->bits == 8) run_quant(w, 128, 32, 8);
    else if (w->D == 128 && w->G == 32 && w->bits == 4) run_quant(w, 128, 32, 4);
    else run_quant(w, w->D, w->G, w->bits);
}

/* threads > 1 splits the blocks among that many threads (each at least MIN_SHARE blocks; the first share takes the
 * residual window) and merges their softmax states. */
#define MAX_THREADS KVB_MAX_THREADS
#define MIN_SHARE 32

static void run_shares(void *arg, int part, int parts) {
    struct share *shares = arg;
    const int n = shares[0].parts_total;
    for (int i = part; i < n; i += parts) run(&shares[i]);
}

static int launch(struct share proto, const void *q, int q_kind, float scale, int64_t nblocks, void *out,
                  float *scores, int threads) {
    const int n_kv = proto.n_kv, g = proto.g, D = proto.D, B = proto.B;
    if (D > MAX_D || g > MAX_G || B > MAX_B || proto.rest > MAX_B || n_kv < 1 || g < 1 || D < 1 || B < 1)
        return -1;
    if (q_kind != KIND_F32 && q_kind != KIND_BF16 && q_kind != KIND_F16) return -1;
    int n = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    if (nblocks / MIN_SHARE < n) n = nblocks / MIN_SHARE > 1 ? (int)(nblocks / MIN_SHARE) : 1;
    /* per share, 64-byte aligned: the two tiles first, then m, l and acc; after the shares, the scaled fp32 q */
    const size_t rows = (size_t)n_kv * g, tiles = 2 * (size_t)B * D;
    const size_t each = (tiles + rows * (D + 2) + 15) / 16 * 16;
    float *state = aligned_alloc(64, sizeof(float) * ((size_t)n * each + (rows * D + 15) / 16 * 16));
    if (!state) return -1;
    float *qs = state + (size_t)n * each;
    widen(q, q_kind, (int64_t)rows * D, qs);
    for (size_t i = 0; i < rows * D; i++) qs[i] *= scale;
    proto.q = qs;
    proto.q16 = q_kind == KIND_BF16 ? q : NULL;
    proto.scale = scale;
    proto.S = proto.held + proto.rest;
    proto.scores = scores;
    struct share shares[MAX_THREADS];
    for (int i = 0; i < n; i++) {
        float *base = state + (size_t)i * each;
        shares[i] = proto;
        shares[i].b0 = nblocks * i / n;
        shares[i].b1 = nblocks * (i + 1) / n;
        shares[i].with_rest = i == 0;
        shares[i].tiles = base;
        shares[i].m = base + tiles;
        shares[i].l = base + tiles + rows;
        shares[i].acc = base + tiles + 2 * rows;
        shares[i].parts_total = n;
    }
    kvb_parallel(run_shares, shares, n);
    float o[MAX_D];
    const int64_t out_elem = q_kind == KIND_F32 ? 4 : 2;
    for (size_t r = 0; r < rows; r++) { /* merge: rescale each share to the common max */
        float mx = -INFINITY, lsum = 0.f;
        for (int i = 0; i < n; i++) if (shares[i].m[r] > mx) mx = shares[i].m[r];
        for (int d = 0; d < D; d++) o[d] = 0.f;
        for (int i = 0; i < n; i++) {
            if (shares[i].m[r] == -INFINITY) continue;
            const float c = exp_nonpos(shares[i].m[r] - mx), *a = shares[i].acc + r * D;
            lsum += shares[i].l[r] * c;
            for (int d = 0; d < D; d++) o[d] += a[d] * c;
        }
        const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
        for (int d = 0; d < D; d++) o[d] *= inv;
        narrow(o, q_kind, D, (uint8_t *)out + r * D * out_elem);
    }
    free(state);
    return 0;
}

/* Quantized (int8/int4) blocks plus a residual window of kind res_kind whose rows for head h start at
 * h * res_stride rows. */
int kvb_qattn_decode(const void *q, int q_kind, float scale, int n_kv, int g, int D, const uint8_t *kc,
                     const uint16_t *ks, const uint16_t *kz, const uint8_t *vc, const uint16_t *vs, const uint16_t *vz,
                     int64_t slots, int64_t num_blocks, int B, int G, int bits, const int64_t *table, int64_t nblocks,
                     const void *rk, const void *rv, int64_t rest, int64_t res_stride, int res_kind, void *out,
                     float *scores, int threads) {
    if (G < 1 || D % G || (bits != 8 && bits != 4) || rest > res_stride ||
        (res_kind != KIND_F32 && res_kind != KIND_BF16 && res_kind != KIND_F16))
        return -1;
    struct share w = {0};
    w.n_kv = n_kv, w.g = g, w.D = D, w.B = B, w.G = G, w.bits = bits, w.kind = KIND_QUANT;
    w.kc = kc, w.vc = vc, w.ks = ks, w.kz = kz, w.vs = vs, w.vz = vz;
    w.slots = slots, w.num_blocks = num_blocks, w.held = nblocks * B, w.rest = rest, w.res_stride = res_stride;
    w.table = table, w.rk = rk, w.rv = rv, w.res_kind = res_kind;
    return launch(w, q, q_kind, scale, nblocks, out, scores, threads);
}

/* Float (fp32/bf16/fp16, kv_kind) blocks holding `held` tokens: the last block may be partial. */
int kvb_fattn_decode(const void *q, int q_kind, float scale, int n_kv, int g, int D, int kv_kind, const void *kf,
                     const void *vf, int64_t slots, int B, const int64_t *table, int64_t nblocks, int64_t held,
                     void *out, float *scores, int threads) {
    if ((kv_kind != KIND_F32 && kv_kind != KIND_BF16 && kv_kind != KIND_F16) || held > nblocks * B ||
        held <= (nblocks - 1) * B)
        return -1;
    struct share w = {0};
    w.n_kv = n_kv, w.g = g, w.D = D, w.B = B, w.G = 1, w.bits = 0, w.kind = kv_kind;
    w.kc = kf, w.vc = vf, w.slots = slots, w.held = held, w.rest = 0, w.res_kind = KIND_F32;
    w.table = table;
    return launch(w, q, q_kind, scale, nblocks, out, scores, threads);
}
