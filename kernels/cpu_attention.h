/* What every build of the CPU int8 attention shares (cpu_kernels.c, cpu_attention_amx.c,
 * cpu_attention_avx2.c): the per-head-dimension instances and the one OpenMP driver.
 *
 * A build defines, before including this file, two always-inline functions with hd as their first
 * parameter:
 *   pack_head(hd, S, Sq, Sk, q, k, v, qscale, q8, qc, qcorr, kp, ksc, vp, prep): quantize and pack one
 *     head (q, k, v: struct src) into its workspaces (layouts: the build's own), reading rows by
 *     load_row() and q, k through prep_row();
 *   attend_tile(hd, S, Sk, r0, q8, qc, qcorr, kp, ksc, vp, out, os): query rows [r0, r0 + qt) of that
 *     head against its S keys, writing the rows < S of out (row stride os).
 * INSTANCE(16) INSTANCE(32) INSTANCE(64) then make one function of each per head dimension, hd a constant
 * in it (the loops unroll): the OpenMP region calls them through pointers, since a constant passed into
 * the region would be a runtime value there. run_attention() is the build's cogvx_int8_attention body.
 *
 * Workspaces (per head, heads = B * H; Sq = S rounded up to 32, Sk = S rounded up to 64): q8 Sq * hd
 * bytes, qc Sq floats, qcorr Sq ints, kp Sk * hd bytes, ksc Sk floats, vp Sk * hd uint16. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define HD_MAX 64 /* largest head dimension (16, 32 or 64) */
#define INLINE static inline __attribute__((always_inline))
#define LOG2E 1.4426950408889634f
#define SQ_ROUND 32 /* Sq and Sk as cpu_kernels.py sizes the workspaces */
#define SK_ROUND 64

/* One head of q, k or v as the caller holds it: rows at `stride` elements, fp32 or bf16, each row times a
 * per-token factor and plus a per-column bias where given (the int8 q/k/v projection's output before its
 * rescale: its bf16 GEMM result, the token scales, the bias), read by load_row(). */
struct src {
    const char *base;
    long stride;
    int bf16;
    const float *scale, *bias;
};

/* Row i as fp32: the caller's memory itself where it is fp32 with nothing to apply, else tmp. */
INLINE const float *load_row(const struct src *s, const int hd, int i, float *tmp) {
    if (!s->bf16 && !s->scale && !s->bias) return (const float *)s->base + (long)i * s->stride;
    const float f = s->scale ? s->scale[i] : 1.f;
    if (s->bf16) {
        const uint16_t *x = (const uint16_t *)s->base + (long)i * s->stride;
        uint32_t u[HD_MAX];
#pragma omp simd
        for (int d = 0; d < hd; d++) u[d] = (uint32_t)x[d] << 16;
        memcpy(tmp, u, (size_t)hd * 4);
    } else {
        memcpy(tmp, (const float *)s->base + (long)i * s->stride, (size_t)hd * 4);
    }
    if (s->bias) {
#pragma omp simd
        for (int d = 0; d < hd; d++) tmp[d] = tmp[d] * f + s->bias[d];
    } else {
#pragma omp simd
        for (int d = 0; d < hd; d++) tmp[d] *= f;
    }
    return tmp;
}

/* What comes with q, k, v (NULL: fp32 rows, nothing to apply). In: bf16 rows, the [B * S] token factors
 * (row_scale) and [H * hd] biases of q, k and v (each may be NULL), as struct src applies them. Then
 * (norm) what the attention module does to q and k before attending, done as the packing reads them:
 * per-head LayerNorm over hd with its affine (w, b may be NULL), then RoPE on the video rows
 * [n_text, n_text + n_rope) from the [n_rope, hd] fp32 tables (cos NULL: no RoPE). */
struct prep {
    int bf16;
    const float *row_scale, *bias[3];
    int norm;
    const float *qw, *qb, *kw, *kb, *cos, *sin;
    float eps;
    int n_text, n_rope;
};

/* Row `row` of q (is_k 0) or k (1) as the attention takes it: x itself without prep->norm, else normalized
 * (and rotated) into tmp (x may be tmp), in fp32 as torch's layer_norm (biased variance) and the RoPE
 * reference compute it. */
INLINE const float *prep_row(const struct prep *p, const int hd, const float *x, int row, int is_k, float *tmp) {
    if (!p || !p->norm) return x;
    const float *w = is_k ? p->kw : p->qw, *b = is_k ? p->kb : p->qb;
    float mean = 0.f, var = 0.f;
#pragma omp simd reduction(+ : mean)
    for (int d = 0; d < hd; d++) mean += x[d];
    mean /= hd;
#pragma omp simd reduction(+ : var)
    for (int d = 0; d < hd; d++) var += (x[d] - mean) * (x[d] - mean);
    const float r = 1.f / sqrtf(var / hd + p->eps);
#pragma omp simd
    for (int d = 0; d < hd; d++) tmp[d] = (x[d] - mean) * r * (w ? w[d] : 1.f) + (b ? b[d] : 0.f);
    const int vr = row - p->n_text;
    if (p->cos && vr >= 0 && vr < p->n_rope) {
        const float *c = p->cos + (long)vr * hd, *s = p->sin + (long)vr * hd;
        for (int d = 0; d < hd; d += 2) {
            const float x0 = tmp[d], x1 = tmp[d + 1];
            tmp[d] = x0 * c[d] - x1 * s[d];
            tmp[d + 1] = x1 * c[d + 1] + x0 * s[d + 1];
        }
    }
    return tmp;
}

typedef void (*pack_fn)(int, int, int, const struct src *, const struct src *, const struct src *, float, int8_t *,
                        float *, int32_t *, uint8_t *, float *, uint16_t *, const struct prep *);
typedef void (*tile_fn)(int, int, int, const int8_t *, const float *, const int32_t *, const uint8_t *, const float *,
                        const uint16_t *, float *, long);

#define INSTANCE(D)                                                                                                  \
    static void pack_head_##D(int S, int Sq, int Sk, const struct src *q, const struct src *k, const struct src *v,   \
                              float qscale, int8_t *q8, float *qc, int32_t *qcorr, uint8_t *kp, float *ksc,           \
                              uint16_t *vp, const struct prep *pr) {                                                  \
        pack_head(D, S, Sq, Sk, q, k, v, qscale, q8, qc, qcorr, kp, ksc, vp, pr);                                    \
    }                                                                                                                \
    static void attend_tile_##D(int S, int Sk, int r0, const int8_t *q8, const float *qc, const int32_t *qcorr,       \
                                const uint8_t *kp, const float *ksc, const uint16_t *vp, float *out, long os) {       \
        attend_tile(D, S, Sk, r0, q8, qc, qcorr, kp, ksc, vp, out, os);                                               \
    }

/* The instances for hd (0 for a head dimension the kernel does not take). */
#define PACK_OF(hd) ((hd) == 16 ? pack_head_16 : (hd) == 32 ? pack_head_32 : (hd) == 64 ? pack_head_64 : 0)
#define TILE_OF(hd) ((hd) == 16 ? attend_tile_16 : (hd) == 32 ? attend_tile_32 : (hd) == 64 ? attend_tile_64 : 0)

/* Head (b, h) of q, k or v (which: 0, 1, 2) at element strides st, with what prep applies to its rows. */
static struct src head_src(const void *base, const long *st, int which, int b, int h, int hd, int S,
                           const struct prep *pr) {
    const int bf = pr && pr->bf16;
    const struct src s = {(const char *)base + (b * st[0] + h * st[1]) * (bf ? 2 : 4), st[2], bf,
                          pr && pr->row_scale ? pr->row_scale + (long)b * S : 0,
                          pr && pr->bias[which] ? pr->bias[which] + (long)h * hd : 0};
    return s;
}

/* q, k, v: [B, H, S, hd] float32 at element strides (sb, sh, ss) each, last stride 1; out likewise. First
 * every head is packed, then tiles of qt query rows run, dynamically scheduled. begin / end (may be 0) run
 * on each thread around its tiles (AMX: the tile configuration). Returns 0, or -1 for another hd. */
static int run_attention(int hd, int qt, pack_fn pack, tile_fn tile_of, void (*begin)(int), void (*end)(void), int B,
                         int H, int S, const void *q, const long *qst, const void *k, const long *kst, const void *v,
                         const long *vst, float *out, const long *ost, float scale, int threads, int8_t *q8, float *qc,
                         int32_t *qcorr, uint8_t *kp, float *ksc, uint16_t *vp, const struct prep *pr) {
    if (!pack || !tile_of) return -1;
    const int Sq = (S + SQ_ROUND - 1) / SQ_ROUND * SQ_ROUND, Sk = (S + SK_ROUND - 1) / SK_ROUND * SK_ROUND;
    const int heads = B * H, tiles = Sq / qt;
    const float qscale = scale * LOG2E;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(dynamic, 1)
        for (int bh = 0; bh < heads; bh++) {
            int b = bh / H, h = bh % H;
            const struct src qs = head_src(q, qst, 0, b, h, hd, S, pr), ks = head_src(k, kst, 1, b, h, hd, S, pr),
                             vs = head_src(v, vst, 2, b, h, hd, S, pr);
            pack(S, Sq, Sk, &qs, &ks, &vs, qscale, q8 + (long)bh * Sq * hd, qc + (long)bh * Sq, qcorr + (long)bh * Sq,
                 kp + (long)bh * Sk * hd, ksc + (long)bh * Sk, vp + (long)bh * Sk * hd, pr);
        }
        if (begin) begin(hd);
#pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < (long)heads * tiles; t++) {
            int bh = (int)(t / tiles), tile = (int)(t % tiles), b = bh / H, h = bh % H;
            tile_of(S, Sk, tile * qt, q8 + (long)bh * Sq * hd, qc + (long)bh * Sq, qcorr + (long)bh * Sq,
                    kp + (long)bh * Sk * hd, ksc + (long)bh * Sk, vp + (long)bh * Sk * hd,
                    out + b * ost[0] + h * ost[1], ost[2]);
        }
        if (end) end();
    }
    return 0;
}

/* The entry point of a build (the interface cpu_kernels.py calls), its tiles qt query rows each. */
#define ENTRY_POINT(qt, begin, end)                                                                                 \
    int cogvx_int8_attention(int hd, int B, int H, int S, const void *q, const long *qst, const void *k,            \
                             const long *kst, const void *v, const long *vst, float *out, const long *ost,          \
                             float scale, int threads, int8_t *q8, float *qc, int32_t *qcorr, uint8_t *kp,          \
                             float *ksc, uint16_t *vp, const struct prep *pr) {                                     \
        return run_attention(hd, qt, PACK_OF(hd), TILE_OF(hd), begin, end, B, H, S, q, qst, k, kst, v, vst, out,    \
                             ost, scale, threads, q8, qc, qcorr, kp, ksc, vp, pr);                                  \
    }
