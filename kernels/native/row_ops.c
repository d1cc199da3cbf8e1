/* Row-wise prologues of leapc's int8 GEMM: what a decoder layer computes on a row just
   before projecting it (RMSNorm before q/k/v and gate/up, SwiGLU before down), done on the
   row while it is in cache instead of as ONNX Runtime nodes of their own. A row's
   arithmetic is fixed by K alone (16 lanes over the inputs in order, one fixed reduction),
   never by how many rows share the call: the N-invariance the decode loop needs. */

#include <immintrin.h>
#include <math.h>

#include "row_ops.h"
#include "simd_exp.h"

#define LANES 16

static __mmask16 tail(int64_t count) {
    return count >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1u);
}

void lc_rms_norm_rows(const float *x, const float *gamma, int64_t M, int64_t K, float eps,
                      float *out) {
    for (int64_t m = 0; m < M; ++m) {
        const float *row = x + m * K;
        __m512 squares = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += LANES) {
            const __m512 v = _mm512_maskz_loadu_ps(tail(K - k), row + k);
            squares = _mm512_add_ps(squares, _mm512_mul_ps(v, v));
        }
        const float mean = _mm512_reduce_add_ps(squares) / (float)K;
        const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(mean + eps));
        for (int64_t k = 0; k < K; k += LANES) {
            const __mmask16 live = tail(K - k);
            const __m512 v = _mm512_maskz_loadu_ps(live, row + k);
            const __m512 g = _mm512_maskz_loadu_ps(live, gamma + k);
            _mm512_mask_storeu_ps(out + m * K + k, live, _mm512_mul_ps(_mm512_mul_ps(v, inv), g));
        }
    }
}

void lc_swiglu_rows(const float *gate_up, int64_t M, int64_t F, float *out) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t m = 0; m < M; ++m) {
        const float *gate = gate_up + m * 2 * F, *up = gate + F;
        for (int64_t f = 0; f < F; f += LANES) {
            const __mmask16 live = tail(F - f);
            const __m512 g = _mm512_maskz_loadu_ps(live, gate + f);
            const __m512 sigmoid = _mm512_div_ps(one, _mm512_add_ps(one, lc_exp(
                                                           _mm512_sub_ps(_mm512_setzero_ps(), g))));
            _mm512_mask_storeu_ps(out + m * F + f, live,
                                  _mm512_mul_ps(_mm512_mul_ps(g, sigmoid),
                                                _mm512_maskz_loadu_ps(live, up + f)));
        }
    }
}
