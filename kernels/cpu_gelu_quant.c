/* GELU (tanh) of an int8 GEMM's output, quantized per row for the next int8 GEMM (the feed-forward's down
 * projection), in one pass over memory:
 *   y = acc[m, n] * s[m] + bias[n];  g = gelu_tanh(y) = y / (1 + e^(-2 u)), u = sqrt(2 / pi) (y + 0.044715 y^3)
 *   amax = max(max_n |g|, 1e-12);  q = clamp(round(g * (127 / amax)), -127, 127) + 128 (u8);  scale = amax / 127
 * e^x as 2^(x log2 e) with a quintic on the fraction (relative error 1e-7: fp32's own rounding). A row's g
 * is kept in a buffer between the max and the quantization (N <= 16384). bf16 input is widened with an
 * integer shift (no BF16 instructions). cpu_isa.py builds this file for AVX-512F (16 lanes; every AVX-512
 * variant) and for AVX2 + FMA (8 lanes, the same numbers: the same polynomial, round to nearest even). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define GELU_MAX_N 16384
#define LOG2E 1.4426950408889634f
#define C1 (-2.f * 0.7978845608028654f * LOG2E)
#define C3 (C1 * 0.044715f)
/* the quintic for 2^f, f in [0, 1) */
#define POLY(f) fmadd(fmadd(fmadd(fmadd(fmadd(set1(1.8671e-3f), f, set1(9.01709e-3f)), f, set1(5.579987e-2f)), f, \
                                    set1(2.4016446e-1f)), f, set1(6.9315131e-1f)), f, set1(1.f))

#ifdef __AVX512F__
#define W 16
typedef __m512 vf;
#define set1(x) _mm512_set1_ps(x)
#define fmadd _mm512_fmadd_ps
#define vmul _mm512_mul_ps
#define vadd _mm512_add_ps
#define vdiv _mm512_div_ps
#define vmax _mm512_max_ps
#define vloadu _mm512_loadu_ps
#define vstore _mm512_store_ps

/* 2^x for any x (clamped to [-126, 126]): a quintic on the fraction, then vscalefps. */
static inline vf exp2_any(vf x) {
    x = _mm512_min_ps(_mm512_max_ps(x, set1(-126.f)), set1(126.f));
    vf f = _mm512_sub_ps(x, _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
    return _mm512_scalef_ps(POLY(f), x);
}
static inline vf load_acc(const void *src, int bf16, long i) {
    if (!bf16) return _mm512_loadu_ps((const float *)src + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)src + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline vf vabs(vf x) { return _mm512_abs_ps(x); }
static inline float hmax(vf x) { return _mm512_reduce_max_ps(x); }
/* levels of 16 values (|x| <= 127.5 after the scale) -> q + 128 as 16 bytes */
static inline void store_levels(uint8_t *dst, vf x) {
    __m512i i = _mm512_cvtps_epi32(x);
    i = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(i, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127)),
                         _mm512_set1_epi32(128));
    _mm_storeu_si128((__m128i *)dst, _mm512_cvtusepi32_epi8(i));
}
#define STORE16(dst, g, inv) store_levels(dst, vmul(_mm512_load_ps(g), inv))
#else /* AVX2 + FMA */
#define W 8
typedef __m256 vf;
#define set1(x) _mm256_set1_ps(x)
#define fmadd _mm256_fmadd_ps
#define vmul _mm256_mul_ps
#define vadd _mm256_add_ps
#define vdiv _mm256_div_ps
#define vmax _mm256_max_ps
#define vloadu _mm256_loadu_ps
#define vstore _mm256_store_ps

/* 2^x as above; 2^floor(x) built in the exponent field (AVX2 has no vscalefps). */
static inline vf exp2_any(vf x) {
    x = _mm256_min_ps(_mm256_max_ps(x, set1(-126.f)), set1(126.f));
    vf fl = _mm256_floor_ps(x), f = _mm256_sub_ps(x, fl);
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fl), _mm256_set1_epi32(127)), 23);
    return vmul(POLY(f), _mm256_castsi256_ps(e));
}
static inline vf load_acc(const void *src, int bf16, long i) {
    if (!bf16) return _mm256_loadu_ps((const float *)src + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)src + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline vf vabs(vf x) { return _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))); }
static inline float hmax(vf x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}
static inline __m256i levels(vf x) {
    __m256i i = _mm256_cvtps_epi32(x);
    return _mm256_add_epi32(_mm256_min_epi32(_mm256_max_epi32(i, _mm256_set1_epi32(-127)), _mm256_set1_epi32(127)),
                            _mm256_set1_epi32(128));
}
/* 16 levels (two registers) -> 16 bytes: saturating packs are exact on [1, 255]; the permutes undo the
 * per-128-bit-lane order of the packs. */
static inline void store_levels(uint8_t *dst, vf a, vf b) {
    __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(levels(a), levels(b)), 0xD8);
    __m256i u = _mm256_permute4x64_epi64(_mm256_packus_epi16(w, w), 0xD8);
    _mm_storeu_si128((__m128i *)dst, _mm256_castsi256_si128(u));
}
#define STORE16(dst, g, inv) store_levels(dst, vmul(_mm256_load_ps(g), inv), vmul(_mm256_load_ps((g) + 8), inv))
#endif

/* acc [M, N] (bf16 when acc_bf16, else fp32), s [M], bias [N] or NULL -> q [M, N] u8, scale [M].
 * N a multiple of 16, at most GELU_MAX_N. Returns 0, or -1 for another N. */
int cogvx_gelu_quant(int M, int N, const void *acc, int acc_bf16, const float *s, const float *bias, uint8_t *q,
                     float *scale, int threads) {
    if (N % 16 || N > GELU_MAX_N) return -1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int m = 0; m < M; m++) {
        float g[GELU_MAX_N] __attribute__((aligned(64)));
        const vf sm = set1(s[m]), one = set1(1.f);
        vf mx = set1(0.f);
        for (int n = 0; n < N; n += W) {
            vf y = vmul(load_acc(acc, acc_bf16, (long)m * N + n), sm);
            if (bias) y = vadd(y, vloadu(bias + n));
            vf t = vmul(y, fmadd(vmul(y, y), set1(C3), set1(C1)));
            vf gv = vdiv(y, vadd(one, exp2_any(t)));
            vstore(g + n, gv);
            mx = vmax(mx, vabs(gv));
        }
        float amax = fmaxf(hmax(mx), 1e-12f);
        const vf inv = set1(127.f / amax);
        for (int n = 0; n < N; n += 16) STORE16(q + (long)m * N + n, g + n, inv);
        scale[m] = amax / 127.f;
    }
    return 0;
}
