/* What the native kernels share: the float kinds they read and write, and bfloat16 conversions. */
#ifndef KVB_H
#define KVB_H

#include <stdint.h>
#include <string.h>

#if defined(__F16C__)
#include <immintrin.h>
#endif

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

#ifdef __F16C__
static inline uint16_t f2h(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
#else
static inline uint16_t f2h(float f) { /* round to nearest (even, but for subnormal results); overflow to inf */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    const uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    const uint32_t a = bits & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;
    if (a >= 0x477ff000u) return sign | 0x7c00u;
    if (a < 0x38800000u) { /* subnormal half: scale and round */
        float m;
        uint32_t ab = a;
        memcpy(&m, &ab, sizeof m);
        return sign | (uint16_t)(m * 16777216.f + 0.5f);
    }
    const uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - (112u << 23);
    return sign | (uint16_t)(r >> 13);
}
#endif

/* n fp32 values narrowed to kind `kind` */
static inline void narrow(const float *restrict src, int kind, int64_t n, void *dst) {
    if (kind == KIND_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    uint16_t *d = dst;
    for (int64_t i = 0; i < n; i++) d[i] = kind == KIND_BF16 ? f2bf(src[i]) : f2h(src[i]);
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
