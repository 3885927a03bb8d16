/* What the native kernels share: the float kinds they read and write, and bfloat16 conversions. */
#ifndef KVB_H
#define KVB_H

#include <stdint.h>
#include <string.h>

enum { KIND_QUANT = 0, KIND_F32 = 1, KIND_BF16 = 2, KIND_F16 = 3 };

static inline float bf2f(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f2bf(float f) { /* round to nearest even, as torch does (NaN stays NaN) */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

#define KVB_MAX_THREADS 16

/* Run fn(arg, part, parts) for part = 0 .. parts-1 on the shared worker threads and the caller (pool.c); fewer
 * parts when fewer threads can be had, so fn must split its work by the `parts` it is given. Returns that count. */
int kvb_parallel(void (*fn)(void *arg, int part, int parts), void *arg, int parts);

/* decode attention over float KV blocks (qattn.c) */
int kvb_fattn_decode(const void *q, int q_kind, float scale, int n_kv, int g, int D, int kv_kind, const void *kf,
                     const void *vf, int64_t slots, int B, const int64_t *table, int64_t nblocks, int64_t held,
                     void *out, float *scores, int threads);

/* decode attention over quantized blocks plus a float residual window (qattn.c) */
int kvb_qattn_decode(const void *q, int q_kind, float scale, int n_kv, int g, int D, const uint8_t *kc,
                     const uint16_t *ks, const uint16_t *kz, const uint8_t *vc, const uint16_t *vs, const uint16_t *vz,
                     int64_t slots, int64_t num_blocks, int B, int G, int bits, const int64_t *table, int64_t nblocks,
                     const void *rk, const void *rv, int64_t rest, int64_t res_stride, int res_kind, void *out,
                     float *scores, int threads);

#endif
