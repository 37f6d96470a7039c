/* The int8 attention on AMX tiles (Intel Sapphire Rapids and later), with the numerics of cpu_kernels.c's
 * avx512_bf16 variant (k smoothed, q and k int8 per token, exact int32 scores, fp32 softmax in base 2
 * with the cubic 2^x, p and v in bf16, fp32 sums, the row sum of the unrounded p), computed transposed:
 * a tile of 16 query rows holds, in one vector, one key's scores for all 16 rows, so the softmax's
 * maxima and sums run down the keys lane by lane, with no horizontal reduction and one 2^x per vector.
 *
 *   s^T = k q^T: TDPBSSD, A = 16 keys of int8 k (row-major, hd bytes each), B = the tile's 16 rows of
 *                int8 q (hd / 4 rows of 16 rows x 4 bytes: AMX's B layout);
 *   o^T += v^T p^T: TDPBF16PS, A = 16 dimensions of v^T (32 keys of bf16 each), B = 16 key pairs of p^T
 *                (16 rows x a bf16 pair of consecutive keys); o^T (hd x 16 rows, fp32) stays in tiles 0-3
 *                for the whole row of keys.
 *
 * The running maximum is lazy (as FlashAttention-4's) and an integer (in base 2): p is taken against
 * 2^mi, mi the first block's row maximum rounded up, and a block of 64 keys rescales o^T (tiles stored,
 * multiplied, loaded back) only where a row's maximum exceeds mi by more than TAU, to its own maximum
 * rounded up; otherwise p may exceed 1 by up to 2^TAU, which bf16 and the fp32 sums carry. Since mi is
 * an integer, the cubic sees the same fraction and bf16 rounds p the same whatever mi is (a power of
 * two apart), and the rescaling is exact: the result is softmax with p = bf16(2^(x - ceil(max x))),
 * up to the cubic's error and the order of the sums.
 * cpu_isa.py builds this file with -mamx-tile -mamx-int8 -mamx-bf16 on top of the avx512_bf16 flags. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "cpu_attention.h"
#include "cpu_avx512.h"

#define QR 16 /* query rows per tile (one task) */
#define KB 64 /* keys per block */
#define TAU 8.f

/* r[i][j] <- r[j][i] for a 16 x 16 matrix of 32-bit lanes: four rounds of swapping off-diagonal blocks. */
static inline void transpose16(__m512i r[16]) {
    for (int s = 8; s >= 1; s >>= 1) {
        int lo[16], hi[16];
        for (int c = 0; c < 16; c++) {
            lo[c] = (c & s) ? 16 + c - s : c; /* row i: its own low columns, then row i + s's low columns */
            hi[c] = (c & s) ? 16 + c : c + s; /* row i + s: row i's high columns, then its own high ones */
        }
        const __m512i ilo = _mm512_loadu_si512(lo), ihi = _mm512_loadu_si512(hi);
        for (int i = 0; i < 16; i++) {
            if (i & s) continue;
            __m512i a = r[i], b = r[i + s];
            r[i] = _mm512_permutex2var_epi32(a, ilo, b);
            r[i + s] = _mm512_permutex2var_epi32(a, ihi, b);
        }
    }
}

/* Quantize and pack one head: q in AMX B layout per tile of 16 rows (q8[tile][d / 4][row][d % 4]), k as
 * row-major int8 (kp[key][d]), v^T in bf16 per chunk of 32 keys (vp[chunk][d][key]); rows past S are 0.
 * qcorr is not used (TDPBSSD multiplies signed by signed). */
INLINE void pack_head(const int hd, int S, int Sq, int Sk, const struct src *q, const struct src *k,
                      const struct src *v, float qscale, int8_t *q8, float *qc, int32_t *qcorr, uint8_t *kp,
                      float *ksc, uint16_t *vp, const struct prep *pr) {
    (void)qcorr;
    for (int i = 0; i < Sq; i++) {
        int8_t row[HD_MAX] = {0};
        float c = 0.f;
        if (i < S) c = query_int8(hd, q, pr, i, row, 0) * qscale;
        uint32_t *dst = (uint32_t *)(q8 + (long)(i / QR) * QR * hd);
        for (int w = 0; w < hd / 4; w++) memcpy(dst + w * QR + i % QR, row + 4 * w, 4);
        qc[i] = c;
    }
    __m512 mean[HD_MAX / 16];
    key_mean(hd, S, k, pr, mean);
    for (int j = 0; j < S; j++) ksc[j] = key_int8(hd, k, pr, j, mean, (int8_t *)kp + (long)j * hd);
    memset(kp + (long)S * hd, 0, (long)(Sk - S) * hd);
    for (int j = S; j < Sk; j++) ksc[j] = 0.f;
    /* v^T: per chunk of 32 keys and 16 dimensions, the 16 bf16 key pairs (pair-major) transposed */
    for (int ch = 0; ch < Sk / 32; ch++) {
        float vt_[32][HD_MAX];
        const float *row[32];
        for (int r = 0; r < 32; r++) row[r] = ch * 32 + r < S ? load_row(v, hd, ch * 32 + r, vt_[r]) : 0;
        for (int c = 0; c < hd; c += 16) {
            __m512i r[16];
            for (int p = 0; p < 16; p++) {
                const float *ra = row[2 * p], *rb = row[2 * p + 1];
                __m512 a = ra ? _mm512_loadu_ps(ra + c) : _mm512_setzero_ps();
                __m512 b = rb ? _mm512_loadu_ps(rb + c) : _mm512_setzero_ps();
                r[p] = bf16_pair(a, b);
            }
            transpose16(r);
            for (int d = 0; d < 16; d++) _mm512_storeu_si512(vp + ((long)ch * hd + c + d) * 32, r[d]);
        }
    }
}

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

/* tiles 0-3: o^T, 16 dimensions x 16 rows (fp32) each; 4: the tile's q (B); 5: 16 keys of k (A);
 * 6: s^T of 16 keys, then p^T (B, 16 key pairs); 7: 16 dimensions of v^T (A, 32 keys). */
static void configure(int hd) {
    struct tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) { c.colsb[t] = 64; c.rows[t] = 16; }
    c.rows[4] = (uint8_t)(hd / 4);
    c.colsb[5] = (uint16_t)hd;
    __asm__ volatile("" : : "r"(&c) : "memory"); /* gcc 12 drops the stores ldtilecfg reads without it */
    _tile_loadconfig(&c);
}

static void release(void) { _tile_release(); }

/* The tile macros take the tile's number as a literal: one line per o^T tile. */
#define EACH_O(hd, OP) \
    OP(0);             \
    if ((hd) > 16) OP(1); \
    if ((hd) > 32) { OP(2); OP(3); }

INLINE void attend_tile(const int hd, int S, int Sk, int r0, const int8_t *q8, const float *qc, const int32_t *qcorr,
                        const uint8_t *kp, const float *ksc, const uint16_t *vp, float *out, long os) {
    (void)qcorr;
    if (r0 >= S) return; /* a tile of padding rows only (Sq is S rounded up to 32) */
    int32_t sc[KB][QR] __attribute__((aligned(64)));
    float xs[KB][QR] __attribute__((aligned(64)));
    uint32_t pt[KB / 2][QR] __attribute__((aligned(64)));
    float ot[HD_MAX][QR] __attribute__((aligned(64)));
    const __m512 qcv = _mm512_loadu_ps(qc + r0);
    /* p^T pairs: element 2n is key j of row n (bf16 element n of cvtne2ps), 2n + 1 key j + 1 (element 16 + n) */
    uint16_t il[32];
    for (int n = 0; n < 16; n++) { il[2 * n] = (uint16_t)n; il[2 * n + 1] = (uint16_t)(16 + n); }
    const __m512i inter = _mm512_loadu_si512(il);
    __m512 mi = _mm512_setzero_ps(), l = _mm512_setzero_ps();
#define ZERO(t) _tile_zero(t)
    EACH_O(hd, ZERO)
#undef ZERO
    _tile_loadd(4, q8 + (long)r0 * hd, 64);
    for (int kb = 0; kb < S; kb += KB) {
        const int n = S - kb < KB ? S - kb : KB;
        for (int g = 0; g < n; g += 16) {
            _tile_zero(6);
            _tile_loadd(5, kp + (long)(kb + g) * hd, hd);
            _tile_dpbssd(6, 5, 4);
            _tile_stored(6, sc[g], 64);
        }
        /* x = s * k scale (the q scale, >= 0, is applied with the maximum below); the block's maxima */
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int j = 0; j < n; j++) {
            __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sc[j])), _mm512_set1_ps(ksc[kb + j]));
            _mm512_store_ps(xs[j], x);
            mx = _mm512_max_ps(mx, x);
        }
        const __m512 b2 = _mm512_mul_ps(mx, qcv); /* the block's maxima in base 2 */
        if (kb == 0) {
            mi = _mm512_roundscale_ps(b2, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
        } else {
            __mmask16 up = _mm512_cmp_ps_mask(_mm512_sub_ps(b2, mi), _mm512_set1_ps(TAU), _CMP_GT_OQ);
            if (up) { /* rows whose maximum grew past 2^TAU: rescale their o^T columns and sums, exactly */
                __m512 mnew = _mm512_mask_blend_ps(up, mi, _mm512_roundscale_ps(b2, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
                __m512 alpha = _mm512_scalef_ps(_mm512_set1_ps(1.f), _mm512_sub_ps(mi, mnew));
                l = _mm512_mul_ps(l, alpha);
#define STORE(t) _tile_stored(t, ot[16 * (t)], 64)
#define LOAD(t) _tile_loadd(t, ot[16 * (t)], 64)
                EACH_O(hd, STORE)
                for (int d = 0; d < hd; d++) _mm512_store_ps(ot[d], _mm512_mul_ps(_mm512_load_ps(ot[d]), alpha));
                EACH_O(hd, LOAD)
#undef LOAD
                mi = mnew;
            }
        }
        /* p = 2^(qc x - mi), its fp32 sum, and bf16 pairs of consecutive keys */
        const __m512 mq = mi;
        __m512 sum = _mm512_setzero_ps();
        int j = 0;
        for (; j + 1 < n; j += 2) {
            __m512 p0 = exp2_finite(_mm512_fmsub_ps(_mm512_load_ps(xs[j]), qcv, mq));
            __m512 p1 = exp2_finite(_mm512_fmsub_ps(_mm512_load_ps(xs[j + 1]), qcv, mq));
            sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
            _mm512_store_si512(pt[j / 2], _mm512_permutexvar_epi16(inter, (__m512i)_mm512_cvtne2ps_pbh(p1, p0)));
        }
        const int halves = (n + 31) / 32;
        if (j < n) { /* an odd key last: its pair's second key is p = 0 */
            __m512 p0 = exp2_finite(_mm512_fmsub_ps(_mm512_load_ps(xs[j]), qcv, mq));
            sum = _mm512_add_ps(sum, p0);
            _mm512_store_si512(pt[j / 2], _mm512_permutexvar_epi16(inter, (__m512i)_mm512_cvtne2ps_pbh(_mm512_setzero_ps(), p0)));
            j += 2;
        }
        for (; j < 32 * halves; j += 2) _mm512_store_si512(pt[j / 2], _mm512_setzero_si512());
        l = _mm512_add_ps(l, sum);
        for (int h = 0; h < halves; h++) {
            const uint16_t *vt = vp + ((long)(kb / 32 + h) * hd) * 32;
            _tile_loadd(6, pt[16 * h], 64);
#define PV(t)                                      \
    _tile_loadd(7, vt + (long)16 * (t) * 32, 64);  \
    _tile_dpbf16ps(t, 7, 6)
            EACH_O(hd, PV)
#undef PV
        }
    }
    EACH_O(hd, STORE)
#undef STORE
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), l);
    const int rows = S - r0 < QR ? S - r0 : QR;
    for (int c = 0; c < hd; c += 16) {
        __m512i r[16];
        for (int d = 0; d < 16; d++) r[d] = _mm512_castps_si512(_mm512_mul_ps(_mm512_load_ps(ot[c + d]), inv));
        transpose16(r);
        for (int i = 0; i < rows; i++) _mm512_storeu_si512(out + (long)(r0 + i) * os + c, r[i]);
    }
}

INSTANCE(16)
INSTANCE(32)
INSTANCE(64)

/* cpu_kernels.py's interface. Returns 0, -1 for another hd, -2 where Linux refuses AMX. */
int cogvx_int8_attention(int hd, int B, int H, int S, const void *q, const long *qst, const void *k,
                         const long *kst, const void *v, const long *vst, float *out, const long *ost, float scale,
                         int threads, int8_t *q8, float *qc, int32_t *qcorr, uint8_t *kp, float *ksc, uint16_t *vp,
                         const struct prep *pr) {
    if (!amx_ready()) return -2;
    return run_attention(hd, QR, PACK_OF(hd), TILE_OF(hd), configure, release, B, H, S, q, qst, k, kst, v, vst, out,
                         ost, scale, threads, q8, qc, qcorr, kp, ksc, vp, pr);
}
