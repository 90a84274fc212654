// The small per-token operations of a transformer layer, fused so a decode step makes a few
// calls instead of dozens of tiny torch ops (each costs microseconds of dispatch on CPU).
// Same arithmetic as the torch versions in duskpool/models/ops.py, up to summation order.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"

// exp(x) for x <= 0 (softmax after subtracting the max), branch-free so loops over it vectorize:
// 2^(x log2 e) split into 2^n (exponent bits) and 2^f by a degree-6 polynomial, rel. error ~2e-7.
static inline float exp_nonpositive(float x) {
    float t = x * 1.44269504088896341f;
    t = t < -126.0f ? -126.0f : t;
    float n = floorf(t), f = t - n;
    float p = 1.5353362e-4f;
    p = p * f + 1.3398874e-3f;
    p = p * f + 9.6182050e-3f;
    p = p * f + 5.5503406e-2f;
    p = p * f + 2.4022652e-1f;
    p = p * f + 6.9314720e-1f;
    p = p * f + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale; memcpy(&scale, &bits, 4);
    return p * scale;
}

// out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, for T rows of D
void dp_rms_norm(const float *restrict x, const float *restrict w, float eps, float *restrict out,
                 int64_t T, int64_t D) {
    for (int64_t t = 0; t < T; t++, x += D, out += D) {
        float ss = 0.0f;
        for (int64_t i = 0; i < D; i++) ss += x[i] * x[i];
        float scale = 1.0f / sqrtf(ss / (float)D + eps);
        for (int64_t i = 0; i < D; i++) out[i] = x[i] * scale * w[i];
    }
}

// Rotate adjacent pairs of `heads` heads of size d in each of T rows (row stride ld), in place,
// by the angles whose cos/sin are given per row: cos, sin [T, d/2].
void dp_rope(float *x, int64_t T, int64_t heads, int64_t d, int64_t ld,
             const float *restrict cos, const float *restrict sin) {
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos + t * (d / 2), *s = sin + t * (d / 2);
        for (int64_t h = 0; h < heads; h++) {
            float *p = x + t * ld + h * d;
            for (int64_t i = 0; i < d / 2; i++) {
                float a = p[2 * i], b = p[2 * i + 1];
                p[2 * i] = a * c[i] - b * s[i];
                p[2 * i + 1] = a * s[i] + b * c[i];
            }
        }
    }
}

// Causal attention of T queries at positions start..start+T-1 over the first start+T keys of k, v
// [Hk, capacity, d]; with window > 0 a query at p sees only positions p - window + 1..p. q, out: [T, H, d]
// (row stride ldq / ldo); query head h reads kv head h / (H / Hk). scores: scratch of start+T floats.
static void attend(const float *restrict q, int64_t ldq, const float *restrict k, const float *restrict v,
                   int64_t capacity, float *restrict out, int64_t ldo, int64_t T, int64_t start, int64_t H,
                   int64_t Hk, int64_t d, float scale, int64_t window, float *restrict scores) {
    for (int64_t t = 0; t < T; t++) {
        const int64_t S = start + t + 1, first = window > 0 && S > window ? S - window : 0;
        for (int64_t h = 0; h < H; h++) {
            const float *qh = q + t * ldq + h * d;
            const float *kh = k + (h / (H / Hk)) * capacity * d, *vh = v + (h / (H / Hk)) * capacity * d;
            for (int64_t s = first; s < S; s++) {
                float dot = 0.0f;
                for (int64_t i = 0; i < d; i++) dot += qh[i] * kh[s * d + i];
                scores[s] = dot * scale;
            }
            float max = -INFINITY;
            for (int64_t s = first; s < S; s++) max = scores[s] > max ? scores[s] : max;
            float total = 0.0f;
            for (int64_t s = first; s < S; s++) { scores[s] = exp_nonpositive(scores[s] - max); total += scores[s]; }
            float *o = out + t * ldo + h * d;
            for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
            for (int64_t s = first; s < S; s++) {
                const float p = scores[s] / total;
                for (int64_t i = 0; i < d; i++) o[i] += p * vh[s * d + i];
            }
        }
    }
}

// One session's attention over keys and values it holds (see attend).
void dp_attention(const float *q, int64_t ldq, const float *k, const float *v, int64_t capacity, float *out,
                  int64_t ldo, int64_t T, int64_t start, int64_t H, int64_t Hk, int64_t d, float scale,
                  int64_t window) {
    float *scores = malloc((start + T) * sizeof(float));
    attend(q, ldq, k, v, capacity, out, ldo, T, start, H, Hk, d, scale, window, scores);
    free(scores);
}

// Write T tokens' keys and values, each [T, Hk, d] with row strides ldk, ldv (views into the fused q|k|v
// output), into a session's cache layer kc, vc [Hk, capacity, d] at positions start..start+T.
static void store_kv(const float *restrict k, int64_t ldk, const float *restrict v, int64_t ldv, int64_t T,
                     int64_t Hk, int64_t d, float *restrict kc, float *restrict vc, int64_t capacity, int64_t start) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < Hk; h++) {
            memcpy(kc + (h * capacity + start + t) * d, k + t * ldk + h * d, d * sizeof(float));
            memcpy(vc + (h * capacity + start + t) * d, v + t * ldv + h * d, d * sizeof(float));
        }
}

void dp_store_kv(const float *k, const float *v, int64_t ld, int64_t T, int64_t Hk, int64_t d, float *kc, float *vc,
                 int64_t capacity, int64_t start) {
    store_kv(k, ld, v, ld, T, Hk, d, kc, vc, capacity, start);
}

// The sessions of a batch: session i's rows of q, k, v follow session i - 1's; sessions[i] =
// {its cache's k and v (float *, as integers) at its first layer, capacity, first layer, start, rows, attend}.
enum { S_K, S_V, S_CAPACITY, S_FIRST, S_START, S_ROWS, S_ATTEND, S_FIELDS };

typedef struct {
    const float *q, *k, *v;
    int64_t ldq, ldk, ldv, ldo, layer, H, Hk, d, window, max_positions;
    float scale;
    const int64_t *sessions, *first_row;
    float *out;
} batch_job;

static void batch_range(void *ctx, int64_t i0, int64_t i1) {
    const batch_job *j = ctx;
    float *scores = malloc(j->max_positions * sizeof(float));
    for (int64_t i = i0; i < i1; i++) {
        const int64_t *s = j->sessions + i * S_FIELDS, row = j->first_row[i], capacity = s[S_CAPACITY];
        const int64_t layer_floats = (j->layer - s[S_FIRST]) * j->Hk * capacity * j->d;
        float *kc = (float *)(intptr_t)s[S_K] + layer_floats, *vc = (float *)(intptr_t)s[S_V] + layer_floats;
        store_kv(j->k + row * j->ldk, j->ldk, j->v + row * j->ldv, j->ldv, s[S_ROWS], j->Hk, j->d, kc, vc, capacity,
                 s[S_START]);
        if (s[S_ATTEND])
            attend(j->q + row * j->ldq, j->ldq, kc, vc, capacity, j->out + row * j->ldo, j->ldo, s[S_ROWS],
                   s[S_START], j->H, j->Hk, j->d, j->scale, j->window, scores);
    }
    free(scores);
}

// Each of n sessions' k, v rows stored in its cache at layer `layer`, then (where its attend field is set) its
// queries' causal attention over what its cache holds, into its rows of out. Sessions run on the thread pool.
void dp_attention_batch(const float *q, int64_t ldq, const float *k, int64_t ldk, const float *v, int64_t ldv,
                        float *out, int64_t ldo, const int64_t *sessions, int64_t n, int64_t layer, int64_t H,
                        int64_t Hk, int64_t d, float scale, int64_t window) {
    int64_t *first_row = malloc(n * sizeof(int64_t)), rows = 0, max_positions = 1, work = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t *s = sessions + i * S_FIELDS, end = s[S_START] + s[S_ROWS];
        first_row[i] = rows;
        rows += s[S_ROWS];
        max_positions = end > max_positions ? end : max_positions;
        work += s[S_ATTEND] ? s[S_ROWS] * end : 0;
    }
    batch_job job = { q, k, v, ldq, ldk, ldv, ldo, layer, H, Hk, d, window, max_positions, scale, sessions, first_row,
                      out };
    if (work * H * d < 65536) batch_range(&job, 0, n);  // too little to wake the pool for
    else parallel_for(batch_range, &job, 0, n, chunk_rows(n), 0);
    free(first_row);
}

// out[t] = silu(gate[t]) * up[t], where row t of gate_up is [gate (F) | up (F)]
void dp_silu_mul(const float *restrict gate_up, float *restrict out, int64_t T, int64_t F) {
    for (int64_t t = 0; t < T; t++, gate_up += 2 * F, out += F)
        for (int64_t i = 0; i < F; i++) {
            const float g = gate_up[i], e = exp_nonpositive(-fabsf(g));  // e^-|g| never overflows
            out[i] = g * (g >= 0.0f ? 1.0f : e) / (1.0f + e) * gate_up[F + i];
        }
}
