/* Paged decode attention on the CPU (AVX-512 or AVX2, simd.h): one query token per sequence
 * against its K/V read in place from the paged cache, no gather. float32 throughout. */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>

#include "pool.h"
#include "simd.h"

#define VCH 8  /* head chunks of VL floats accumulated together in p.V */

typedef struct {
    const float *q, *k_cache, *v_cache;
    const int64_t *block_tables, *context_lens;
    int64_t table_stride, B, H, Hkv, hd, block_size, padded;
    float scale, *out;
    _Atomic int failed;
} attention_job;

/* Tasks [lo, hi) of B * Hkv: one (sequence, KV head) each, with its group of query heads. */
static void attention_range(void *arg, int64_t lo, int64_t hi) {
    attention_job *j = arg;
    const float *q = j->q, *k_cache = j->k_cache, *v_cache = j->v_cache;
    const int64_t *block_tables = j->block_tables, *context_lens = j->context_lens;
    const int64_t table_stride = j->table_stride, H = j->H, Hkv = j->Hkv, hd = j->hd;
    const int64_t block_size = j->block_size, padded = j->padded;
    const int64_t G = H / Hkv, chunks = hd / VL, row = Hkv * hd;
    const float scale = j->scale;
    float *out = j->out;
    float *scores = lp_scratch(0, (size_t)(G * padded > 0 ? G * padded : 16) * sizeof(float));
    int64_t *at = lp_scratch(1, (size_t)(padded > 0 ? padded : 16) * sizeof(int64_t));  /* token t's K/V row */
    if (!scores || !at) {
        atomic_store(&j->failed, 1);
        return;
    }
    for (int64_t task = lo; task < hi; task++) {
        const int64_t b = task / Hkv, kvh = task % Hkv, L = context_lens[b];
        const int64_t *table = block_tables + b * table_stride;
        const float *qb = q + (b * H + kvh * G) * hd;   /* the group's G query heads */
        /* each token's offset once (a division per token, not one per token, chunk and head) */
        for (int64_t t = 0; t < L; t++) at[t] = (table[t / block_size] * block_size + t % block_size) * row + kvh * hd;
        /* q.k for 4 tokens at a time: 4 independent FMA chains, not one */
        for (int64_t g = 0; g < G; g++) {
            const float *qg = qb + g * hd;
            int64_t t = 0;
            for (; t + 4 <= L; t += 4) {
                const float *k0 = k_cache + at[t], *k1 = k_cache + at[t + 1];
                const float *k2 = k_cache + at[t + 2], *k3 = k_cache + at[t + 3];
                vf a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
                for (int64_t c = 0; c < chunks; c++) {
                    const vf qv = vload(qg + c * VL);
                    a0 = vfmadd(qv, vload(k0 + c * VL), a0);
                    a1 = vfmadd(qv, vload(k1 + c * VL), a1);
                    a2 = vfmadd(qv, vload(k2 + c * VL), a2);
                    a3 = vfmadd(qv, vload(k3 + c * VL), a3);
                }
                float *sg = scores + g * padded + t;
                sg[0] = vsum(a0) * scale;
                sg[1] = vsum(a1) * scale;
                sg[2] = vsum(a2) * scale;
                sg[3] = vsum(a3) * scale;
            }
            for (; t < L; t++) {
                const float *kp = k_cache + at[t];
                vf acc = vzero();
                for (int64_t c = 0; c < chunks; c++) acc = vfmadd(vload(qg + c * VL), vload(kp + c * VL), acc);
                scores[g * padded + t] = vsum(acc) * scale;
            }
        }
        float inv[64];
        for (int64_t g = 0; g < G; g++) {
            float *s = scores + g * padded;
            vf m = vset1(-INFINITY);
            for (int64_t t = 0; t < L; t += VL) m = vmax(m, vload_first(s + t, L - t, -INFINITY));
            const vf mx = vset1(vhmax(m));
            vf sum = vzero();
            for (int64_t t = 0; t < L; t += VL) {
                vf e = vkeep_first(vexp(vsub(vload_first(s + t, L - t, 0.0f), mx)), L - t);
                vstore_first(s + t, L - t, e);
                sum = vadd(sum, e);
            }
            inv[g] = 1.0f / vsum(sum);
        }
        /* p.V with tokens outermost: up to VCH chunks of the head accumulate side by
         * side (independent chains), each V row read once per head and tile */
        for (int64_t g = 0; g < G; g++) {
            const float *p = scores + g * padded;
            for (int64_t c0 = 0; c0 < chunks; c0 += VCH) {
                const int64_t nc = chunks - c0 < VCH ? chunks - c0 : VCH;
                vf acc[VCH];
                for (int64_t c = 0; c < VCH; c++) acc[c] = vzero();
                for (int64_t t = 0; t < L; t++) {
                    const float *vp = v_cache + at[t] + c0 * VL;
                    const vf pt = vset1(p[t]);
                    for (int64_t c = 0; c < nc; c++) acc[c] = vfmadd(pt, vload(vp + c * VL), acc[c]);
                }
                for (int64_t c = 0; c < nc; c++)
                    vstore(out + (b * H + kvh * G + g) * hd + (c0 + c) * VL, vmul(acc[c], vset1(inv[g])));
            }
        }
    }
}

/* One query token per sequence against its paged K/V, read in place (no gather):
 *   q (B, H, hd), k_cache / v_cache (num_blocks, block_size, Hkv, hd), block_tables (B, stride)
 *   int64, context_lens (B,) int64 -> out (B, H, hd); query head h reads KV head h / (H / Hkv).
 * Scores, softmax and the weighted sum of V are float32; exp is vexp above. hd must be a
 * multiple of 16 and H / Hkv at most 64; returns -1 otherwise or when a buffer cannot be
 * allocated. */
int paged_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                               const int64_t *block_tables, int64_t table_stride,
                               const int64_t *context_lens, int64_t B, int64_t H, int64_t Hkv,
                               int64_t hd, int64_t block_size, float scale, float *out, int threads) {
    if (hd % 16 != 0 || hd <= 0 || Hkv <= 0 || H % Hkv != 0 || H / Hkv > 64 || B < 0) return -1;
    int64_t max_len = 0;
    for (int64_t b = 0; b < B; b++) max_len = context_lens[b] > max_len ? context_lens[b] : max_len;
    const int64_t padded = (max_len + 15) / 16 * 16;
    attention_job job = {q, k_cache, v_cache, block_tables, context_lens, table_stride, B, H, Hkv, hd,
                         block_size, padded, scale, out, 0};
    lp_parallel(B * Hkv, lp_chunk(B * Hkv, threads), attention_range, &job, threads);
    return atomic_load(&job.failed) ? -1 : 0;
}
