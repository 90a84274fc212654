// The small per-token operations of a transformer layer, fused so a decode step makes a few
// calls instead of dozens of tiny torch ops (each costs microseconds of dispatch on CPU).
// Same arithmetic as the torch versions in duskpool/models/ops.py, up to summation order.
#include <math.h>
#include <stdint.h>
#include <string.h>

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

// Causal attention of T queries at positions start..start+T-1 over the cache's first start+T keys.
// q, out: [T, H, d] (row stride ldq / ldo); k, v: [Hk, capacity, d]; query head h reads kv head
// h / (H / Hk). scores: scratch of start+T floats.
void dp_attention(const float *restrict q, int64_t ldq, const float *restrict k, const float *restrict v,
                  int64_t capacity, float *restrict out, int64_t ldo, int64_t T, int64_t start,
                  int64_t H, int64_t Hk, int64_t d, float *restrict scores) {
    const float scale = 1.0f / sqrtf((float)d);
    for (int64_t t = 0; t < T; t++) {
        const int64_t S = start + t + 1;
        for (int64_t h = 0; h < H; h++) {
            const float *qh = q + t * ldq + h * d;
            const float *kh = k + (h / (H / Hk)) * capacity * d, *vh = v + (h / (H / Hk)) * capacity * d;
            for (int64_t s = 0; s < S; s++) {
                float dot = 0.0f;
                for (int64_t i = 0; i < d; i++) dot += qh[i] * kh[s * d + i];
                scores[s] = dot * scale;
            }
            float max = -INFINITY;
            for (int64_t s = 0; s < S; s++) max = scores[s] > max ? scores[s] : max;
            float total = 0.0f;
            for (int64_t s = 0; s < S; s++) { scores[s] = exp_nonpositive(scores[s] - max); total += scores[s]; }
            float *o = out + t * ldo + h * d;
            for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
            for (int64_t s = 0; s < S; s++) {
                const float p = scores[s] / total;
                for (int64_t i = 0; i < d; i++) o[i] += p * vh[s * d + i];
            }
        }
    }
}

// out[t] = silu(gate[t]) * up[t], where row t of gate_up is [gate (F) | up (F)]
void dp_silu_mul(const float *restrict gate_up, float *restrict out, int64_t T, int64_t F) {
    for (int64_t t = 0; t < T; t++, gate_up += 2 * F, out += F)
        for (int64_t i = 0; i < F; i++) {
            const float g = gate_up[i], e = exp_nonpositive(-fabsf(g));  // e^-|g| never overflows
            out[i] = g * (g >= 0.0f ? 1.0f : e) / (1.0f + e) * gate_up[F + i];
        }
}

// Write T tokens' keys and values, each [T, Hk, d] with row stride ld (views into the fused q|k|v
// output), into the session's cache layer k, v [Hk, capacity, d] at positions start..start+T.
void dp_store_kv(const float *restrict k, const float *restrict v, int64_t ld, int64_t T, int64_t Hk, int64_t d,
                 float *restrict kc, float *restrict vc, int64_t capacity, int64_t start) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < Hk; h++) {
            memcpy(kc + (h * capacity + start + t) * d, k + t * ld + h * d, d * sizeof(float));
            memcpy(vc + (h * capacity + start + t) * d, v + t * ld + h * d, d * sizeof(float));
        }
}
