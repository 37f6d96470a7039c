/* The int8 attention for AVX-512 CPUs with VNNI, with or without BF16 (no AMX needed); the feed-forward's
 * GELU + int8 quantization is cpu_gelu_quant.c. cpu_isa.py builds this file once per variant:
 *   avx512_bf16: -mavx512bf16, p v as bf16 dot products (vdpbf16ps);
 *   avx512_vnni: without it, p v as fp32 FMAs on the same bf16 v (p kept in fp32: a little more exact).
 * cpu_attention_amx.c includes this file for its packing (the amx variant); cpu_attention_avx2.c is the
 * 8-lane port (avx_vnni, avx2).
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

#define HD_MAX 64   /* largest head dimension (16, 32 or 64) */
#define INLINE static inline __attribute__((always_inline))
#define KB 64       /* keys per block */
#define QT 32       /* query rows per tile (one task) */
#define RG 4        /* query rows per micro-kernel */
#define LOG2E 1.4426950408889634f

/* 2^x for x <= 0 (x may be -inf): a cubic on the fraction (exact at 0, so a row's largest p is 1), then
 * vscalefps multiplies by 2^floor(x). Relative error below 9e-5, under the bf16 rounding that p gets for
 * the p v product. */
static inline __m512 exp2_neg(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-127.f));
    __m512 f = _mm512_sub_ps(x, _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.07706306f), f, _mm512_set1_ps(0.22764935f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69511581f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, x);
}

/* Round 16 floats to int8 (nearest even) with scale inv; store 16 bytes. Returns the int32 values. */
static inline __m512i quant16(const float *x, __m512 inv, int8_t *dst) {
    __m512i i = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x), inv));
    _mm_storeu_si128((__m128i *)dst, _mm512_cvtsepi32_epi8(i));
    return i;
}

/* bf16 of two floats per 32-bit lane: low half a (key 2p), high half b (key 2p + 1), round to nearest even. */
static inline __m512i bf16_pair(__m512 a, __m512 b) {
    __m512i ia = _mm512_castps_si512(a), ib = _mm512_castps_si512(b);
    const __m512i bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    ia = _mm512_srli_epi32(_mm512_add_epi32(ia, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(ia, 16), one))), 16);
    ib = _mm512_add_epi32(ib, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(ib, 16), one)));
    return _mm512_or_si512(ia, _mm512_and_si512(ib, _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* Quantize and pack one head. q, k, v: rows of 64 floats at row strides qs, ks, vs. */
INLINE void pack_head(const int hd, int S, int Sq, int Sk, const float *q, long qs, const float *k, long ks, const float *v, long vs,
                      float qscale, int8_t *q8, float *qc, int32_t *qcorr, uint8_t *kp, float *ksc, uint16_t *vp) {
    /* q: per-token int8, c_i = amax_i / 127 * qscale, correction 128 * sum(q8_i) */
    for (int i = 0; i < Sq; i++) {
        int8_t *dst = q8 + (long)i * hd;
        if (i >= S) { memset(dst, 0, hd); qc[i] = 0.f; qcorr[i] = 0; continue; }
        const float *x = q + i * qs;
        __m512 m = _mm512_abs_ps(_mm512_loadu_ps(x));
        for (int c = 16; c < hd; c += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + c)));
        float amax = _mm512_reduce_max_ps(m);
        __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        __m512i sum = _mm512_setzero_si512();
        for (int c = 0; c < hd; c += 16) sum = _mm512_add_epi32(sum, quant16(x + c, inv, dst + c));
        qc[i] = amax / 127.f * qscale;
        qcorr[i] = 128 * _mm512_reduce_add_epi32(sum);
    }
    /* k: subtract the mean over tokens, per-token int8, stored as k + 128 in groups of 16 keys:
     * kp[group][d / 4][key % 16][d % 4] */
    __m512 mean[HD_MAX / 16];
    for (int c = 0; c < hd / 16; c++) mean[c] = _mm512_setzero_ps();
    for (int j = 0; j < S; j++)
        for (int c = 0; c < hd / 16; c++) mean[c] = _mm512_add_ps(mean[c], _mm512_loadu_ps(k + j * ks + 16 * c));
    for (int c = 0; c < hd / 16; c++) mean[c] = _mm512_mul_ps(mean[c], _mm512_set1_ps(1.f / S));
    memset(kp + (long)(S / 16) * 16 * hd, 128, (long)(Sk - S / 16 * 16) * hd);
    for (int j = 0; j < S; j++) {
        float row[HD_MAX];
        __m512 m = _mm512_setzero_ps();
        for (int c = 0; c < hd / 16; c++) {
            __m512 y = _mm512_sub_ps(_mm512_loadu_ps(k + j * ks + 16 * c), mean[c]);
            _mm512_storeu_ps(row + 16 * c, y);
            m = _mm512_max_ps(m, _mm512_abs_ps(y));
        }
        float amax = _mm512_reduce_max_ps(m);
        __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        int8_t k8[HD_MAX];
        for (int c = 0; c < hd; c += 16) quant16(row + c, inv, k8 + c);
        uint32_t *grp = (uint32_t *)(kp + (long)(j / 16) * 16 * hd);
        for (int c = 0; c < hd / 4; c++) {
            uint32_t w;
            memcpy(&w, k8 + 4 * c, 4);
            grp[c * 16 + j % 16] = w ^ 0x80808080u;
        }
        ksc[j] = amax / 127.f;
    }
    for (int j = S; j < Sk; j++) ksc[j] = 0.f;
    /* v: bf16 pairs of consecutive keys, vp[pair][d] = (v[2p][d], v[2p+1][d]) */
    for (int p = 0; p < Sk / 2; p++) {
        uint32_t *dst = (uint32_t *)(vp + (long)p * 2 * hd);
        int j = 2 * p;
        for (int c = 0; c < hd; c += 16) {
            __m512 a = j < S ? _mm512_loadu_ps(v + j * vs + c) : _mm512_setzero_ps();
            __m512 b = j + 1 < S ? _mm512_loadu_ps(v + (j + 1) * vs + c) : _mm512_setzero_ps();
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

/* One instance of each per head dimension, hd a constant in it (the loops unroll). The OpenMP region
 * below calls them through pointers: a constant passed into the region would be a runtime value there. */
typedef void (*pack_fn)(int, int, int, const float *, long, const float *, long, const float *, long, float, int8_t *,
                        float *, int32_t *, uint8_t *, float *, uint16_t *);
typedef void (*tile_fn)(int, int, int, const int8_t *, const float *, const int32_t *, const uint8_t *, const float *,
                        const uint16_t *, float *, long);
#define INSTANCE(D)                                                                                                  \
    static void pack_head_##D(int S, int Sq, int Sk, const float *q, long qs, const float *k, long ks, const float *v, \
                              long vs, float qscale, int8_t *q8, float *qc, int32_t *qcorr, uint8_t *kp, float *ksc,  \
                              uint16_t *vp) {                                                                         \
        pack_head(D, S, Sq, Sk, q, qs, k, ks, v, vs, qscale, q8, qc, qcorr, kp, ksc, vp);                            \
    }                                                                                                                \
    static void attend_tile_##D(int S, int Sk, int r0, const int8_t *q8, const float *qc, const int32_t *qcorr,       \
                                const uint8_t *kp, const float *ksc, const uint16_t *vp, float *out, long os) {       \
        attend_tile(D, S, Sk, r0, q8, qc, qcorr, kp, ksc, vp, out, os);                                               \
    }
INSTANCE(16)
INSTANCE(32)
INSTANCE(64)

/* q, k, v: [B, H, S, hd] float32 at element strides (sb, sh, ss) each, last stride 1; hd 16, 32 or 64.
 * out: [B, H, S, hd] float32 at strides (ob, oh, os). Workspaces (per head, heads = B * H):
 * q8 Sq * hd bytes, qc Sq floats, qcorr Sq ints, kp Sk * hd bytes, ksc Sk floats, vp Sk * hd uint16,
 * with Sq = S rounded up to 32 and Sk = S rounded up to 64. Returns 0, or -1 for another hd. */
int cogvx_int8_attention(int hd, int B, int H, int S, const float *q, const long *qst, const float *k,
                         const long *kst, const float *v, const long *vst, float *out, const long *ost, float scale,
                         int threads, int8_t *q8, float *qc, int32_t *qcorr, uint8_t *kp, float *ksc, uint16_t *vp) {
    pack_fn pack = hd == 16 ? pack_head_16 : hd == 32 ? pack_head_32 : hd == 64 ? pack_head_64 : 0;
    tile_fn tile_of = hd == 16 ? attend_tile_16 : hd == 32 ? attend_tile_32 : hd == 64 ? attend_tile_64 : 0;
    if (!pack) return -1;
    const int Sq = (S + QT - 1) / QT * QT, Sk = (S + KB - 1) / KB * KB, heads = B * H, tiles = Sq / QT;
    const float qscale = scale * LOG2E;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(dynamic, 1)
        for (int bh = 0; bh < heads; bh++) {
            int b = bh / H, h = bh % H;
            pack(S, Sq, Sk, q + b * qst[0] + h * qst[1], qst[2], k + b * kst[0] + h * kst[1], kst[2],
                 v + b * vst[0] + h * vst[1], vst[2], qscale, q8 + (long)bh * Sq * hd, qc + (long)bh * Sq,
                 qcorr + (long)bh * Sq, kp + (long)bh * Sk * hd, ksc + (long)bh * Sk, vp + (long)bh * Sk * hd);
        }
#pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < (long)heads * tiles; t++) {
            int bh = (int)(t / tiles), tile = (int)(t % tiles), b = bh / H, h = bh % H;
            tile_of(S, Sk, tile * QT, q8 + (long)bh * Sq * hd, qc + (long)bh * Sq, qcorr + (long)bh * Sq,
                    kp + (long)bh * Sk * hd, ksc + (long)bh * Sk, vp + (long)bh * Sk * hd,
                    out + b * ost[0] + h * ost[1], ost[2]);
        }
    }
    return 0;
}
