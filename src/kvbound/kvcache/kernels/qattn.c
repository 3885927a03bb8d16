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
 *   threads     how many threads may share the blocks (long sequences only)
 * Returns 0, or -1 when a dimension is past the tile sizes below (the caller falls back to the eager path).
 */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

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

/* Online-softmax update of g query rows with a tile of n keys/values (fp32, row-major n x D). */
static inline __attribute__((always_inline)) void attend_tile(
        const float *restrict q, int g, int D, const float *restrict kt, const float *restrict vt, int n,
        float *restrict m, float *restrict l, float *restrict acc, float *scores, int64_t score_stride) {
    float p[MAX_B];
    for (int j = 0; j < g; j++) {
        const float *qj = q + (int64_t)j * D;
        float mx = -INFINITY;
        int t = 0;
        for (; t + 8 <= n; t += 8) dot8(qj, kt + (int64_t)t * D, D, p + t);
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
        for (int t = 0; t < n; t++) {
            const float *vr = vt + (int64_t)t * D;
            float pt = p[t];
#pragma omp simd
            for (int d = 0; d < D; d++) a[d] += pt * vr[d];
        }
    }
}

/* One share of the work: blocks [b0, b1) of the sequence (and the residual window when with_rest) for every head,
 * left as online-softmax state (m, l, unnormalized acc) per query row for the merge. */
struct share {
    const float *q;
    int n_kv, g, D, B, G, bits;
    const uint8_t *kc, *vc;
    const uint16_t *ks, *kz, *vs, *vz;
    int64_t slots, num_blocks, S, b0, b1, rest;
    const int64_t *table;
    const float *rk, *rv;
    int with_rest;
    float *m, *l, *acc, *scores; /* m, l: (n_kv * g); acc: (n_kv * g * D) */
    float *tiles;                /* 2 * B * D: one block's keys and values, dequantized (on the heap, not the stack:
                                  * the caller's thread may have a small one) */
};

static inline __attribute__((always_inline)) void run_share(const struct share *w, const int D, const int G,
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
        float *m = w->m + h * g, *l = w->l + h * g, *acc = w->acc + (int64_t)h * g * D;
        float *sc = w->scores ? w->scores + (int64_t)h * g * w->S : NULL;
        for (int j = 0; j < g; j++) { m[j] = -INFINITY; l[j] = 0.f; }
        memset(acc, 0, sizeof(float) * (size_t)g * D);
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
            attend_tile(qh, g, D, kt, vt, B, m, l, acc, sc ? sc + bi * B : NULL, w->S);
        }
        if (w->with_rest && w->rest > 0)
            attend_tile(qh, g, D, w->rk + h * w->rest * D, w->rv + h * w->rest * D, (int)w->rest, m, l, acc,
                        sc ? sc + (w->S - w->rest) : NULL, w->S);
    }
}

/* Specialized for the common head sizes, group and bit widths, so the inner loops have constant trip counts. */
static void *run(void *arg) {
    const struct share *w = arg;
    if (w->D == 64 && w->G == 32 && w->bits == 8) run_share(w, 64, 32, 8);
    else if (w->D == 64 && w->G == 32 && w->bits == 4) run_share(w, 64, 32, 4);
    else if (w->D == 128 && w->G == 32 && w->bits == 8) run_share(w, 128, 32, 8);
    else if (w->D == 128 && w->G == 32 && w->bits == 4) run_share(w, 128, 32, 4);
    else run_share(w, w->D, w->G, w->bits);
    return NULL;
}

/* threads > 1 splits the blocks among that many threads (each at least MIN_SHARE blocks; the calling thread takes
 * the first share and the residual window) and merges their softmax states. */
#define MAX_THREADS 16
#define MIN_SHARE 32

int kvb_qattn_decode(const float *q, int n_kv, int g, int D, const uint8_t *kc, const uint16_t *ks,
                     const uint16_t *kz, const uint8_t *vc, const uint16_t *vs, const uint16_t *vz, int64_t slots,
                     int64_t num_blocks, int B, int G, int bits, const int64_t *table, int64_t nblocks,
                     const float *rk, const float *rv, int64_t rest, float *out, float *scores, int threads) {
    if (D > MAX_D || g > MAX_G || B > MAX_B || rest > MAX_B || G < 1 || D % G || (bits != 8 && bits != 4))
        return -1;
    int n = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    if (nblocks / MIN_SHARE < n) n = nblocks / MIN_SHARE > 1 ? (int)(nblocks / MIN_SHARE) : 1;
    /* per share, 64-byte aligned: the two tiles first, then m, l and acc */
    const size_t rows = (size_t)n_kv * g, tiles = 2 * (size_t)B * D;
    const size_t each = (tiles + rows * (D + 2) + 15) / 16 * 16;
    float *state = aligned_alloc(64, sizeof(float) * (size_t)n * each);
    if (!state) return -1;
    struct share shares[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 0; i < n; i++) {
        float *base = state + (size_t)i * each;
        shares[i] = (struct share){q, n_kv, g, D, B, G, bits, kc, vc, ks, kz, vs, vz, slots, num_blocks,
                                   nblocks * B + rest, nblocks * i / n, nblocks * (i + 1) / n, rest, table, rk, rv,
                                   i == 0, base + tiles, base + tiles + rows, base + tiles + 2 * rows, scores, base};
        if (i > 0) started[i] = pthread_create(&tids[i], NULL, run, &shares[i]) == 0;
    }
    run(&shares[0]);
    for (int i = 1; i < n; i++) {
        if (started[i]) pthread_join(tids[i], NULL);
        else run(&shares[i]); /* no thread to be had: do its share here */
    }
    for (size_t r = 0; r < rows; r++) { /* merge: rescale each share to the common max */
        float mx = -INFINITY, lsum = 0.f;
        for (int i = 0; i < n; i++) if (shares[i].m[r] > mx) mx = shares[i].m[r];
        float *o = out + r * D;
        for (int d = 0; d < D; d++) o[d] = 0.f;
        for (int i = 0; i < n; i++) {
            if (shares[i].m[r] == -INFINITY) continue;
            const float c = exp_nonpos(shares[i].m[r] - mx), *a = shares[i].acc + r * D;
            lsum += shares[i].l[r] * c;
            for (int d = 0; d < D; d++) o[d] += a[d] * c;
        }
        const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
        for (int d = 0; d < D; d++) o[d] *= inv;
    }
    free(state);
    return 0;
}
