/* The int8 attention of cpu_kernels.c on AMX tiles (Intel Sapphire Rapids and later): the same packing and
 * numerics as its avx512_bf16 variant (k smoothed, q and k int8 per token, int32 scores, fp32 online
 * softmax with the cubic 2^x, p and v in bf16, fp32 sums), with the two products on the tile unit:
 *   q k^T: TDPBSUD, A = 16 query rows of int8 q, B = a group of 16 keys as packed (k + 128, 4 bytes per
 *          key per 32-bit lane: AMX's B layout already), minus 128 * sum(q) as before;
 *   p v:   TDPBF16PS, A = 16 rows of bf16 p (32 keys), B = 16 bf16 key pairs x 16 columns of v (the
 *          packed pair layout), C = 16 rows x 16 columns of the output, loaded and stored around it.
 * The softmax and the per-block rescaling of the output stay on AVX-512. cpu_isa.py builds this file
 * with -mamx-tile -mamx-int8 -mamx-bf16 on top of the avx512_bf16 flags. */
#define cogvx_int8_attention cogvx_int8_attention_avx512 /* this file defines its own entry point */
#include "cpu_kernels.c"
#undef cogvx_int8_attention
#include <sys/syscall.h>
#include <unistd.h>

#define QR 16 /* query rows per tile row block */

/* Linux hands out the AMX tile state only on request (once per process; idempotent). */
static int amx_ready(void) {
    static int ok = -1;
    if (ok < 0) ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return ok;
}

int cogvx_amx_ready(void) { return amx_ready(); } /* for cpu_isa.py, at load */

struct tilecfg {
    uint8_t palette, start;
    uint8_t pad[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* tiles 0-3: scores of 16 rows x 16 keys (int32); 4: q rows (16 x hd bytes); 5: a key group (hd/4 rows);
 * 6: p (16 rows x 32 bf16); 7: v pairs (16 rows x 16 columns of bf16 pairs). Tile 0 also holds the output. */
static void configure(int hd) {
    struct tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) { c.colsb[t] = 64; c.rows[t] = 16; }
    c.colsb[4] = (uint16_t)hd;
    c.rows[5] = (uint8_t)(hd / 4);
    _tile_loadconfig(&c);
}

INLINE void attend_tile_amx(const int hd, int S, int Sk, int r0, const int8_t *q8, const float *qc, const int32_t *qcorr,
                            const uint8_t *kp, const float *ksc, const uint16_t *vp, float *out, long os) {
    float o[QR][HD_MAX] __attribute__((aligned(64)));
    int32_t sc[QR][KB] __attribute__((aligned(64)));
    uint16_t pbuf[QR][KB] __attribute__((aligned(64)));
    float mrow[QR], lrow[QR];
    for (int r = 0; r < QR; r++) { mrow[r] = -INFINITY; lrow[r] = 0.f; }
    memset(o, 0, sizeof o);
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    _tile_loadd(4, q8 + (long)r0 * hd, hd);
    for (int kb = 0; kb < Sk; kb += KB) {
        const uint8_t *kblk = kp + (long)kb * hd;
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
#define QK(g)                                                 \
    _tile_loadd(5, kblk + (long)(g) * 16 * hd, 64);           \
    _tile_dpbsud(g, 4, 5);                                    \
    _tile_stored(g, &sc[0][16 * (g)], KB * 4);
        QK(0) QK(1) QK(2) QK(3)
#undef QK
        __m512 ks[KB / 16];
        __mmask16 valid[KB / 16];
        for (int g = 0; g < KB / 16; g++) {
            ks[g] = _mm512_loadu_ps(ksc + kb + 16 * g);
            int left = S - kb - 16 * g;
            valid[g] = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
        }
        for (int r = 0; r < QR; r++) {
            __m512 cr = _mm512_set1_ps(qc[r0 + r]);
            __m512i corr = _mm512_set1_epi32(qcorr[r0 + r]);
            __m512 t[KB / 16], mx = ninf;
            for (int g = 0; g < KB / 16; g++) {
                __m512i s = _mm512_load_si512(&sc[r][16 * g]);
                t[g] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s, corr)), _mm512_mul_ps(ks[g], cr));
                t[g] = _mm512_mask_blend_ps(valid[g], ninf, t[g]);
                mx = _mm512_max_ps(mx, t[g]);
            }
            float mnew = fmaxf(mrow[r], _mm512_reduce_max_ps(mx));
            float alpha = mrow[r] == -INFINITY ? 0.f : exp2f(mrow[r] - mnew);
            mrow[r] = mnew;
            __m512 mv = _mm512_set1_ps(mnew == -INFINITY ? 0.f : mnew), sum = _mm512_setzero_ps();
            for (int g = 0; g < KB / 16; g++) {
                t[g] = exp2_neg(_mm512_sub_ps(t[g], mv));
                sum = _mm512_add_ps(sum, t[g]);
            }
            lrow[r] = lrow[r] * alpha + _mm512_reduce_add_ps(sum);
            for (int g = 0; g < KB / 16; g += 2)
                _mm512_store_si512(pbuf[r] + 16 * g, (__m512i)_mm512_cvtne2ps_pbh(t[g + 1], t[g]));
            __m512 a = _mm512_set1_ps(alpha);
            for (int c = 0; c < hd; c += 16) _mm512_store_ps(o[r] + c, _mm512_mul_ps(_mm512_load_ps(o[r] + c), a));
        }
        const uint8_t *vblk = (const uint8_t *)(vp + (long)kb * hd);
        _tile_loadd(6, &pbuf[0][0], KB * 2);
        _tile_loadd(1, &pbuf[0][32], KB * 2);
        for (int c = 0; c < hd; c += 16) {
            _tile_loadd(0, o[0] + c, HD_MAX * 4);
            _tile_loadd(7, vblk + (long)c * 4, hd * 4); /* pairs 0-15 of the block */
            _tile_dpbf16ps(0, 6, 7);
            _tile_loadd(7, vblk + (long)16 * hd * 4 + (long)c * 4, hd * 4); /* pairs 16-31 */
            _tile_dpbf16ps(0, 1, 7);
            _tile_stored(0, o[0] + c, HD_MAX * 4);
        }
    }
    for (int r = 0; r < QR && r0 + r < S; r++) {
        __m512 inv = _mm512_set1_ps(1.f / lrow[r]);
        for (int c = 0; c < hd; c += 16)
            _mm512_storeu_ps(out + (long)(r0 + r) * os + c, _mm512_mul_ps(_mm512_load_ps(o[r] + c), inv));
    }
}

#define AMX_INSTANCE(D)                                                                                           \
    static void attend_amx_##D(int S, int Sk, int r0, const int8_t *q8, const float *qc, const int32_t *qcorr,    \
                               const uint8_t *kp, const float *ksc, const uint16_t *vp, float *out, long os) {    \
        attend_tile_amx(D, S, Sk, r0, q8, qc, qcorr, kp, ksc, vp, out, os);                                        \
    }
AMX_INSTANCE(16)
AMX_INSTANCE(32)
AMX_INSTANCE(64)

/* cpu_kernels.c's interface and workspaces. Returns 0, -1 for another hd, -2 where Linux refuses AMX. */
int cogvx_int8_attention(int hd, int B, int H, int S, const float *q, const long *qst, const float *k,
                         const long *kst, const float *v, const long *vst, float *out, const long *ost, float scale,
                         int threads, int8_t *q8, float *qc, int32_t *qcorr, uint8_t *kp, float *ksc, uint16_t *vp) {
    pack_fn pack = hd == 16 ? pack_head_16 : hd == 32 ? pack_head_32 : hd == 64 ? pack_head_64 : 0;
    tile_fn tile_of = hd == 16 ? attend_amx_16 : hd == 32 ? attend_amx_32 : hd == 64 ? attend_amx_64 : 0;
    if (!pack) return -1;
    if (!amx_ready()) return -2;
    const int Sq = (S + QT - 1) / QT * QT, Sk = (S + KB - 1) / KB * KB, heads = B * H, tiles = Sq / QR;
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
        configure(hd);
#pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < (long)heads * tiles; t++) {
            int bh = (int)(t / tiles), tile = (int)(t % tiles), b = bh / H, h = bh % H;
            tile_of(S, Sk, tile * QR, q8 + (long)bh * Sq * hd, qc + (long)bh * Sq, qcorr + (long)bh * Sq,
                    kp + (long)bh * Sk * hd, ksc + (long)bh * Sk, vp + (long)bh * Sk * hd,
                    out + b * ost[0] + h * ost[1], ost[2]);
        }
        _tile_release();
    }
    return 0;
}
