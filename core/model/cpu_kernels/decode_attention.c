/* Decode attention over the paged KV cache, in place (no gather). Queries, outputs and the
 * arithmetic are float32; the cache holds float32 or (kv_bf16) bfloat16, widened to float32
 * as it is read (a bfloat16 is the top half of a float32, so the widening is exact).
 *
 * One query token per request. Request i's keys are the slots
 * req_to_token[rows[i] * table_stride + t] for t < seq_lens[i]; its query and output are row
 * q_rows[i] of q / out ([T, num_heads, head_dim]). The cache is [slots, num_kv_heads, head_dim].
 * The G = num_heads / num_kv_heads query heads of a KV head share one pass over its keys and
 * values, so each key and value is read once per step. Work items (request, KV head) are
 * spread over the calling thread's OpenMP team (torch's own runtime: the library is loaded
 * into a process that already has torch's libgomp, whose soname it links against).
 *
 * With AVX2 and FMA, head sizes 64 and 128 take a vectorized path (decode_item_fast): keys in
 * chunks that stay in L1 for every query head of their KV head, eight keys per reduction in
 * eight independent accumulator chains, and the output rows accumulated in registers.
 *
 * Numerics: float32 throughout, softmax with the row maximum subtracted, the same operations as
 * the reference (scores = q.k * scale, p = exp(s - max) / sum, out = p.V) in a different
 * summation order.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* GCC/clang vector extensions: 8 floats (one AVX register, two SSE ones; the compiler
 * splits or joins them for the target). head_dim must be a multiple of 8 (the caller checks). */
typedef float vf __attribute__((vector_size(32)));
#define VL 8
#define CHUNK_FLOATS (32 * 128) /* the vectorized decode path's widened chunk: CHUNK keys x head size <= 128 */

static inline vf vload(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* Element i of a KV cache that holds float32 or (bf16) bfloat16, as float32. */
static inline float kv_at(const void *c, int64_t i, int bf16) {
    if (!bf16) return ((const float *)c)[i];
    const uint32_t bits = (uint32_t)((const uint16_t *)c)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* n elements of a KV cache from element i into dst as float32 (a copy for bfloat16 caches;
 * float32 ones are read in place by the callers). */
static inline void kv_row(const void *c, int64_t i, int64_t n, int bf16, float *restrict dst) {
    for (int64_t d = 0; d < n; d++) dst[d] = kv_at(c, i + d, bf16);
}

static inline float hsum(vf v) {
    float s = 0.0f;
    for (int l = 0; l < VL; l++) s += v[l];
    return s;
}

/* q.k for the G query heads of one KV head against one key, in G sums. */
static inline void dots(const float *restrict q, const float *restrict k, int64_t G, int64_t D, float *restrict s,
                        int64_t stride) {
    for (int64_t g = 0; g < G; g++) {
        const float *qg = q + g * D;
        vf a0 = {0}, a1 = {0};
        int64_t d = 0;
        for (; d + 2 * VL <= D; d += 2 * VL) {
            a0 += vload(qg + d) * vload(k + d);
            a1 += vload(qg + d + VL) * vload(k + d + VL);
        }
        for (; d < D; d += VL) a0 += vload(qg + d) * vload(k + d);
        s[g * stride] = hsum(a0 + a1);
    }
}

/* exp(x) for x <= 0 in plain arithmetic the compiler vectorizes (libm's expf is a call per
 * element): 2^n * p(r) with n = round(x / ln 2), r = x - n ln 2 in two parts (Cody-Waite) and
 * Cephes' degree-6 polynomial; within a few ulp of expf. Below -87 the result is 0. */
static inline float exp_nonpos(float x) {
    const float lo = -87.0f;
    const int under = x < lo;
    x = under ? lo : x;
    float fx = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - fx * 0.693359375f;
    r = r - fx * -2.12194440e-4f;
    float z = r * r;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * z + r + 1.0f;
    int32_t n = (int32_t)fx + 127;
    uint32_t bits = (uint32_t)n << 23;
    float pow2;
    memcpy(&pow2, &bits, sizeof pow2);
    return under ? 0.0f : y * pow2;
}

static inline void axpy(float *restrict y, float a, const float *restrict x, int64_t n) {
    const vf av = {a, a, a, a, a, a, a, a};
    for (int64_t i = 0; i < n; i += VL) vstore(y + i, vload(y + i) + av * vload(x + i));
}

typedef int32_t vi __attribute__((vector_size(32)));

static inline vf splat(float a) { return (vf){a, a, a, a, a, a, a, a}; }

/* exp_nonpos on 8 lanes at once (the same steps; round-to-nearest by the 1.5 * 2^23 trick
 * instead of floor(x + 0.5), which picks the same n but for exact halves). */
static inline vf vexp_nonpos(vf x) {
    const vf lo = splat(-87.0f);
    const vi under = x < lo;
    vi xi, loi;
    memcpy(&xi, &x, sizeof xi);
    memcpy(&loi, &lo, sizeof loi);
    xi = (xi & ~under) | (loi & under);
    memcpy(&x, &xi, sizeof x);
    const vf magic = splat(12582912.0f);
    vf fx = (x * splat(1.44269504088896341f) + magic) - magic;
    vf r = x - fx * splat(0.693359375f);
    r = r - fx * splat(-2.12194440e-4f);
    const vf z = r * r;
    vf y = splat(1.9875691500e-4f);
    y = y * r + splat(1.3981999507e-3f);
    y = y * r + splat(8.3334519073e-3f);
    y = y * r + splat(4.1665795894e-2f);
    y = y * r + splat(1.6666665459e-1f);
    y = y * r + splat(5.0000001201e-1f);
    y = y * z + r + splat(1.0f);
    vi n = __builtin_convertvector(fx, vi) + 127;
    n = n << 23;
    vf pow2;
    memcpy(&pow2, &n, sizeof pow2);
    y = y * pow2;
    vi yi;
    memcpy(&yi, &y, sizeof yi);
    yi &= ~under;
    memcpy(&y, &yi, sizeof y);
    return y;
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LS_FAST_DECODE 1

/* The 8 sums of r[0..7] (one per vector), as one vector. */
static inline __m256 reduce8(const __m256 *r) {
    __m256 a = _mm256_hadd_ps(r[0], r[1]), b = _mm256_hadd_ps(r[2], r[3]);
    __m256 c = _mm256_hadd_ps(r[4], r[5]), d = _mm256_hadd_ps(r[6], r[7]);
    a = _mm256_hadd_ps(a, b);
    c = _mm256_hadd_ps(c, d);
    return _mm256_add_ps(_mm256_permute2f128_ps(a, c, 0x20), _mm256_permute2f128_ps(a, c, 0x31));
}

/* Pointers to the D floats of KV head h for keys [tc, te) of a request (rows[t - tc]): into
 * the cache itself when it is float32; for a bfloat16 cache, into buf, where each row is
 * widened once (exact) and then serves every query head of the KV head from L1. */
static inline void chunk_rows(const void *cache, const int64_t *slots, int64_t tc, int64_t te, int64_t row,
                              int64_t h, const int NV, const int BF, float *buf, const float **rows) {
    const int64_t D = 8 * NV;
    for (int64_t t = tc; t < te; t++) {
        const int64_t e = slots[t] * row + h * D;
        if (!BF) {
            rows[t - tc] = (const float *)cache + e;
            continue;
        }
        float *dst = buf + (t - tc) * D;
        const uint16_t *src = (const uint16_t *)cache + e;
        for (int j = 0; j < NV; j++) {
            const __m128i x = _mm_loadu_si128((const __m128i *)(src + 8 * j));
            _mm256_storeu_ps(dst + 8 * j, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16)));
        }
        rows[t - tc] = dst;
    }
}

static inline float hsum256(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

#define CHUNK 32 /* keys per chunk: its keys (or values) of one KV head stay in L1 for every query head */
_Static_assert(CHUNK * 128 <= CHUNK_FLOATS, "the widened chunk must fit its buffer");

/* Prefetch the KV heads [h0, h1) of keys [t0, t1) (bytes [h0 * D, h1 * D) * esz of each slot's
 * row): the next chunk's, while this one is computed. The cache is read in page-sized runs of
 * slots at scattered places, one KV head's part of a row at a time, which the hardware
 * prefetchers follow poorly (measured: the kernel alone, 64 requests x 451 keys x 12 layers
 * on one thread, 71 -> 62 ms float32 and 72 -> 56 ms bfloat16). */
static inline void prefetch_rows(const void *cache, const int64_t *slots, int64_t t0, int64_t t1, int64_t row,
                                 int64_t h0, int64_t h1, int64_t D, size_t esz) {
    const int64_t bytes = (h1 - h0) * D * (int64_t)esz;
    for (int64_t t = t0; t < t1; t++) {
        const char *p = (const char *)cache + (slots[t] * row + h0 * D) * (int64_t)esz;
        for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 3);
    }
}

/* One request's KV heads [h0, h1) for head_dim = 8 * NV (NV a constant where it is called, so
 * the vectors below live in registers). Scores: per chunk of keys and per query head, eight
 * keys at a time in eight independent accumulator chains, reduced together; softmax
 * vectorized; values: per chunk and query head, the output row's NV vectors accumulate in
 * registers over the chunk's keys. Each key and value is read from memory once per step
 * (a bfloat16 one widened once per chunk and KV head, into buf: CHUNK x D floats). */
static inline void decode_item_fast(const int NV, const int BF, const float *qh, const void *k_cache,
                                    const void *v_cache, const int64_t *slots, int64_t row, int64_t len, int64_t h0,
                                    int64_t h1, int64_t G, float scale, float *scores, float *oh, float *buf) {
    const int64_t D = 8 * NV;
    const __m256 sc = _mm256_set1_ps(scale);
    const size_t esz = BF ? 2 : 4;
    const float *kr[CHUNK];
    prefetch_rows(k_cache, slots, 0, len < CHUNK ? len : CHUNK, row, h0, h1, D, esz);
    for (int64_t tc = 0; tc < len; tc += CHUNK) {
        const int64_t te = tc + CHUNK < len ? tc + CHUNK : len;
        prefetch_rows(k_cache, slots, te, te + CHUNK < len ? te + CHUNK : len, row, h0, h1, D, esz);
        for (int64_t h = h0; h < h1; h++) {
            chunk_rows(k_cache, slots, tc, te, row, h, NV, BF, buf, kr);
            const float *qk = qh + (h - h0) * G * D;
            float *sh = scores + (h - h0) * G * len;
            for (int64_t g = 0; g < G; g++) {
                __m256 qv[NV];
                for (int j = 0; j < NV; j++) qv[j] = _mm256_loadu_ps(qk + g * D + 8 * j);
                float *s = sh + g * len;
                int64_t t = tc;
                for (; t + 8 <= te; t += 8) {
                    const float *const *kp = kr + (t - tc);
                    __m256 r[8];
                    for (int u = 0; u < 8; u++) r[u] = _mm256_setzero_ps();
                    for (int j = 0; j < NV; j++)
                        for (int u = 0; u < 8; u++) r[u] = _mm256_fmadd_ps(qv[j], _mm256_loadu_ps(kp[u] + 8 * j), r[u]);
                    _mm256_storeu_ps(s + t, _mm256_mul_ps(reduce8(r), sc));
                }
                for (; t < te; t++) {
                    const float *kp = kr[t - tc];
                    __m256 a = _mm256_setzero_ps();
                    for (int j = 0; j < NV; j++) a = _mm256_fmadd_ps(qv[j], _mm256_loadu_ps(kp + 8 * j), a);
                    s[t] = hsum256(a) * scale;
                }
            }
        }
    }
    const int64_t nh = (h1 - h0) * G;
    prefetch_rows(v_cache, slots, 0, len < CHUNK ? len : CHUNK, row, h0, h1, D, esz);
    for (int64_t r = 0; r < nh; r++) {
        float *s = scores + r * len;
        __m256 mv = _mm256_set1_ps(-INFINITY);
        int64_t t = 0;
        for (; t + 8 <= len; t += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + t));
        float m = -INFINITY;
        for (int l = 0; l < 8; l++) m = mv[l] > m ? mv[l] : m;
        for (; t < len; t++) m = s[t] > m ? s[t] : m;
        const vf mm = splat(m);
        vf acc = splat(0.0f);
        t = 0;
        for (; t + 8 <= len; t += 8) {
            const vf e = vexp_nonpos(vload(s + t) - mm);
            vstore(s + t, e);
            acc += e;
        }
        float sum = hsum(acc);
        for (; t < len; t++) {
            s[t] = exp_nonpos(s[t] - m);
            sum += s[t];
        }
        const __m256 inv = _mm256_set1_ps(1.0f / sum);
        t = 0;
        for (; t + 8 <= len; t += 8) _mm256_storeu_ps(s + t, _mm256_mul_ps(_mm256_loadu_ps(s + t), inv));
        for (; t < len; t++) s[t] *= 1.0f / sum;
    }
    for (int64_t tc = 0; tc < len; tc += CHUNK) {
        const int64_t te = tc + CHUNK < len ? tc + CHUNK : len;
        prefetch_rows(v_cache, slots, te, te + CHUNK < len ? te + CHUNK : len, row, h0, h1, D, esz);
        for (int64_t h = h0; h < h1; h++) {
            chunk_rows(v_cache, slots, tc, te, row, h, NV, BF, buf, kr);
            for (int64_t g = 0; g < G; g++) {
                const int64_t r = (h - h0) * G + g;
                const float *s = scores + r * len;
                float *o = oh + r * D;
                __m256 acc[NV], acc2[NV];
                for (int j = 0; j < NV; j++) {
                    acc[j] = tc == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(o + 8 * j);
                    acc2[j] = _mm256_setzero_ps();
                }
                int64_t t = tc;
                for (; t + 2 <= te; t += 2) { /* two keys at a time: two independent chains */
                    const float *v0 = kr[t - tc], *v1 = kr[t + 1 - tc];
                    const __m256 p0 = _mm256_set1_ps(s[t]), p1 = _mm256_set1_ps(s[t + 1]);
                    for (int j = 0; j < NV; j++) {
                        acc[j] = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v0 + 8 * j), acc[j]);
                        acc2[j] = _mm256_fmadd_ps(p1, _mm256_loadu_ps(v1 + 8 * j), acc2[j]);
                    }
                }
                if (t < te) {
                    const float *v0 = kr[t - tc];
                    const __m256 p0 = _mm256_set1_ps(s[t]);
                    for (int j = 0; j < NV; j++) acc[j] = _mm256_fmadd_ps(p0, _mm256_loadu_ps(v0 + 8 * j), acc[j]);
                }
                for (int j = 0; j < NV; j++) _mm256_storeu_ps(o + 8 * j, _mm256_add_ps(acc[j], acc2[j]));
            }
        }
    }
}
#endif

int loopserve_decode_attention(
    const float *q, const void *k_cache, const void *v_cache,
    const int64_t *req_to_token, int64_t table_stride,
    const int64_t *rows, const int64_t *seq_lens, const int64_t *q_rows,
    float *out, int64_t num_reqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    float scale, int64_t max_len, int64_t kv_bf16)
{
    const int bf = kv_bf16 != 0;
    const int64_t G = num_heads / num_kv_heads;
    const int64_t row = num_kv_heads * head_dim; /* floats per slot in the cache */
    /* A work item is one request's KV heads [h0, h1): all of them when there are enough
     * requests to share out (a key's row, every KV head of one slot, is then read in one
     * sweep), else one each. */
    const int64_t split = num_reqs >= 8 ? 1 : num_kv_heads;
    const int64_t per = num_kv_heads / split;
    const int64_t items = num_reqs * split;
    int failed = 0;
#pragma omp parallel
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)(num_heads * (max_len > 0 ? max_len : 1)));
        float *acc = (float *)malloc(sizeof(float) * (size_t)(num_heads * head_dim));
        /* One slot's keys or values as float32 (bfloat16 caches, the generic path), or one
         * chunk of a KV head's (the vectorized path). */
        const int64_t nbuf = row > CHUNK_FLOATS ? row : CHUNK_FLOATS;
        float *kvrow = (float *)malloc(sizeof(float) * (size_t)nbuf);
        /* Every thread takes part in the loop (a worksharing loop must be met by all). */
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (scores == NULL || acc == NULL || kvrow == NULL) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            const int64_t i = it / split, h0 = (it % split) * per, h1 = h0 + per;
            const int64_t len = seq_lens[i];
            const int64_t nh = (h1 - h0) * G; /* query heads of this item */
            const int64_t *slots = req_to_token + rows[i] * table_stride;
            const int64_t qr = q_rows ? q_rows[i] : i;
            const float *qh = q + (qr * num_heads + h0 * G) * head_dim;
            float *oh = out + (qr * num_heads + h0 * G) * head_dim;
#ifdef LS_FAST_DECODE
            if (head_dim == 64 || head_dim == 128) {
                /* Constant arguments: each combination inlines into its own specialized loop. */
                if (head_dim == 64 && !bf)
                    decode_item_fast(8, 0, qh, k_cache, v_cache, slots, row, len, h0, h1, G, scale, scores, oh, kvrow);
                else if (head_dim == 64)
                    decode_item_fast(8, 1, qh, k_cache, v_cache, slots, row, len, h0, h1, G, scale, scores, oh, kvrow);
                else if (!bf)
                    decode_item_fast(16, 0, qh, k_cache, v_cache, slots, row, len, h0, h1, G, scale, scores, oh, kvrow);
                else
                    decode_item_fast(16, 1, qh, k_cache, v_cache, slots, row, len, h0, h1, G, scale, scores, oh, kvrow);
                continue;
            }
#endif
            const size_t esz = bf ? 2 : 4;
            for (int64_t t = 0; t < len; t++) {
                if (t + 4 < len) __builtin_prefetch((const char *)k_cache + (slots[t + 4] * row + h0 * head_dim) * esz);
                const float *kp = (const float *)k_cache + slots[t] * row;
                if (bf) {
                    kv_row(k_cache, slots[t] * row, row, 1, kvrow);
                    kp = kvrow;
                }
                for (int64_t h = h0; h < h1; h++)
                    dots(qh + (h - h0) * G * head_dim, kp + h * head_dim, G, head_dim, scores + (h - h0) * G * len + t, len);
            }
            for (int64_t r = 0; r < nh; r++) {
                float *s = scores + r * len;
                float m = -INFINITY;
                for (int64_t t = 0; t < len; t++) s[t] *= scale;
                for (int64_t t = 0; t < len; t++) m = s[t] > m ? s[t] : m;
                float sum = 0.0f;
                for (int64_t t = 0; t < len; t++) s[t] = exp_nonpos(s[t] - m);
                for (int64_t t = 0; t < len; t++) sum += s[t];
                const float inv = 1.0f / sum;
                for (int64_t t = 0; t < len; t++) s[t] *= inv;
            }
            memset(acc, 0, sizeof(float) * (size_t)(nh * head_dim));
            for (int64_t t = 0; t < len; t++) {
                if (t + 4 < len) __builtin_prefetch((const char *)v_cache + (slots[t + 4] * row + h0 * head_dim) * esz);
                const float *vp = (const float *)v_cache + slots[t] * row;
                if (bf) {
                    kv_row(v_cache, slots[t] * row, row, 1, kvrow);
                    vp = kvrow;
                }
                for (int64_t h = h0; h < h1; h++)
                    for (int64_t g = 0; g < G; g++) {
                        const int64_t r = (h - h0) * G + g;
                        axpy(acc + r * head_dim, scores[r * len + t], vp + h * head_dim, head_dim);
                    }
            }
            memcpy(oh, acc, sizeof(float) * (size_t)(nh * head_dim));
        }
        free(scores);
        free(acc);
        free(kvrow);
    }
    return failed ? -1 : 0;
}

/* Prefill (extend) attention over the paged KV cache (float32 arithmetic; the cache float32 or
 * kv_bf16, widened when the keys and values are copied into the work item's blocks): request i has ext[i] new tokens
 * at positions prefix[i] .. prefix[i] + ext[i] - 1 (rows starts[i] .. of q / out, [T, num_heads,
 * head_dim]), and its keys and values are the slots req_to_token[rows[i] * table_stride + t] for
 * t < prefix[i] + ext[i] (this pass's already stored). Causal: the token at position p sees keys
 * 0 .. p. One work item is one (request, KV head, a chunk of its new tokens): the keys it sees are
 * copied once into a transposed block (and the values into a dense one), then the G query
 * heads of that KV head, for each of its tokens, take scores against them in register tiles
 * (8 query rows x 16 keys) and the weighted sum of values in tiles of 8 rows x 16 dims: the
 * two products run at GEMM-like speed instead of one dot product at a time. Scores use the row
 * maximum, as the decode kernel. */
#define RB 8
#define CB 16


int loopserve_extend_attention(
    const float *q, const void *k_cache, const void *v_cache,
    const int64_t *req_to_token, int64_t table_stride,
    const int64_t *rows, const int64_t *prefix, const int64_t *ext, const int64_t *starts,
    float *out, int64_t num_reqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    float scale, int64_t max_len, int64_t kv_bf16)
{
    const int bf = kv_bf16 != 0;
    const int64_t G = num_heads / num_kv_heads, D = head_dim;
    const int64_t row = num_kv_heads * head_dim;
    const int64_t ld = (max_len + CB - 1) / CB * CB; /* columns of the transposed keys and scores */
    /* Work items: (request, KV head, up to qc new tokens). Whole requests when there are
     * enough (request, KV head) pairs to keep the team busy (each chunk copies the keys it sees
     * again); else chunks, so one long prompt also spreads over the team. item_start[i] is
     * request i's first item. */
    const int64_t pairs = num_reqs * num_kv_heads, team = omp_get_max_threads();
    int64_t max_ext = 1;
    for (int64_t i = 0; i < num_reqs; i++) max_ext = ext[i] > max_ext ? ext[i] : max_ext;
    int64_t qc = max_ext;
    if (pairs < 2 * team) {
        const int64_t want = (2 * team + pairs - 1) / pairs;
        qc = (max_ext + want - 1) / want;
        qc = qc < 32 ? 32 : qc;
    }
    int64_t *item_start = (int64_t *)malloc(sizeof(int64_t) * (size_t)(num_reqs + 1));
    if (item_start == NULL) return -1;
    item_start[0] = 0;
    for (int64_t i = 0; i < num_reqs; i++)
        item_start[i + 1] = item_start[i] + num_kv_heads * ((ext[i] + qc - 1) / qc);
    const int64_t items = item_start[num_reqs];
    int failed = 0;
#pragma omp parallel
    {
        float *kt = (float *)calloc((size_t)(D * ld), sizeof(float));
        float *vv = (float *)malloc(sizeof(float) * (size_t)(ld * D));
        float *sc = (float *)malloc(sizeof(float) * (size_t)(RB * ld));
        float *acc = (float *)malloc(sizeof(float) * (size_t)(RB * D));
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (!kt || !vv || !sc || !acc) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            int64_t i = 0;
            while (item_start[i + 1] <= it) i++; /* few requests per pass: a linear search */
            const int64_t local = it - item_start[i], h = local % num_kv_heads, chunk = local / num_kv_heads;
            const int64_t t0 = chunk * qc, t1 = ext[i] - t0 < qc ? ext[i] : t0 + qc; /* new tokens [t0, t1) */
            const int64_t len = prefix[i] + t1; /* keys the chunk's last token sees */
            const int64_t lenp = (len + CB - 1) / CB * CB;
            const int64_t *slots = req_to_token + rows[i] * table_stride;
            if (bf) {
                for (int64_t t = 0; t < len; t++) {
                    const int64_t e = slots[t] * row + h * D;
                    for (int64_t d = 0; d < D; d++) kt[d * ld + t] = kv_at(k_cache, e + d, 1);
                    kv_row(v_cache, e, D, 1, vv + t * D);
                }
            } else {
                for (int64_t t = 0; t < len; t++) {
                    const float *kp = (const float *)k_cache + slots[t] * row + h * D;
                    const float *vp = (const float *)v_cache + slots[t] * row + h * D;
                    for (int64_t d = 0; d < D; d++) kt[d * ld + t] = kp[d];
                    memcpy(vv + t * D, vp, sizeof(float) * (size_t)D);
                }
            }
            for (int64_t t = len; t < lenp; t++) {
                for (int64_t d = 0; d < D; d++) kt[d * ld + t] = 0.0f;
                memset(vv + t * D, 0, sizeof(float) * (size_t)D);
            }
            const int64_t nrows = t1 * G; /* row r: new token r / G, query head h * G + r % G */
            for (int64_t r0 = t0 * G; r0 < nrows; r0 += RB) {
                const int64_t nr = nrows - r0 < RB ? nrows - r0 : RB;
                const float *qr[RB];
                int64_t vis[RB]; /* keys row r sees */
                for (int64_t r = 0; r < RB; r++) {
                    const int64_t rr = r0 + (r < nr ? r : nr - 1);
                    const int64_t tok = starts[i] + rr / G;
                    qr[r] = q + (tok * num_heads + h * G + rr % G) * D;
                    vis[r] = prefix[i] + rr / G + 1;
                }
                const int64_t cols = (vis[nr - 1] + CB - 1) / CB * CB;
                for (int64_t c = 0; c < cols; c += CB) {
                    vf a[RB][2];
                    for (int r = 0; r < RB; r++) a[r][0] = a[r][1] = splat(0.0f);
                    for (int64_t d = 0; d < D; d++) {
                        const vf k0 = vload(kt + d * ld + c), k1 = vload(kt + d * ld + c + VL);
                        for (int r = 0; r < RB; r++) {
                            const vf qb = splat(qr[r][d]);
                            a[r][0] += qb * k0;
                            a[r][1] += qb * k1;
                        }
                    }
                    for (int r = 0; r < RB; r++) {
                        vstore(sc + r * ld + c, a[r][0]);
                        vstore(sc + r * ld + c + VL, a[r][1]);
                    }
                }
                for (int64_t r = 0; r < nr; r++) {
                    /* Loops the compiler vectorizes (a reduction in the same loop as exp would
                     * keep it scalar): scale, mask, lane-wise max, exp, lane-wise sum. */
                    float *s = sc + r * ld;
                    const int64_t n = vis[r];
                    for (int64_t t = 0; t < n; t++) s[t] *= scale;
                    for (int64_t t = n; t < cols; t++) s[t] = -INFINITY;
                    float mx[VL];
                    for (int l = 0; l < VL; l++) mx[l] = -INFINITY;
                    for (int64_t t = 0; t < cols; t += VL)
                        for (int l = 0; l < VL; l++) mx[l] = s[t + l] > mx[l] ? s[t + l] : mx[l];
                    float m = mx[0];
                    for (int l = 1; l < VL; l++) m = mx[l] > m ? mx[l] : m;
                    vf sv = splat(0.0f);
                    const vf mv = splat(m);
                    for (int64_t t = 0; t < cols; t += VL) {
                        const vf e = vexp_nonpos(vload(s + t) - mv);
                        vstore(s + t, e);
                        sv += e;
                    }
                    const float inv = 1.0f / hsum(sv);
                    for (int64_t t = 0; t < cols; t++) s[t] *= inv;
                }
                for (int64_t r = nr; r < RB; r++) memset(sc + r * ld, 0, sizeof(float) * (size_t)cols);
                for (int64_t d0 = 0; d0 < D; d0 += 2 * VL) {
                    const int64_t dw = D - d0 < 2 * VL ? D - d0 : 2 * VL; /* a multiple of VL */
                    vf o[RB][2];
                    for (int r = 0; r < RB; r++) o[r][0] = o[r][1] = splat(0.0f);
                    if (dw == 2 * VL) {
                        for (int64_t t = 0; t < cols; t++) {
                            const float *vt = vv + t * D + d0;
                            const vf v0 = vload(vt), v1 = vload(vt + VL);
                            for (int r = 0; r < RB; r++) {
                                const vf p = splat(sc[r * ld + t]);
                                o[r][0] += p * v0;
                                o[r][1] += p * v1;
                            }
                        }
                    } else {
                        for (int64_t t = 0; t < cols; t++) {
                            const vf v0 = vload(vv + t * D + d0);
                            for (int r = 0; r < RB; r++) o[r][0] += splat(sc[r * ld + t]) * v0;
                        }
                    }
                    for (int64_t r = 0; r < nr; r++)
                        for (int64_t u = 0; u < dw / VL; u++) vstore(acc + r * D + d0 + u * VL, o[r][u]);
                }
                for (int64_t r = 0; r < nr; r++) {
                    const int64_t rr = r0 + r, tok = starts[i] + rr / G;
                    memcpy(out + (tok * num_heads + h * G + rr % G) * D, acc + r * D, sizeof(float) * (size_t)D);
                }
            }
        }
        free(kt);
        free(vv);
        free(sc);
        free(acc);
    }
    free(item_start);
    return failed ? -1 : 0;
}

/* ---- Elementwise kernels of a decoder layer (model.cpu_fused_ops), float32, one pass each
 * over rows of a [T, H] tensor instead of the five to eight torch ops they replace. Rows are
 * spread over the OpenMP team when there are enough of them. */

#define LS_PAR_MIN (1 << 15) /* elements below which a call stays on one thread */

/* RMSNorm as transformers' LlamaRMSNorm: out = w * (x * (1 / sqrt(mean(x^2) + eps))). With
 * res, x + res is written to total first and normalized (the residual add before a norm). The
 * sum of squares runs in 8 lanes, so its rounding differs from torch's reduction order. */
void loopserve_rmsnorm_f32(const float *x, const float *res, const float *w, float *out, float *total,
                           int64_t T, int64_t H, float eps)
{
#pragma omp parallel for schedule(static) if (T * H >= LS_PAR_MIN)
    for (int64_t t = 0; t < T; t++) {
        const float *src = x + t * H;
        if (res != NULL) {
            float *tr = total + t * H;
            const float *rr = res + t * H;
            for (int64_t h = 0; h < H; h++) tr[h] = src[h] + rr[h];
            src = tr;
        }
        vf acc = splat(0.0f);
        int64_t h = 0;
        for (; h + VL <= H; h += VL) {
            const vf v = vload(src + h);
            acc += v * v;
        }
        float ss = hsum(acc);
        for (; h < H; h++) ss += src[h] * src[h];
        const float r = 1.0f / sqrtf(ss / (float)H + eps);
        float *o = out + t * H;
        for (h = 0; h < H; h++) o[h] = w[h] * (src[h] * r);
    }
}

static inline vf vsel(vi mask, vf a, vf b) { /* a where mask, else b */
    vi ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    ai = (ai & mask) | (bi & ~mask);
    memcpy(&a, &ai, sizeof a);
    return a;
}

/* out = silu(g) * u, silu(x) = x / (1 + exp(-x)) (exp of a non-positive argument only:
 * x * sigmoid(x) with sigmoid from exp(-|x|)). */
void loopserve_silu_mul_f32(const float *g, const float *u, float *out, int64_t n)
{
#pragma omp parallel for schedule(static) if (n >= LS_PAR_MIN)
    for (int64_t b = 0; b < (n + 1023) / 1024; b++) {
        const int64_t end = (b + 1) * 1024 < n ? (b + 1) * 1024 : n;
        int64_t i = b * 1024;
        for (; i + VL <= end; i += VL) {
            const vf x = vload(g + i);
            const vi neg = x < splat(0.0f);
            const vf e = vexp_nonpos(vsel(neg, x, -x)); /* exp(-|x|) */
            const vf one = splat(1.0f);
            const vf sig = vsel(neg, e, one) / (one + e);
            vstore(out + i, (x * sig) * vload(u + i));
        }
        for (; i < end; i++) {
            const float x = g[i];
            const float e = exp_nonpos(x < 0.0f ? x : -x);
            const float sig = x < 0.0f ? e / (1.0f + e) : 1.0f / (1.0f + e);
            out[i] = (x * sig) * u[i];
        }
    }
}

/* Rotary embedding in place, as transformers' apply_rotary_pos_emb: x = x * cos +
 * rotate_half(x) * sin for every head of every row (x: [T, row_stride], heads of D at the
 * start of each row; cos, sin: [T, D]). Products are rounded before they are added (no fused
 * multiply-add), so the result equals torch's expression bit for bit. */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
void loopserve_rope_f32(float *x, int64_t T, int64_t heads, int64_t D, int64_t row_stride,
                        const float *cos, const float *sin)
{
    const int64_t half = D / 2;
#pragma omp parallel for schedule(static) if (T * heads * D >= LS_PAR_MIN)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos + t * D, *s = sin + t * D;
        for (int64_t h = 0; h < heads; h++) {
            float *p = x + t * row_stride + h * D;
            for (int64_t d = 0; d < half; d++) {
                const float a = p[d], b = p[d + half];
                const float lo = a * c[d] - b * s[d];
                const float hi = b * c[d + half] + a * s[d + half];
                p[d] = lo;
                p[d + half] = hi;
            }
        }
    }
}
#pragma GCC pop_options

/* ---- The same elementwise kernels for bfloat16 tensors. Each rounds to bfloat16 exactly
 * where torch's bfloat16 expression of the op does (every torch op on bfloat16 computes in
 * float32 and rounds its result), so rotary equals it bit for bit, and RMSNorm and SiLU x up
 * differ from it only where its float32 reduction or exp differs in the last float32 bit
 * and that bit decides a bfloat16 rounding. */

static inline float bf_f(uint16_t b) {
    const uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* float32 -> bfloat16, round to nearest even; a NaN stays a (quiet) NaN, as torch's. */
static inline uint16_t f_bf(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float rbf(float f) { return bf_f(f_bf(f)); } /* rounded to bfloat16, as float */

#if defined(__AVX2__) && defined(__FMA__)
#define LS_BF16_VEC 1
static inline __m256 bf8_load(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* f_bf on 8 lanes: int32 lanes holding the bfloat16 bits. */
static inline __m256i bf8_bits(__m256 f) {
    const __m256i u = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256 nan = _mm256_cmp_ps(f, f, _CMP_UNORD_Q);
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
}

static inline __m256 bf8_round(__m256 f) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf8_bits(f), 16)); }

static inline void bf8_store(uint16_t *p, __m256 f) {
    const __m256i r = bf8_bits(f);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(packed));
}
#endif

/* RMSNorm as RMSNorm.forward in bfloat16: y = x * (1 / sqrt(mean(x^2) + eps)) in float32,
 * rounded, then w * y rounded; with res, total = x + res (rounded) is normalized. */
void loopserve_rmsnorm_bf16(const uint16_t *x, const uint16_t *res, const uint16_t *w, uint16_t *out,
                            uint16_t *total, int64_t T, int64_t H, float eps)
{
#pragma omp parallel for schedule(static) if (T * H >= LS_PAR_MIN)
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *src = x + t * H;
        int64_t h = 0;
        if (res != NULL) {
            uint16_t *tr = total + t * H;
            const uint16_t *rr = res + t * H;
#ifdef LS_BF16_VEC
            for (; h + 8 <= H; h += 8) bf8_store(tr + h, _mm256_add_ps(bf8_load(src + h), bf8_load(rr + h)));
#endif
            for (; h < H; h++) tr[h] = f_bf(bf_f(src[h]) + bf_f(rr[h]));
            src = tr;
        }
        float ss = 0.0f;
        h = 0;
#ifdef LS_BF16_VEC
        __m256 acc = _mm256_setzero_ps();
        for (; h + 8 <= H; h += 8) {
            const __m256 v = bf8_load(src + h);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        ss = hsum256(acc);
#endif
        for (; h < H; h++) ss += bf_f(src[h]) * bf_f(src[h]);
        const float r = 1.0f / sqrtf(ss / (float)H + eps);
        uint16_t *o = out + t * H;
        h = 0;
#ifdef LS_BF16_VEC
        const __m256 rv = _mm256_set1_ps(r);
        for (; h + 8 <= H; h += 8)
            bf8_store(o + h, _mm256_mul_ps(bf8_load(w + h), bf8_round(_mm256_mul_ps(bf8_load(src + h), rv))));
#endif
        for (; h < H; h++) o[h] = f_bf(bf_f(w[h]) * rbf(bf_f(src[h]) * r));
    }
}

/* out = silu(g) * u in bfloat16: silu rounded, then the product rounded. */
void loopserve_silu_mul_bf16(const uint16_t *g, const uint16_t *u, uint16_t *out, int64_t n)
{
#pragma omp parallel for schedule(static) if (n >= LS_PAR_MIN)
    for (int64_t b = 0; b < (n + 1023) / 1024; b++) {
        const int64_t end = (b + 1) * 1024 < n ? (b + 1) * 1024 : n;
        int64_t i = b * 1024;
#ifdef LS_BF16_VEC
        for (; i + 8 <= end; i += 8) {
            const vf x = bf8_load(g + i); /* __m256 and vf: both 8 floats */
            const vi neg = x < splat(0.0f);
            const vf e = vexp_nonpos(vsel(neg, x, -x)); /* exp(-|x|) */
            const vf one = splat(1.0f);
            const vf sig = vsel(neg, e, one) / (one + e);
            bf8_store(out + i, _mm256_mul_ps(bf8_round(x * sig), bf8_load(u + i)));
        }
#endif
        for (; i < end; i++) {
            const float x = bf_f(g[i]);
            const float e = exp_nonpos(x < 0.0f ? x : -x);
            const float sig = x < 0.0f ? e / (1.0f + e) : 1.0f / (1.0f + e);
            out[i] = f_bf(rbf(x * sig) * bf_f(u[i]));
        }
    }
}

/* Rotary embedding in place on bfloat16 rows, as (x * cos) + (rotate_half(x) * sin) in
 * bfloat16: each product rounded, then the sum rounded. cos, sin: [T, D] bfloat16. */
void loopserve_rope_bf16(uint16_t *x, int64_t T, int64_t heads, int64_t D, int64_t row_stride,
                         const uint16_t *cos, const uint16_t *sin)
{
    const int64_t half = D / 2;
#pragma omp parallel for schedule(static) if (T * heads * D >= LS_PAR_MIN)
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *c = cos + t * D, *s = sin + t * D;
        for (int64_t h = 0; h < heads; h++) {
            uint16_t *p = x + t * row_stride + h * D;
            int64_t d = 0;
#ifdef LS_BF16_VEC
            for (; d + 8 <= half; d += 8) {
                const __m256 a = bf8_load(p + d), b = bf8_load(p + d + half);
                const __m256 lo = _mm256_sub_ps(bf8_round(_mm256_mul_ps(a, bf8_load(c + d))),
                                                bf8_round(_mm256_mul_ps(b, bf8_load(s + d))));
                const __m256 hi = _mm256_add_ps(bf8_round(_mm256_mul_ps(b, bf8_load(c + d + half))),
                                                bf8_round(_mm256_mul_ps(a, bf8_load(s + d + half))));
                bf8_store(p + d, lo);
                bf8_store(p + d + half, hi);
            }
#endif
            for (; d < half; d++) {
                const float a = bf_f(p[d]), b = bf_f(p[d + half]);
                const float lo = rbf(a * bf_f(c[d])) + rbf(-b * bf_f(s[d]));
                const float hi = rbf(b * bf_f(c[d + half])) + rbf(a * bf_f(s[d + half]));
                p[d] = f_bf(lo);
                p[d + half] = f_bf(hi);
            }
        }
    }
}
