/* leapc's tree-attention kernel (tree_attention.c): the arguments of one call. */
#ifndef LEAPC_TREE_ATTENTION_H
#define LEAPC_TREE_ATTENTION_H

#include <stdint.h>

typedef struct {
    const float *q;              /* [B, H, N, D] */
    const float *k_past;         /* [B, Hkv, T, D]: the cache, valid up to past_len */
    const float *k_new;          /* [B, Hkv, N, D]: the step's own keys */
    const float *v_past;         /* [B, Hkv, T, Dv] */
    const float *v_new;          /* [B, Hkv, N, Dv] */
    const int64_t *past_len;     /* [B], each in [0, T] */
    const uint8_t *tree_mask;    /* [B, N, N] bool: node n sees new token m */
    float *out;                  /* [B, H, N, Dv], or [B, N, H, Dv] if tokens_major */
    int64_t B, H, Hkv, N, T, D, Dv;
    float scale;
    int tokens_major;
    float softcap; /* 0: none; else scores are softcap * tanh(s / softcap) (Gemma 2) */
    int64_t window; /* 0: none; else a row sees only the last `window` keys of its visible
                       list (a sliding window: list index = sequence position) */
} LcTreeAttention;

/* The projections of a decoder's attention block as attention reads them: from
   qkv [B, N, H*D + Hkv*D + Hkv*Dv] and cos/sin [B, N, R/2], q [B, H, N, D] and
   k [B, Hkv, N, D] with RoPE (rotate-half form) on their first R inputs, v [B, Hkv, N, Dv]. */
void lc_rotary_split(const float *qkv, const float *cos, const float *sin, int64_t B, int64_t N,
                     int64_t H, int64_t Hkv, int64_t D, int64_t Dv, int64_t R, float *q, float *k,
                     float *v);

/* Floats per key row of the transposed keys (T + N rounded up to 32). */
int64_t lc_tree_attention_kt_stride(const LcTreeAttention *a);
/* Fill kt [D, stride] for batch row bh / Hkv and KV head bh % Hkv. */
void lc_tree_attention_transpose(const LcTreeAttention *a, int64_t bh, float *kt);
/* Floats of scratch one lc_tree_attention_rows call needs. */
int64_t lc_tree_attention_scratch(const LcTreeAttention *a);
/* Output rows [first, end) of the G * N that read KV head bh % Hkv (row i: the group's
   query head i / N, node i % N). */
void lc_tree_attention_rows(const LcTreeAttention *a, int64_t bh, const float *kt,
                            int64_t first, int64_t end, float *scratch);

#endif
