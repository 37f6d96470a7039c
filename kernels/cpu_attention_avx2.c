/* The int8 attention of cpu_kernels.c for CPUs without AVX-512 (AVX2 + FMA; AMD Zen 2 / 3, Intel client
 * cores), in 8 lanes, with the numerics of its avx512_vnni variant: k smoothed, q and k int8 per token,
 * int32 scores, fp32 online softmax in base 2 with the same cubic 2^x, p in fp32, v rounded to bf16,
 * fp32 sums. cpu_isa.py builds it as two variants:
 *   avx_vnni: -mavxvnni, q k^T through vpdpbusd on ymm (k stored as k + 128, 128 * sum(q) subtracted);
 *   avx2:     without it, q k^T as vpmaddubsw(|q|, sign(k, q)) + vpmaddwd (no int16 saturation:
 *             |q| k pairs stay within 2 * 127 * 127), k stored as signed int8.
 * Layout: k in groups of 8 keys (4 bytes of each key per 32-bit lane), v as bf16 pairs of consecutive
 * keys (as cpu_kernels.c); blocks of 32 keys, 2 query rows per micro-kernel, tiles of 32 rows. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_attention.h"

#define KB 32 /* keys per block */
#define QT 32 /* query rows per tile */
#define RG 2  /* query rows per micro-kernel */

static inline float hmax8(__m256 x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}
static inline float hsum8(__m256 x) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_add_ss(m, _mm_shuffle_ps(m, m, 1)));
}
static inline int hsum8i(__m256i x) {
    __m128i m = _mm_add_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    m = _mm_add_epi32(m, _mm_shuffle_epi32(m, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(m, _mm_shuffle_epi32(m, 0xB1)));
}
static inline __m256 abs8(__m256 x) { return _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))); }

/* 2^x for x <= 0 (x may be -inf), the cubic of cpu_kernels.c; 2^floor(x) built in the exponent field. */
static inline __m256 exp2_neg(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-127.f));
    __m256 fl = _mm256_floor_ps(x), f = _mm256_sub_ps(x, fl);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(0.07706306f), f, _mm256_set1_ps(0.22764935f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.69511581f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fl), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* Round 16 floats to int8 (nearest even, |x * inv| <= 127) and store 16 bytes; returns their int32 sum. */
static inline int quant16(const float *x, __m256 inv, int8_t *dst) {
    __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), inv));
    __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), inv));
    __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
    __m256i y = _mm256_permute4x64_epi64(_mm256_packs_epi16(w, w), 0xD8);
    _mm_storeu_si128((__m128i *)dst, _mm256_castsi256_si128(y));
    return hsum8i(_mm256_add_epi32(a, b));
}

/* bf16 of two floats per 32-bit lane (low: key 2p, high: key 2p + 1), round to nearest even. */
static inline __m256i bf16_pair(__m256 a, __m256 b) {
    __m256i ia = _mm256_castps_si256(a), ib = _mm256_castps_si256(b);
    const __m256i bias = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
    ia = _mm256_srli_epi32(_mm256_add_epi32(ia, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(ia, 16), one))), 16);
    ib = _mm256_add_epi32(ib, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(ib, 16), one)));
    return _mm256_or_si256(ia, _mm256_and_si256(ib, _mm256_set1_epi32((int)0xFFFF0000u)));
}

#ifdef __AVXVNNI__
#define K_XOR 0x80808080u /* k + 128 as u8 */
#define QCORR(sum) (128 * (sum))
#else
#define K_XOR 0u
#define QCORR(sum) 0
#endif

INLINE void pack_head(const int hd, int S, int Sq, int Sk, const struct src *q, const struct src *k,
                      const struct src *v, float qscale, int8_t *q8, float *qc, int32_t *qcorr, uint8_t *kp,
                      float *ksc, uint16_t *vp, const struct prep *pr) {
    for (int i = 0; i < Sq; i++) {
        int8_t *dst = q8 + (long)i * hd;
        if (i >= S) { memset(dst, 0, hd); qc[i] = 0.f; qcorr[i] = 0; continue; }
        float qt_[HD_MAX];
        const float *x = prep_row(pr, hd, load_row(q, hd, i, qt_), i, 0, qt_);
        __m256 m = _mm256_setzero_ps();
        for (int c = 0; c < hd; c += 8) m = _mm256_max_ps(m, abs8(_mm256_loadu_ps(x + c)));
        float amax = hmax8(m);
        __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        int sum = 0;
        for (int c = 0; c < hd; c += 16) sum += quant16(x + c, inv, dst + c);
        qc[i] = amax / 127.f * qscale;
        qcorr[i] = QCORR(sum);
    }
    __m256 mean[HD_MAX / 8];
    for (int c = 0; c < hd / 8; c++) mean[c] = _mm256_setzero_ps();
    for (int j = 0; j < S; j++) {
        float kt_[HD_MAX];
        const float *kr = prep_row(pr, hd, load_row(k, hd, j, kt_), j, 1, kt_);
        for (int c = 0; c < hd / 8; c++) mean[c] = _mm256_add_ps(mean[c], _mm256_loadu_ps(kr + 8 * c));
    }
    for (int c = 0; c < hd / 8; c++) mean[c] = _mm256_mul_ps(mean[c], _mm256_set1_ps(1.f / S));
    uint32_t pad = 0u ^ K_XOR; /* a padded key: k = 0 */
    for (int j = S / 8 * 8; j < Sk; j++)
        for (int c = 0; c < hd / 4; c++) ((uint32_t *)(kp + (long)(j / 8) * 8 * hd))[c * 8 + j % 8] = pad;
    for (int j = 0; j < S; j++) {
        float kt_[HD_MAX];
        const float *kr = prep_row(pr, hd, load_row(k, hd, j, kt_), j, 1, kt_);
        float row[HD_MAX];
        __m256 m = _mm256_setzero_ps();
        for (int c = 0; c < hd / 8; c++) {
            __m256 y = _mm256_sub_ps(_mm256_loadu_ps(kr + 8 * c), mean[c]);
            _mm256_storeu_ps(row + 8 * c, y);
            m = _mm256_max_ps(m, abs8(y));
        }
        float amax = hmax8(m);
        __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        int8_t k8[HD_MAX];
        for (int c = 0; c < hd; c += 16) quant16(row + c, inv, k8 + c);
        uint32_t *grp = (uint32_t *)(kp + (long)(j / 8) * 8 * hd);
        for (int c = 0; c < hd / 4; c++) {
            uint32_t w;
            memcpy(&w, k8 + 4 * c, 4);
            grp[c * 8 + j % 8] = w ^ K_XOR;
        }
        ksc[j] = amax / 127.f;
    }
    for (int j = S; j < Sk; j++) ksc[j] = 0.f;
    for (int p = 0; p < Sk / 2; p++) {
        uint32_t *dst = (uint32_t *)(vp + (long)p * 2 * hd);
        int j = 2 * p;
        float va_[HD_MAX], vb_[HD_MAX];
        const float *ra = j < S ? load_row(v, hd, j, va_) : 0, *rb = j + 1 < S ? load_row(v, hd, j + 1, vb_) : 0;
        for (int c = 0; c < hd; c += 8) {
            __m256 a = ra ? _mm256_loadu_ps(ra + c) : _mm256_setzero_ps();
            __m256 b = rb ? _mm256_loadu_ps(rb + c) : _mm256_setzero_ps();
            _mm256_storeu_si256((__m256i *)(dst + c), bf16_pair(a, b));
        }
    }
}

/* int32 q . k for 8 keys: q4 the row's 4 bytes broadcast (|q| and q's signs for the avx2 path). */
static inline __m256i dot4(__m256i acc, __m256i kv, __m256i q4, __m256i qabs) {
#ifdef __AVXVNNI__
    (void)qabs;
    return _mm256_dpbusd_avx_epi32(acc, kv, q4);
#else
    __m256i pairs = _mm256_maddubs_epi16(qabs, _mm256_sign_epi8(kv, q4));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

INLINE void attend_tile(const int hd, int S, int Sk, int r0, const int8_t *q8, const float *qc, const int32_t *qcorr,
                        const uint8_t *kp, const float *ksc, const uint16_t *vp, float *out, long os) {
    float o[QT][HD_MAX] __attribute__((aligned(32)));
    float mrow[QT], lrow[QT];
    float pbuf[RG][KB] __attribute__((aligned(32)));
    for (int r = 0; r < QT; r++) { mrow[r] = -INFINITY; lrow[r] = 0.f; }
    memset(o, 0, sizeof o);
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int kb = 0; kb < Sk; kb += KB) {
        const uint8_t *kblk = kp + (long)kb * hd;
        const uint32_t *vblk = (const uint32_t *)(vp + (long)kb * hd);
        __m256 ks[KB / 8], valid[KB / 8];
        for (int g = 0; g < KB / 8; g++) {
            ks[g] = _mm256_loadu_ps(ksc + kb + 8 * g);
            valid[g] = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(S - kb - 8 * g), lane));
        }
        for (int rg = 0; rg < QT; rg += RG) {
            const int8_t *qr = q8 + (long)(r0 + rg) * hd;
            __m256i acc[RG][KB / 8];
            for (int r = 0; r < RG; r++)
                for (int g = 0; g < KB / 8; g++) acc[r][g] = _mm256_setzero_si256();
            for (int c = 0; c < hd / 4; c++) {
                __m256i kv[KB / 8];
                for (int g = 0; g < KB / 8; g++) kv[g] = _mm256_loadu_si256((const __m256i *)(kblk + (long)g * 8 * hd + c * 32));
                for (int r = 0; r < RG; r++) {
                    int32_t w;
                    memcpy(&w, qr + r * hd + 4 * c, 4);
                    __m256i qb = _mm256_set1_epi32(w), qa = _mm256_abs_epi8(qb);
                    for (int g = 0; g < KB / 8; g++) acc[r][g] = dot4(acc[r][g], kv[g], qb, qa);
                }
            }
            float alpha[RG];
            for (int r = 0; r < RG; r++) {
                int i = rg + r;
                __m256 cr = _mm256_set1_ps(qc[r0 + i]);
                __m256i corr = _mm256_set1_epi32(qcorr[r0 + i]);
                __m256 t[KB / 8], mx = ninf;
                for (int g = 0; g < KB / 8; g++) {
                    t[g] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[r][g], corr)), _mm256_mul_ps(ks[g], cr));
                    t[g] = _mm256_blendv_ps(ninf, t[g], valid[g]);
                    mx = _mm256_max_ps(mx, t[g]);
                }
                float mnew = fmaxf(mrow[i], hmax8(mx));
                alpha[r] = mrow[i] == -INFINITY ? 0.f : exp2f(mrow[i] - mnew);
                mrow[i] = mnew;
                __m256 mv = _mm256_set1_ps(mnew == -INFINITY ? 0.f : mnew), sum = _mm256_setzero_ps();
                for (int g = 0; g < KB / 8; g++) {
                    t[g] = exp2_neg(_mm256_sub_ps(t[g], mv));
                    sum = _mm256_add_ps(sum, t[g]);
                    _mm256_store_ps(pbuf[r] + 8 * g, t[g]);
                }
                lrow[i] = lrow[i] * alpha[r] + hsum8(sum);
            }
            for (int r = 0; r < RG; r++) {
                __m256 a = _mm256_set1_ps(alpha[r]);
                for (int c = 0; c < hd; c += 8) _mm256_store_ps(o[rg + r] + c, _mm256_mul_ps(_mm256_load_ps(o[rg + r] + c), a));
            }
            for (int c0 = 0; c0 < hd; c0 += 32) { /* 32 output columns at a time: 8 accumulators */
                const int nc = hd - c0 < 32 ? (hd - c0) / 8 : 4;
                __m256 ao[RG][4];
                for (int r = 0; r < RG; r++)
                    for (int c = 0; c < nc; c++) ao[r][c] = _mm256_load_ps(o[rg + r] + c0 + 8 * c);
                for (int p = 0; p < KB / 2; p++) {
                    __m256 ve[4], vo[4];
                    for (int c = 0; c < nc; c++) {
                        __m256i w = _mm256_loadu_si256((const __m256i *)(vblk + (long)p * hd + c0 + 8 * c));
                        ve[c] = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
                        vo[c] = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32((int)0xFFFF0000u)));
                    }
                    for (int r = 0; r < RG; r++) {
                        __m256 pe = _mm256_set1_ps(pbuf[r][2 * p]), po = _mm256_set1_ps(pbuf[r][2 * p + 1]);
                        for (int c = 0; c < nc; c++) ao[r][c] = _mm256_fmadd_ps(po, vo[c], _mm256_fmadd_ps(pe, ve[c], ao[r][c]));
                    }
                }
                for (int r = 0; r < RG; r++)
                    for (int c = 0; c < nc; c++) _mm256_store_ps(o[rg + r] + c0 + 8 * c, ao[r][c]);
            }
        }
    }
    for (int r = 0; r < QT && r0 + r < S; r++) {
        __m256 inv = _mm256_set1_ps(1.f / lrow[r]);
        for (int c = 0; c < hd; c += 8) _mm256_storeu_ps(out + (long)(r0 + r) * os + c, _mm256_mul_ps(_mm256_load_ps(o[r] + c), inv));
    }
}

INSTANCE(16)
INSTANCE(32)
INSTANCE(64)

ENTRY_POINT(QT, 0, 0)
