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
    const fp_mode mode = flush_denormals();
    for (int64_t t = 0; t < T; t++, x += D, out += D) {
        float ss = 0.0f;
        for (int64_t i = 0; i < D; i++) ss += x[i] * x[i];
        float scale = 1.0f / sqrtf(ss / (float)D + eps);
        for (int64_t i = 0; i < D; i++) out[i] = x[i] * scale * w[i];
    }
    restore_fp_mode(mode);
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
// [Hk, capacity, d], for query heads h0..h1; with window > 0 a query at p sees only positions p - window + 1..p.
// q, out: [T, H, d] (row stride ldq / ldo); query head h reads kv head h / (H / Hk). scores: scratch of start+T
// floats.
static void attend(const float *restrict q, int64_t ldq, const float *restrict k, const float *restrict v,
                   int64_t capacity, float *restrict out, int64_t ldo, int64_t T, int64_t start, int64_t h0,
                   int64_t h1, int64_t H, int64_t Hk, int64_t d, float scale, int64_t window, float *restrict scores) {
    for (int64_t t = 0; t < T; t++) {
        const int64_t S = start + t + 1, first = window > 0 && S > window ? S - window : 0;
        for (int64_t h = h0; h < h1; h++) {
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

// Attention in pieces: at most ATTEND_ROWS queries of one session, the query heads of one kv head, so that a long
// prompt, and one decode step over a long context, spread over the pool as a batch of sessions does. pieces[p] = {its
// cache layer's k and v (float *, as integers), capacity, the position of its first query, its queries, their first
// row in q and out, its first query head}.
#define ATTEND_ROWS 16
enum { P_K, P_V, P_CAPACITY, P_START, P_ROWS, P_ROW, P_HEAD, P_FIELDS };

typedef struct {
    const float *q;
    float *out;
    int64_t ldq, ldo, H, Hk, d, window, max_positions;
    float scale;
    const int64_t *pieces;
} attend_job;

static void attend_range(void *ctx, int64_t i0, int64_t i1) {
    const attend_job *j = ctx;
    float *scores = malloc(j->max_positions * sizeof(float));
    for (int64_t i = i0; i < i1; i++) {
        const int64_t *p = j->pieces + i * P_FIELDS;
        attend(j->q + p[P_ROW] * j->ldq, j->ldq, (const float *)(intptr_t)p[P_K], (const float *)(intptr_t)p[P_V],
               p[P_CAPACITY], j->out + p[P_ROW] * j->ldo, j->ldo, p[P_ROWS], p[P_START], p[P_HEAD],
               p[P_HEAD] + j->H / j->Hk, j->H, j->Hk, j->d, j->scale, j->window, scores);
    }
    free(scores);
}

// Pieces of `rows` queries: blocks of ATTEND_ROWS, times Hk head groups
static int64_t pieces_of(int64_t rows, int64_t Hk) { return (rows + ATTEND_ROWS - 1) / ATTEND_ROWS * Hk; }

// The pieces of one session's queries (rows row.. of q, at positions start..) over cache layer k, v, written from
// pieces[n] on; the count after them.
static int64_t add_pieces(int64_t *pieces, int64_t n, const float *k, const float *v, int64_t capacity,
                          int64_t start, int64_t rows, int64_t row, int64_t H, int64_t Hk) {
    for (int64_t r = 0; r < rows; r += ATTEND_ROWS)
        for (int64_t h = 0; h < H; h += H / Hk, n++) {
            int64_t *p = pieces + n * P_FIELDS;
            p[P_K] = (intptr_t)k, p[P_V] = (intptr_t)v, p[P_CAPACITY] = capacity, p[P_START] = start + r;
            p[P_ROWS] = rows - r < ATTEND_ROWS ? rows - r : ATTEND_ROWS, p[P_ROW] = row + r, p[P_HEAD] = h;
        }
    return n;
}

// `work`: query-key pairs in all pieces
static void attend_pieces(const attend_job *job, int64_t n, int64_t work) {
    const fp_mode mode = flush_denormals();
    if (work * job->H * job->d < 65536) attend_range((void *)job, 0, n);  // too little to wake the pool for
    else parallel_for(attend_range, (void *)job, 0, n, 1, 0);
    restore_fp_mode(mode);
}

// One session's attention over keys and values it holds (see attend), its queries spread over the pool.
void dp_attention(const float *q, int64_t ldq, const float *k, const float *v, int64_t capacity, float *out,
                  int64_t ldo, int64_t T, int64_t start, int64_t H, int64_t Hk, int64_t d, float scale,
                  int64_t window) {
    int64_t *pieces = malloc(pieces_of(T, Hk) * P_FIELDS * sizeof(int64_t));
    const int64_t n = add_pieces(pieces, 0, k, v, capacity, start, T, 0, H, Hk);
    const attend_job job = { q, out, ldq, ldo, H, Hk, d, window, start + T, scale, pieces };
    attend_pieces(&job, n, T * (start + T));
    free(pieces);
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
// {its cache's k and v (float *, as integers) at its first layer, capacity, first layer, start, rows}.
enum { S_K, S_V, S_CAPACITY, S_FIRST, S_START, S_ROWS, S_FIELDS };

// Each of n sessions' k, v rows stored in its cache at layer `layer`, then its queries' causal attention over what its
// cache holds, into its rows of out; the queries in pieces over the thread pool (a decode step is one piece per kv
// head, a long prompt chunk many).
void dp_attention_batch(const float *q, int64_t ldq, const float *k, int64_t ldk, const float *v, int64_t ldv,
                        float *out, int64_t ldo, const int64_t *sessions, int64_t n, int64_t layer, int64_t H,
                        int64_t Hk, int64_t d, float scale, int64_t window) {
    int64_t most = 0;  // pieces at most
    for (int64_t i = 0; i < n; i++) most += pieces_of(sessions[i * S_FIELDS + S_ROWS], Hk);
    int64_t *pieces = malloc(most * P_FIELDS * sizeof(int64_t)), n_pieces = 0, row = 0, max_positions = 1, work = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t *s = sessions + i * S_FIELDS, capacity = s[S_CAPACITY], end = s[S_START] + s[S_ROWS];
        const int64_t layer_floats = (layer - s[S_FIRST]) * Hk * capacity * d;
        float *kc = (float *)(intptr_t)s[S_K] + layer_floats, *vc = (float *)(intptr_t)s[S_V] + layer_floats;
        store_kv(k + row * ldk, ldk, v + row * ldv, ldv, s[S_ROWS], Hk, d, kc, vc, capacity, s[S_START]);
        n_pieces = add_pieces(pieces, n_pieces, kc, vc, capacity, s[S_START], s[S_ROWS], row, H, Hk);
        max_positions = end > max_positions ? end : max_positions;
        work += s[S_ROWS] * end;
        row += s[S_ROWS];
    }
    const attend_job job = { q, out, ldq, ldo, H, Hk, d, window, max_positions, scale, pieces };
    attend_pieces(&job, n_pieces, work);
    free(pieces);
}

// out[t] = silu(gate[t]) * up[t], where row t of gate_up is [gate (F) | up (F)]
void dp_silu_mul(const float *restrict gate_up, float *restrict out, int64_t T, int64_t F) {
    const fp_mode mode = flush_denormals();
    for (int64_t t = 0; t < T; t++, gate_up += 2 * F, out += F)
        for (int64_t i = 0; i < F; i++) {
            const float g = gate_up[i], e = exp_nonpositive(-fabsf(g));  // e^-|g| never overflows
            out[i] = g * (g >= 0.0f ? 1.0f : e) / (1.0f + e) * gate_up[F + i];
        }
    restore_fp_mode(mode);
}
