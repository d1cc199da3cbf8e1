/* Row-wise prologues leapc fuses in front of its int8 GEMM (row_ops.c). */
#ifndef LEAPC_ROW_OPS_H
#define LEAPC_ROW_OPS_H

#include <stdint.h>

/* out[m] = x[m] / sqrt(mean(x[m]^2) + eps) * gamma, for x [M, K]. */
void lc_rms_norm_rows(const float *x, const float *gamma, int64_t M, int64_t K, float eps,
                      float *out);
/* out[m] = silu(g) * u with (g, u) the halves of gate_up[m], for gate_up [M, 2F]. */
void lc_swiglu_rows(const float *gate_up, int64_t M, int64_t F, float *out);

#endif
