/* Decode attention straight from quantized (KIVI int8/int4) paged KV: one query per query head, every held token.
 *
 * The eager path dequantizes a layer's whole cache into a float scratch on every step, then runs SDPA: three
 * passes over S x D floats for two reads of S x D bytes. Here each block of B tokens is dequantized into a tile
 * that stays in L1 and consumed at once with an online softmax (flash-decoding order), so the codes are read once.
 *
 * Layouts (one layer, as kvbound's BlockPool stores it; W = D * bits / 8 bytes a row):
 *   kc, vc      (n_kv, slots, W)       uint8 codes; int4 packs element 2i in the low nibble
 *   ks, kz      (n_kv, num_blocks, D)  fp16 key scale/zero, per channel over a block's tokens
 *   vs, vz      (n_kv, slots, D / G)   fp16 value scale/zero, per token and group of G channels
 *   table       (nblocks,)             the sequence's blocks in order
 *   rk, rv      (n_kv, rest, D)        fp32 residual window (the newest, partial block), after the blocks
 *   q           (n_kv, g, D)           fp32, already scaled by 1/sqrt(D); query heads grouped by KV head
 *   out         (n_kv, g, D)           fp32
 *   scores      (n_kv, g, nblocks * B + rest) or NULL: the raw scaled logits, in sequence order
 * Returns 0, or -1 when a dimension is past the tile sizes below (the caller falls back to the eager path).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_D 256
#define MAX_G 32
#define MAX_B 128

#ifdef __F16C__
#include <immintrin.h>
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

/* exp(x) for x <= 0 in a form the compiler vectorizes (libm's expf is a scalar call): 2^(x log2 e) split into an
 * integer power, set in the exponent bits, and 2^f for f in [-0.5, 0.5] by a degree-6 polynomial (rel. error ~2e-7).
 * Below -87 (and for -inf) it returns 0. */
static inline float exp_nonpos(float x) {
    x = x < -87.f ? -87.f : x;
    const float t = x * 1.44269504088896341f;
    const float n = __builtin_roundf(t);
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

static inline __attribute__((always_inline)) void unpack_row(const uint8_t *restrict c, int D, int bits, float *restrict dst) {
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

/* Online-softmax update of g query rows with a tile of n keys/values (fp32, row-major n x D). */
static inline __attribute__((always_inline)) void attend_tile(const float *restrict q, int g, int D, const float *restrict kt, const float *restrict vt,
                        int n, float *restrict m, float *restrict l, float *restrict acc, float *scores,
                        int64_t score_stride) {
    float p[MAX_B];
    for (int j = 0; j < g; j++) {
        const float *qj = q + (int64_t)j * D;
        float mx = -INFINITY;
        for (int t = 0; t < n; t++) {
            const float *kr = kt + (int64_t)t * D;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int d = 0; d < D; d++) s += qj[d] * kr[d];
            p[t] = s;
            if (s > mx) mx = s;
        }
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
        for (int t = 0; t < n; t++) {
            const float *vr = vt + (int64_t)t * D;
            float pt = p[t];
#pragma omp simd
            for (int d = 0; d < D; d++) a[d] += pt * vr[d];
        }
    }
}

static inline __attribute__((always_inline)) void decode(
        const float *q, int n_kv, int g, const int D, const uint8_t *kc, const uint16_t *ks, const uint16_t *kz,
        const uint8_t *vc, const uint16_t *vs, const uint16_t *vz, int64_t slots, int64_t num_blocks, int B,
        const int G, const int bits, const int64_t *table, int64_t nblocks, const float *rk, const float *rv,
        int64_t rest, float *out, float *scores) {
    const int W = D * bits / 8, ngroups = D / G;
    const int64_t S = nblocks * B + rest;
    float kt[MAX_B * MAX_D], vt[MAX_B * MAX_D], scale[MAX_D], zero[MAX_D];
    float m[MAX_G], l[MAX_G], acc[MAX_G * MAX_D];
    for (int h = 0; h < n_kv; h++) {
        const float *qh = q + (int64_t)h * g * D;
        for (int j = 0; j < g; j++) { m[j] = -INFINITY; l[j] = 0.f; }
        memset(acc, 0, sizeof(float) * (size_t)g * D);
        for (int64_t bi = 0; bi < nblocks; bi++) {
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
            attend_tile(qh, g, D, kt, vt, B, m, l, acc, scores ? scores + (int64_t)h * g * S + bi * B : NULL, S);
        }
        if (rest > 0)
            attend_tile(qh, g, D, rk + h * rest * D, rv + h * rest * D, (int)rest, m, l, acc,
                        scores ? scores + (int64_t)h * g * S + nblocks * B : NULL, S);
        float *oh = out + (int64_t)h * g * D;
        for (int j = 0; j < g; j++) {
            const float inv = l[j] > 0.f ? 1.f / l[j] : 0.f;
            for (int d = 0; d < D; d++) oh[j * D + d] = acc[j * D + d] * inv;
        }
    }
}

/* Specialized for the common head sizes, group and bit widths, so the inner loops have constant trip counts. */
int kvb_qattn_decode(const float *q, int n_kv, int g, int D, const uint8_t *kc, const uint16_t *ks,
                     const uint16_t *kz, const uint8_t *vc, const uint16_t *vs, const uint16_t *vz, int64_t slots,
                     int64_t num_blocks, int B, int G, int bits, const int64_t *table, int64_t nblocks,
                     const float *rk, const float *rv, int64_t rest, float *out, float *scores) {
    if (D > MAX_D || g > MAX_G || B > MAX_B || rest > MAX_B || G < 1 || D % G || (bits != 8 && bits != 4))
        return -1;
#define CALL(d, gr, b) decode(q, n_kv, g, d, kc, ks, kz, vc, vs, vz, slots, num_blocks, B, gr, b, table, nblocks, \
                              rk, rv, rest, out, scores)
    if (D == 64 && G == 32 && bits == 8) CALL(64, 32, 8);
    else if (D == 64 && G == 32 && bits == 4) CALL(64, 32, 4);
    else if (D == 128 && G == 32 && bits == 8) CALL(128, 32, 8);
    else if (D == 128 && G == 32 && bits == 4) CALL(128, 32, 4);
    else CALL(D, G, bits);
#undef CALL
    return 0;
}
