/* The int8 attention for AVX-512 CPUs with VNNI, with or without BF16 (no AMX needed); the feed-forward's
 * GELU + int8 quantization is cpu_gelu_quant.c. cpu_isa.py builds this file once per variant:
 *   avx512_bf16: -mavx512bf16, p v as bf16 dot products (vdpbf16ps);
 *   avx512_vnni: without it, p v as fp32 FMAs on the same bf16 v (p kept in fp32: a little more exact).
 * cpu_attention_amx.c is the AMX build (its own layouts), cpu_attention_avx2.c the 8-lane port (avx_vnni,
 * avx2); cpu_attention.h holds the driver all three share, cpu_avx512.h the AVX-512 helpers.
 *
 * softmax(q k^T / sqrt(64)) v for head dimension 64 (16 and 32 too, for small test models), in the manner
 * of SageAttention (Zhang et al., 2024) and flash attention:
 *
 *   - k is smoothed (its mean over the tokens of the head is subtracted; softmax is unchanged, since
 *     q . mean(k) is the same for every key of a query row), then q and k are quantized to int8 per
 *     token (symmetric, amax / 127);
 *   - q k^T runs as int8 dot products with int32 sums (vpdpbusd; k stored as unsigned k + 128 and the
 *     128 * sum(q) it adds subtracted again), dequantized to fp32 and put in base 2 (log2 e folded in);
 *   - an online softmax per block of 64 keys in fp32, 2^x by a cubic on the fraction and vscalefps;
 *   - p v with v rounded to bf16 and fp32 sums: p rounded to bf16 too and vdpbf16ps (avx512_bf16), or
 *     p in fp32 and FMAs on v widened from bf16 (avx512_vnni); one division by the row sum at the end.
 *
 * One call does every (batch, head): first each head's q, k, v are quantized and packed (k in groups of
 * 16 keys, 4 bytes of each key per 32-bit lane; v as bf16 pairs of consecutive keys), then tiles of 32
 * query rows run against all keys, 4 rows at a time. Threads: OpenMP (the runtime torch already loaded).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_attention.h"
#include "cpu_avx512.h"

#define KB 64       /* keys per block */
#define QT 32       /* query rows per tile (one task) */
#define RG 4        /* query rows per micro-kernel */

/* Quantize and pack one head (q, k, v: rows of hd values, struct src). */
INLINE void pack_head(const int hd, int S, int Sq, int Sk, const struct src *q, const struct src *k,
                      const struct src *v, float qscale, int8_t *q8, float *qc, int32_t *qcorr, uint8_t *kp,
                      float *ksc, uint16_t *vp, const struct prep *pr) {
    /* q: per-token int8, c_i = amax_i / 127 * qscale, correction 128 * sum(q8_i) */
    for (int i = 0; i < Sq; i++) {
        int8_t *dst = q8 + (long)i * hd;
        if (i >= S) { memset(dst, 0, hd); qc[i] = 0.f; qcorr[i] = 0; continue; }
        int32_t sum;
        qc[i] = query_int8(hd, q, pr, i, dst, &sum) * qscale;
        qcorr[i] = 128 * sum;
    }
    /* k: subtract the mean over tokens, per-token int8, stored as k + 128 in groups of 16 keys:
     * kp[group][d / 4][key % 16][d % 4] */
    __m512 mean[HD_MAX / 16];
    key_mean(hd, S, k, pr, mean);
    memset(kp + (long)(S / 16) * 16 * hd, 128, (long)(Sk - S / 16 * 16) * hd);
    for (int j = 0; j < S; j++) {
        int8_t k8[HD_MAX];
        ksc[j] = key_int8(hd, k, pr, j, mean, k8);
        uint32_t *grp = (uint32_t *)(kp + (long)(j / 16) * 16 * hd);
        for (int c = 0; c < hd / 4; c++) {
            uint32_t w;
            memcpy(&w, k8 + 4 * c, 4);
            grp[c * 16 + j % 16] = w ^ 0x80808080u;
        }
    }
    for (int j = S; j < Sk; j++) ksc[j] = 0.f;
    /* v: bf16 pairs of consecutive keys, vp[pair][d] = (v[2p][d], v[2p+1][d]) */
    for (int p = 0; p < Sk / 2; p++) {
        uint32_t *dst = (uint32_t *)(vp + (long)p * 2 * hd);
        int j = 2 * p;
        float va_[HD_MAX], vb_[HD_MAX];
        const float *ra = j < S ? load_row(v, hd, j, va_) : 0, *rb = j + 1 < S ? load_row(v, hd, j + 1, vb_) : 0;
        for (int c = 0; c < hd; c += 16) {
            __m512 a = ra ? _mm512_loadu_ps(ra + c) : _mm512_setzero_ps();
            __m512 b = rb ? _mm512_loadu_ps(rb + c) : _mm512_setzero_ps();
            _mm512_storeu_si512(dst + c, bf16_pair(a, b));
        }
    }
}

/* One tile: rows [r0, r0 + QT) of one head against its S keys; writes rows < S of out (row stride os). */
INLINE void attend_tile(const int hd, int S, int Sk, int r0, const int8_t *q8, const float *qc, const int32_t *qcorr,
                        const uint8_t *kp, const float *ksc, const uint16_t *vp, float *out, long os) {
    float o[QT][HD_MAX] __attribute__((aligned(64)));
    float mrow[QT], lrow[QT];
#ifdef __AVX512BF16__
    uint16_t pbuf[RG][KB] __attribute__((aligned(64)));
#else
    float pbuf[RG][KB] __attribute__((aligned(64)));
#endif
    for (int r = 0; r < QT; r++) { mrow[r] = -INFINITY; lrow[r] = 0.f; }
    memset(o, 0, sizeof o);
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int kb = 0; kb < Sk; kb += KB) {
        const uint8_t *kblk = kp + (long)kb * hd;
        __m512 ks[KB / 16];
        __mmask16 valid[KB / 16];
        for (int g = 0; g < KB / 16; g++) {
            ks[g] = _mm512_loadu_ps(ksc + kb + 16 * g);
            int left = S - kb - 16 * g;
            valid[g] = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
        }
        const uint32_t *vblk = (const uint32_t *)(vp + (long)kb * hd);
        for (int rg = 0; rg < QT; rg += RG) {
            const int8_t *qr = q8 + (long)(r0 + rg) * hd;
            /* scores: RG rows x 64 keys, int32 */
            __m512i acc[RG][KB / 16];
            for (int r = 0; r < RG; r++)
                for (int g = 0; g < KB / 16; g++) acc[r][g] = _mm512_setzero_si512();
            for (int c = 0; c < hd / 4; c++) {
                __m512i kv[KB / 16];
                for (int g = 0; g < KB / 16; g++) kv[g] = _mm512_loadu_si512(kblk + (long)g * 16 * hd + c * 64);
                for (int r = 0; r < RG; r++) {
                    int32_t w;
                    memcpy(&w, qr + r * hd + 4 * c, 4);
                    __m512i qb = _mm512_set1_epi32(w);
                    for (int g = 0; g < KB / 16; g++) acc[r][g] = _mm512_dpbusd_epi32(acc[r][g], kv[g], qb);
                }
            }
            /* online softmax in base 2, p to bf16 */
            float alpha[RG];
            for (int r = 0; r < RG; r++) {
                int i = rg + r;
                __m512 cr = _mm512_set1_ps(qc[r0 + i]);
                __m512i corr = _mm512_set1_epi32(qcorr[r0 + i]);
                __m512 t[KB / 16];
                __m512 mx = ninf;
                for (int g = 0; g < KB / 16; g++) {
                    t[g] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][g], corr)), _mm512_mul_ps(ks[g], cr));
                    t[g] = _mm512_mask_blend_ps(valid[g], ninf, t[g]);
                    mx = _mm512_max_ps(mx, t[g]);
                }
                float mnew = fmaxf(mrow[i], _mm512_reduce_max_ps(mx));
                alpha[r] = mrow[i] == -INFINITY ? 0.f : exp2f(mrow[i] - mnew);
                mrow[i] = mnew;
                __m512 mv = _mm512_set1_ps(mnew == -INFINITY ? 0.f : mnew);
                __m512 sum = _mm512_setzero_ps();
                for (int g = 0; g < KB / 16; g++) {
                    t[g] = exp2_neg(_mm512_sub_ps(t[g], mv));
                    sum = _mm512_add_ps(sum, t[g]);
                }
                lrow[i] = lrow[i] * alpha[r] + _mm512_reduce_add_ps(sum);
#ifdef __AVX512BF16__
                for (int g = 0; g < KB / 16; g += 2)
                    _mm512_store_si512(pbuf[r] + 16 * g, (__m512i)_mm512_cvtne2ps_pbh(t[g + 1], t[g]));
#else
                for (int g = 0; g < KB / 16; g++) _mm512_store_ps(pbuf[r] + 16 * g, t[g]);
#endif
            }
            /* o = alpha o + p v over the block's 32 key pairs */
            __m512 acc_o[RG][HD_MAX / 16];
            for (int r = 0; r < RG; r++) {
                __m512 a = _mm512_set1_ps(alpha[r]);
                for (int c = 0; c < hd / 16; c++) acc_o[r][c] = _mm512_mul_ps(_mm512_load_ps(o[rg + r] + 16 * c), a);
            }
            for (int p = 0; p < KB / 2; p++) {
#ifdef __AVX512BF16__
                __m512bh vv[HD_MAX / 16];
                for (int c = 0; c < hd / 16; c++) vv[c] = (__m512bh)_mm512_loadu_si512(vblk + (long)p * hd + 16 * c);
                for (int r = 0; r < RG; r++) {
                    int32_t w;
                    memcpy(&w, pbuf[r] + 2 * p, 4);
                    __m512bh pb = (__m512bh)_mm512_set1_epi32(w);
                    for (int c = 0; c < hd / 16; c++) acc_o[r][c] = _mm512_dpbf16_ps(acc_o[r][c], pb, vv[c]);
                }
#else           /* the bf16 pair widened: key 2p is the low half (shifted up), key 2p + 1 the high half */
                __m512 ve[HD_MAX / 16], vo[HD_MAX / 16];
                for (int c = 0; c < hd / 16; c++) {
                    __m512i w = _mm512_loadu_si512(vblk + (long)p * hd + 16 * c);
                    ve[c] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
                    vo[c] = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32((int)0xFFFF0000u)));
                }
                for (int r = 0; r < RG; r++) {
                    __m512 pe = _mm512_set1_ps(pbuf[r][2 * p]), po = _mm512_set1_ps(pbuf[r][2 * p + 1]);
                    for (int c = 0; c < hd / 16; c++)
                        acc_o[r][c] = _mm512_fmadd_ps(po, vo[c], _mm512_fmadd_ps(pe, ve[c], acc_o[r][c]));
                }
#endif
            }
            for (int r = 0; r < RG; r++)
                for (int c = 0; c < hd / 16; c++) _mm512_store_ps(o[rg + r] + 16 * c, acc_o[r][c]);
        }
    }
    for (int r = 0; r < QT && r0 + r < S; r++) {
        __m512 inv = _mm512_set1_ps(1.f / lrow[r]);
        for (int c = 0; c < hd; c += 16)
            _mm512_storeu_ps(out + (long)(r0 + r) * os + c, _mm512_mul_ps(_mm512_load_ps(o[r] + c), inv));
    }
}

INSTANCE(16)
INSTANCE(32)
INSTANCE(64)

ENTRY_POINT(QT, 0, 0)
