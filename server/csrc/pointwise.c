/* The row-wise and point-wise ops between a decoder layer's matmuls, on the CPU (AVX-512 or
 * AVX2, simd.h), float32: RMSNorm, rotary on q and k with the K/V cache write, SiLU(gate) *
 * up, and the greedy argmax of logit rows.
 *
 * Each replaces a chain of small torch ops (RMSNorm is eight, rotary and the cache write
 * fourteen per layer), which at decode sizes cost their dispatch, not their arithmetic. Each
 * computes what the torch reference computes, operation by operation and with the same
 * roundings (the library is built with -ffp-contract=off, so a multiply and an add are never
 * fused into one rounding): rotary and the cache write are bit-exact; RMSNorm differs only in
 * the order of its sum of squares; SiLU in exp (simd.h's vexp against torch's, both within
 * about an ulp).
 *
 * Lengths need not be multiples of VL: the tails run scalar. Rows go to the pool's threads
 * in chunks of at least MIN_ROWS (a smaller call runs on the caller alone).
 */
#include <math.h>
#include <stdint.h>

#include "pool.h"
#include "simd.h"

#define MIN_ROWS 8

static int64_t row_chunk(int64_t rows, int threads) {
    const int64_t c = lp_chunk(rows, threads);
    return c < MIN_ROWS ? MIN_ROWS : c;
}

/* ---- RMSNorm -------------------------------------------------------------------------- */

typedef struct {
    const float *x, *weight;
    int64_t H, xs;
    float eps, *out;
} norm_job;

/* out[t] = weight * (x[t] * (1 / sqrt(mean(x[t]^2) + eps))): transformers' LlamaRMSNorm in
 * float32 (h * rsqrt(...), then weight * h: two roundings, in that order). */
static void norm_range(void *arg, int64_t lo, int64_t hi) {
    const norm_job *j = arg;
    const int64_t H = j->H, body = H / VL * VL;
    for (int64_t t = lo; t < hi; t++) {
        const float *x = j->x + t * j->xs;
        float *o = j->out + t * H;
        vf a0 = vzero(), a1 = vzero();
        int64_t i = 0;
        for (; i + 2 * VL <= body; i += 2 * VL) {
            const vf u = vload(x + i), w = vload(x + i + VL);
            a0 = vadd(a0, vmul(u, u));
            a1 = vadd(a1, vmul(w, w));
        }
        for (; i < body; i += VL) a0 = vadd(a0, vmul(vload(x + i), vload(x + i)));
        float ss = vsum(vadd(a0, a1));
        for (i = body; i < H; i++) ss += x[i] * x[i];
        const float r = 1.0f / sqrtf(ss / (float)H + j->eps);
        const vf rv = vset1(r);
        for (i = 0; i < body; i += VL) vstore(o + i, vmul(vload(j->weight + i), vmul(vload(x + i), rv)));
        for (; i < H; i++) o[i] = j->weight[i] * (x[i] * r);
    }
}

/* x (T, H) with row stride xs -> out (T, H) contiguous. Returns 0, or -1 on a bad shape. */
int rms_norm_f32(const float *x, int64_t T, int64_t H, int64_t xs, const float *weight, float eps, float *out,
                 int threads) {
    if (T < 0 || H <= 0 || xs < H) return -1;
    norm_job job = {x, weight, H, xs, eps, out};
    lp_parallel(T, row_chunk(T, threads), norm_range, &job, threads);
    return 0;
}

/* ---- rotary + K/V cache write --------------------------------------------------------- */

typedef struct {
    const float *q, *k, *v, *cos, *sin;
    const int64_t *slots;
    int64_t qs, ks, vs, H, Hkv, hd;
    float *k_cache, *v_cache, *q_out, *k_out;
} rope_job;

/* One head of hd values: transformers' rotate-half rotary, x * cos + rotate_half(x) * sin with
 * rotate_half(x) = (-x[half:], x[:half]); two products and a sum, each rounded. */
static inline void rope_head(const float *x, const float *c, const float *s, int64_t hd, float *out) {
    const int64_t half = hd / 2, body = half / VL * VL;
    int64_t i = 0;
    for (; i < body; i += VL) {
        const vf lo = vload(x + i), hi = vload(x + half + i);
        vstore(out + i, vadd(vmul(lo, vload(c + i)), vmul(vneg(hi), vload(s + i))));
        vstore(out + half + i, vadd(vmul(hi, vload(c + half + i)), vmul(lo, vload(s + half + i))));
    }
    for (; i < half; i++) {
        out[i] = x[i] * c[i] + (-x[half + i]) * s[i];
        out[half + i] = x[half + i] * c[half + i] + x[i] * s[half + i];
    }
}

static void copy_floats(const float *src, int64_t n, float *dst) {
    int64_t i = 0;
    for (; i + VL <= n; i += VL) vstore(dst + i, vload(src + i));
    for (; i < n; i++) dst[i] = src[i];
}

static void rope_range(void *arg, int64_t lo, int64_t hi) {
    const rope_job *j = arg;
    const int64_t hd = j->hd, kv = j->Hkv * hd;
    for (int64_t t = lo; t < hi; t++) {
        const float *c = j->cos + t * hd, *s = j->sin + t * hd;
        for (int64_t h = 0; h < j->H; h++) rope_head(j->q + t * j->qs + h * hd, c, s, hd, j->q_out + (t * j->H + h) * hd);
        float *kr = j->k_out + t * kv;
        for (int64_t h = 0; h < j->Hkv; h++) rope_head(j->k + t * j->ks + h * hd, c, s, hd, kr + h * hd);
        const int64_t slot = j->slots[t];
        copy_floats(kr, kv, j->k_cache + slot * kv);
        copy_floats(j->v + t * j->vs, kv, j->v_cache + slot * kv);
    }
}

/* Rotary on q (T, H*hd) and k (T, Hkv*hd) (row strides qs, ks; cos / sin (T, hd) contiguous)
 * into q_out (T, H, hd) and k_out (T, Hkv, hd); then k_out and v (T, Hkv*hd, row stride vs)
 * written to row slots[t] of the caches (cache_rows rows of Hkv*hd floats). Returns 0, or -1
 * on a bad shape or a slot outside the caches (checked before anything is written). */
int rope_cache_f32(const float *q, int64_t qs, const float *k, int64_t ks, const float *v, int64_t vs, int64_t T,
                   int64_t H, int64_t Hkv, int64_t hd, const float *cos, const float *sin, const int64_t *slots,
                   float *k_cache, float *v_cache, int64_t cache_rows, float *q_out, float *k_out, int threads) {
    if (T < 0 || H <= 0 || Hkv <= 0 || hd <= 0 || hd % 2 || qs < H * hd || ks < Hkv * hd || vs < Hkv * hd) return -1;
    for (int64_t t = 0; t < T; t++)
        if (slots[t] < 0 || slots[t] >= cache_rows) return -1;
    rope_job job = {q, k, v, cos, sin, slots, qs, ks, vs, H, Hkv, hd, k_cache, v_cache, q_out, k_out};
    lp_parallel(T, row_chunk(T, threads), rope_range, &job, threads);
    return 0;
}

/* ---- SiLU(gate) * up ------------------------------------------------------------------ */

typedef struct {
    const float *g, *u;
    int64_t I, gs, us;
    float *out;
} silu_job;

/* silu(g) * u with silu(g) = g / (1 + exp(-g)), as torch computes it. */
static void silu_range(void *arg, int64_t lo, int64_t hi) {
    const silu_job *j = arg;
    const int64_t I = j->I, body = I / VL * VL;
    const vf one = vset1(1.0f);
    for (int64_t t = lo; t < hi; t++) {
        const float *g = j->g + t * j->gs, *u = j->u + t * j->us;
        float *o = j->out + t * I;
        int64_t i = 0;
        for (; i < body; i += VL) {
            const vf gv = vload(g + i);
            vstore(o + i, vmul(vdiv(gv, vadd(one, vexp(vneg(gv)))), vload(u + i)));
        }
        for (; i < I; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* gate, up (T, I) with row strides gs, us -> out (T, I) contiguous. Returns 0, or -1. */
int silu_mul_f32(const float *g, int64_t gs, const float *u, int64_t us, int64_t T, int64_t I, float *out,
                 int threads) {
    if (T < 0 || I <= 0 || gs < I || us < I) return -1;
    silu_job job = {g, u, I, gs, us, out};
    lp_parallel(T, row_chunk(T, threads), silu_range, &job, threads);
    return 0;
}

/* ---- argmax --------------------------------------------------------------------------- */

/* The index of the first maximum of each row of x (T, V) (row stride xs), as torch's
 * max(dim=-1).indices: a NaN counts as the maximum, the first NaN winning. */
int argmax_rows_f32(const float *x, int64_t T, int64_t V, int64_t xs, int64_t *out) {
    if (T < 0 || V <= 0 || xs < V) return -1;
    for (int64_t t = 0; t < T; t++) {
        const float *r = x + t * xs;
        vf m = vset1(-INFINITY);
        int64_t i = 0, nan_at = -1;
        for (; i + VL <= V; i += VL) {
            const vf v = vload(r + i);
            if (vany_nan(v)) {
                nan_at = i;
                break;
            }
            m = vmax(m, v);
        }
        float best = vhmax(m);
        for (int64_t k = nan_at >= 0 ? nan_at : i; k < V; k++) {
            if (isnan(r[k])) {
                nan_at = k;
                break;
            }
            best = r[k] > best ? r[k] : best;
        }
        if (nan_at >= 0) {  /* the scalar loop stopped at the row's first NaN */
            out[t] = nan_at;
            continue;
        }
        int64_t at = 0;
        while (r[at] != best) at++;
        out[t] = at;
    }
    return 0;
}
