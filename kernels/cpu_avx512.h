/* AVX-512 helpers of the int8 attention builds (cpu_kernels.c, cpu_attention_amx.c); after cpu_attention.h. */
#include <immintrin.h>
#include <stdint.h>

/* 2^x for finite x of either sign: a cubic on the fraction (exact at 0, so a row's largest p is 1), then
 * vscalefps multiplies by 2^floor(x) (it floors its second operand itself). Relative error below 9e-5,
 * under the bf16 rounding that p gets for the p v product. */
static inline __m512 exp2_finite(__m512 x) {
    __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); /* x - floor(x) */
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(0.07706306f), f, _mm512_set1_ps(0.22764935f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69511581f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, x);
}

/* 2^x for x <= 0, x possibly -inf (a masked key): exp2_finite of x clamped to -127. */
static inline __m512 exp2_neg(__m512 x) { return exp2_finite(_mm512_max_ps(x, _mm512_set1_ps(-127.f))); }

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

/* Row i of q as int8 per token (round half to even of x * 127 / amax) into dst (hd bytes); *sum (where
 * given) gets the sum of the int8 values. Returns the row's scale amax / 127. */
INLINE float query_int8(const int hd, const struct src *q, const struct prep *pr, int i, int8_t *dst, int32_t *sum) {
    float tmp[HD_MAX];
    const float *x = prep_row(pr, hd, load_row(q, hd, i, tmp), i, 0, tmp);
    __m512 m = _mm512_abs_ps(_mm512_loadu_ps(x));
    for (int c = 16; c < hd; c += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + c)));
    const float amax = _mm512_reduce_max_ps(m);
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m512i acc = _mm512_setzero_si512();
    for (int c = 0; c < hd; c += 16) acc = _mm512_add_epi32(acc, quant16(x + c, inv, dst + c));
    if (sum) *sum = _mm512_reduce_add_epi32(acc);
    return amax / 127.f;
}

/* The mean of the head's S keys (the smoothing), into mean[hd / 16]. */
INLINE void key_mean(const int hd, int S, const struct src *k, const struct prep *pr, __m512 *mean) {
    for (int c = 0; c < hd / 16; c++) mean[c] = _mm512_setzero_ps();
    for (int j = 0; j < S; j++) {
        float tmp[HD_MAX];
        const float *x = prep_row(pr, hd, load_row(k, hd, j, tmp), j, 1, tmp);
        for (int c = 0; c < hd / 16; c++) mean[c] = _mm512_add_ps(mean[c], _mm512_loadu_ps(x + 16 * c));
    }
    for (int c = 0; c < hd / 16; c++) mean[c] = _mm512_mul_ps(mean[c], _mm512_set1_ps(1.f / S));
}

/* Key j minus the mean, as int8 per token into dst (hd bytes). Returns its scale amax / 127. */
INLINE float key_int8(const int hd, const struct src *k, const struct prep *pr, int j, const __m512 *mean,
                      int8_t *dst) {
    float tmp[HD_MAX], row[HD_MAX];
    const float *x = prep_row(pr, hd, load_row(k, hd, j, tmp), j, 1, tmp);
    __m512 m = _mm512_setzero_ps();
    for (int c = 0; c < hd / 16; c++) {
        __m512 y = _mm512_sub_ps(_mm512_loadu_ps(x + 16 * c), mean[c]);
        _mm512_storeu_ps(row + 16 * c, y);
        m = _mm512_max_ps(m, _mm512_abs_ps(y));
    }
    const float amax = _mm512_reduce_max_ps(m);
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    for (int c = 0; c < hd; c += 16) quant16(row + c, inv, dst + c);
    return amax / 127.f;
}
