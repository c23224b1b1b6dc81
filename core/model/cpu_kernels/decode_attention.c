/* Decode attention over the paged KV cache, in place (no gather), float32.
 *
 * One query token per request. Request i's keys are the slots
 * req_to_token[rows[i] * table_stride + t] for t < seq_lens[i]; its query and output are row
 * q_rows[i] of q / out ([T, num_heads, head_dim]). The cache is [slots, num_kv_heads, head_dim].
 * The G = num_heads / num_kv_heads query heads of a KV head share one pass over its keys and
 * values, so each key and value is read once per step. Work items (request, KV head) are
 * spread over the calling thread's OpenMP team (torch's own runtime: the library is loaded
 * into a process that already has torch's libgomp, whose soname it links against).
 *
 * Numerics: float32 throughout, softmax with the row maximum subtracted, the same operations as
 * the reference (scores = q.k * scale, p = exp(s - max) / sum, out = p.V) in a different
 * summation order.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* GCC/clang vector extensions: 8 floats (one AVX register, two SSE ones; the compiler
 * splits or joins them for the target). head_dim must be a multiple of 8 (the caller checks). */
typedef float vf __attribute__((vector_size(32)));
#define VL 8

static inline vf vload(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

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

int loopserve_decode_attention_f32(
    const float *q, const float *k_cache, const float *v_cache,
    const int64_t *req_to_token, int64_t table_stride,
    const int64_t *rows, const int64_t *seq_lens, const int64_t *q_rows,
    float *out, int64_t num_reqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
    float scale, int64_t max_len)
{
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
        /* Every thread takes part in the loop (a worksharing loop must be met by all). */
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (scores == NULL || acc == NULL) {
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
            for (int64_t t = 0; t < len; t++) {
                if (t + 4 < len) __builtin_prefetch(k_cache + slots[t + 4] * row + h0 * head_dim);
                const float *kp = k_cache + slots[t] * row;
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
                if (t + 4 < len) __builtin_prefetch(v_cache + slots[t + 4] * row + h0 * head_dim);
                const float *vp = v_cache + slots[t] * row;
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
    }
    return failed ? -1 : 0;
}
