/* Tree attention over a prefix-valid KV cache plus the step's new tokens, on AVX-512.

   The maths is `leapc.kernels.reference.tree_attention`: query row (h, n) of batch row b
   sees cache slots 0 .. past_len[b] - 1 and the new tokens m with tree_mask[b, n, m];
   query head h reads KV head h / G. What this kernel adds is the order of the arithmetic.

   Why this kernel exists: a token's row must come out bit for bit the same in a one-token
   `ar` step and in a verify step of any width (the N-invariance exact speculation on int8
   weights needs), and a token's ancestors are cache slots in one of those steps and new
   tokens in the other. So every row works on its *visible list*, the keys it sees in
   sequence order (valid cache slots, then its visible new tokens): that list is the same
   in both steps, while T (the cache's free slots), N and where the keys sit are not.
     - score s_j = (((0 + q_0 k_j0) + q_1 k_j1) + ...) * scale: one fused multiply-add per
       input, in input order, the same code for cache and new keys; soft-capped (if
       softcap) element by element, cap * tanh(s_j / cap);
     - m = max_j s_j (exact in any order); e_j = exp(s_j - m), element by element;
     - the denominator sums e_j in 16 lanes by the key's position in the visible list,
       then reduces the lanes in one fixed tree;
     - out = (sum_j e_j v_j, in visible-list order) / denominator.
   A sliding window keeps the last `window` entries of the list (cache slot i holds position
   i and a node's ancestors follow at P, P + 1, ..., so the list index is the position):
   the entries before them get e_j = 0 and are left out of the max, and every kept entry
   keeps its lane and its place in the sums, so the window changes nothing above.
   Nothing depends on how many rows share the step or on the masked keys, so the property
   holds at any cache length (the ONNX lowering held it only up to 1024 keys).

   Layout: k_past/v_past [B, Hkv, T, D|Dv], k_new/v_new [B, Hkv, N, D|Dv], the cache and
   the step's new keys as separate tensors, so the cache is never copied to concatenate
   them. A first pass transposes each (b, KV head)'s visible cache keys and new keys to
   kt [D, P + N] (one key per lane), which every query row of that head then reads. */

#include <immintrin.h>
#include <stdint.h>

#include "simd_exp.h"
#include "tree_attention.h"

#define LANES 16
#define GROUP 4 /* query rows computed together */

/* Keys are handled two blocks of 16 at a time: counts round up to 32. */
static int64_t round_up(int64_t x) { return (x + 2 * LANES - 1) / (2 * LANES) * (2 * LANES); }

int64_t lc_tree_attention_kt_stride(const LcTreeAttention *a) { return round_up(a->T + a->N); }

/* r[k] <- column k of the 16 x 16 block whose rows are r[0..15]: pairs of floats, then
   of doubles, then 128- and 256-bit quarters change places. */
static void transpose16(__m512 r[LANES]) {
    __m512 t[LANES], u[LANES], v[LANES];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
        const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
        const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
        u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
        u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
        u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
    }
    for (int i = 0; i < 2; ++i)
        for (int k = 0; k < 4; ++k) {
            v[8 * i + k] = _mm512_shuffle_f32x4(u[8 * i + k], u[8 * i + 4 + k], 0x88);
            v[8 * i + 4 + k] = _mm512_shuffle_f32x4(u[8 * i + k], u[8 * i + 4 + k], 0xdd);
        }
    for (int k = 0; k < 8; ++k) {
        r[k] = _mm512_shuffle_f32x4(v[k], v[8 + k], 0x88);
        r[8 + k] = _mm512_shuffle_f32x4(v[k], v[8 + k], 0xdd);
    }
}

/* kt [D, stride] for batch row b, KV head kvh = bh % Hkv: its valid cache keys, then its
   new keys; the padding up to a multiple of 32 keys is zero. Blocks of 16 keys x 16
   inputs are transposed in registers (a scalar copy cost more than all of a one-token
   step's attention); inputs past the last multiple of 16 are copied one by one. */
void lc_tree_attention_transpose(const LcTreeAttention *a, int64_t bh, float *kt) {
    const int64_t stride = lc_tree_attention_kt_stride(a), P = a->past_len[bh / a->Hkv];
    const int64_t D = a->D, keys = round_up(P + a->N), whole = D / LANES * LANES;
    const float *past = a->k_past + bh * a->T * D, *fresh = a->k_new + bh * a->N * D;
    for (int64_t j0 = 0; j0 < keys; j0 += LANES) {
        const float *key[LANES];
        for (int i = 0; i < LANES; ++i) {
            const int64_t j = j0 + i;
            key[i] = j < P ? past + j * D : j < P + a->N ? fresh + (j - P) * D : NULL;
        }
        for (int64_t d0 = 0; d0 < whole; d0 += LANES) {
            __m512 r[LANES];
            for (int i = 0; i < LANES; ++i)
                r[i] = key[i] ? _mm512_loadu_ps(key[i] + d0) : _mm512_setzero_ps();
            transpose16(r);
            for (int i = 0; i < LANES; ++i) _mm512_storeu_ps(kt + (d0 + i) * stride + j0, r[i]);
        }
        for (int64_t d = whole; d < D; ++d)
            for (int i = 0; i < LANES; ++i) kt[d * stride + j0 + i] = key[i] ? key[i][d] : 0.0f;
    }
}

/* Up to four rows' running sums over 32 columns: row r's += w[r][i] * x_i for i = 0 ..
   count - 1 in order, x_i the 32 floats at x + i * step (the lanes outside lo/hi read as
   0). Both of attention's products are this: q k^T over the inputs, e v over the keys.
   Four rows are eight independent chains of fused multiply-adds, which keep both FMA units
   busy; the sums are named variables because, kept in an array, the compiler held them in
   memory. A group of fewer rows (G * N not a multiple of four: the bundled model's five
   query heads per KV head at N = 1) computes only those: a row's arithmetic is the same
   whichever rows share its group. */
typedef struct {
    __m512 s00, s01, s10, s11, s20, s21, s30, s31;
} Sums;

static inline __attribute__((always_inline)) Sums
accumulate_rows(const int R, Sums t, const float *const w[GROUP], int64_t count,
                const float *x, int64_t step, __mmask16 lo, __mmask16 hi) {
    const float *w0 = w[0], *w1 = w[R > 1 ? 1 : 0], *w2 = w[R > 2 ? 2 : 0], *w3 = w[R > 3 ? 3 : 0];
    for (int64_t i = 0; i < count; ++i) {
        const __m512 x0 = _mm512_maskz_loadu_ps(lo, x + i * step);
        const __m512 x1 = _mm512_maskz_loadu_ps(hi, x + i * step + LANES);
#define ROW_FMA(r)                                                \
    if (R > r) {                                                  \
        const __m512 v = _mm512_set1_ps(w##r[i]);                 \
        t.s##r##0 = _mm512_fmadd_ps(v, x0, t.s##r##0);            \
        t.s##r##1 = _mm512_fmadd_ps(v, x1, t.s##r##1);            \
    }
        ROW_FMA(0) ROW_FMA(1) ROW_FMA(2) ROW_FMA(3)
#undef ROW_FMA
    }
    return t;
}

/* The first `rows` (1 to GROUP) rows' sums; the others' stay as given. */
static Sums accumulate(int rows, Sums t, const float *const w[GROUP], int64_t count,
                       const float *x, int64_t step, __mmask16 lo, __mmask16 hi) {
    switch (rows) {
    case 1: return accumulate_rows(1, t, w, count, x, step, lo, hi);
    case 2: return accumulate_rows(2, t, w, count, x, step, lo, hi);
    case 3: return accumulate_rows(3, t, w, count, x, step, lo, hi);
    default: return accumulate_rows(4, t, w, count, x, step, lo, hi);
    }
}

static Sums zero_sums(void) {
    const __m512 z = _mm512_setzero_ps();
    return (Sums){z, z, z, z, z, z, z, z};
}

/* cap * tanh(x / cap), with tanh(y) = 1 - 2 / (e^(2y) + 1): e^(2y) overflowing to inf
   gives 1 and underflowing to 0 gives -1, so no input needs a branch. */
static inline __m512 soft_cap(__m512 x, float cap) {
    const __m512 e = lc_exp(_mm512_mul_ps(x, _mm512_set1_ps(2.0f / cap)));
    const __m512 t = _mm512_sub_ps(_mm512_set1_ps(1.0f),
                                   _mm512_div_ps(_mm512_set1_ps(2.0f),
                                                 _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
    return _mm512_mul_ps(t, _mm512_set1_ps(cap));
}

static inline __m512 scaled(__m512 dot, __m512 vscale, float cap) {
    const __m512 s = _mm512_mul_ps(dot, vscale);
    return cap != 0.0f ? soft_cap(s, cap) : s;
}

/* s[r][j] for the first R query rows and keys [16 from, 16 blocks) of kt (both even), 32
   keys at a time (a key's lane and a row's neighbours do not change its arithmetic). */
static void scores(int R, const float *const q[GROUP], const float *kt, int64_t D,
                   int64_t stride, int64_t from, int64_t blocks, float scale, float cap,
                   float *const s[GROUP]) {
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t blk = from; blk < blocks; blk += 2) {
        const Sums t = accumulate(R, zero_sums(), q, D, kt + blk * LANES, stride, 0xFFFF,
                                  0xFFFF);
        const __m512 rows[GROUP][2] = {{t.s00, t.s01}, {t.s10, t.s11}, {t.s20, t.s21},
                                       {t.s30, t.s31}};
        for (int r = 0; r < R; ++r) {
            _mm512_storeu_ps(s[r] + blk * LANES, scaled(rows[r][0], vscale, cap));
            _mm512_storeu_ps(s[r] + blk * LANES + LANES, scaled(rows[r][1], vscale, cap));
        }
    }
}

static __mmask16 tail_mask(int64_t count) {
    if (count <= 0) return 0;
    return count >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1u);
}

/* The lanes of keys [j, j + 16) inside [start, count). */
static __mmask16 live_mask(int64_t j, int64_t start, int64_t count) {
    return (__mmask16)(tail_mask(count - j) & ~tail_mask(start - j));
}

/* Turn the visible scores s[start, count) into e_j = exp(s_j - max) in place; return their
   sum, whose lanes are the keys' list positions mod 16 wherever the list starts. */
static float softmax_numerators(float *s, int64_t start, int64_t count) {
    const int64_t first = start / LANES * LANES;
    __m512 vmax = _mm512_set1_ps(-__builtin_inff());
    for (int64_t j = first; j < count; j += LANES)
        vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(vmax, live_mask(j, start, count), s + j));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = first; j < count; j += LANES) {
        const __mmask16 live = live_mask(j, start, count);
        const __m512 e = lc_exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + j), m));
        _mm512_mask_storeu_ps(s + j, live, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(live, e));
    }
    return _mm512_reduce_add_ps(sum);
}

/* One group's rows: out = (sum over the visible list of e_j v_j) / total. The P cache
   slots every row sees come first, accumulated for the four rows together (eight chains);
   then each row's own visible new tokens, listed in `fresh`. Entries before `from` have
   weight 0 in every row (outside their windows) and are skipped: adding 0 * v_j to a sum
   changes no bit of it. */
typedef struct {
    int rows; /* the group's real rows, 1 .. GROUP; the rest are padding */
    int64_t from;
    float *e[GROUP];
    int64_t *fresh[GROUP];
    int64_t count[GROUP];
    float total[GROUP];
    float *out[GROUP]; /* NULL: a padding row */
} Group;

static void weighted_values(const LcTreeAttention *a, int64_t bh, int64_t P, const Group *g) {
    const float *past = a->v_past + bh * a->T * a->Dv, *mine = a->v_new + bh * a->N * a->Dv;
    const float *e[GROUP];
    for (int r = 0; r < GROUP; ++r) e[r] = g->e[r] + g->from;
    for (int64_t c = 0; c < a->Dv; c += 2 * LANES) {
        const __mmask16 lo = tail_mask(a->Dv - c), hi = tail_mask(a->Dv - c - LANES);
        const Sums t = accumulate(g->rows, zero_sums(), e, P - g->from,
                                  past + g->from * a->Dv + c, a->Dv, lo, hi);
        __m512 acc[GROUP][2] = {{t.s00, t.s01}, {t.s10, t.s11}, {t.s20, t.s21}, {t.s30, t.s31}};
        /* The rows' own new keys, the rows taken in turn at each step of their lists: one
           row alone is two dependent chains of multiply-adds (latency-bound; in a prompt's
           prefill every key is new), four rows are eight. Each row still sums in its own
           list's order. */
        int64_t longest = P;
        for (int r = 0; r < GROUP; ++r)
            if (g->out[r] && g->count[r] > longest) longest = g->count[r];
        for (int64_t j = P > g->from ? P : g->from; j < longest; ++j)
            for (int r = 0; r < GROUP; ++r) {
                if (!g->out[r] || j >= g->count[r]) continue;
                const float *v = mine + g->fresh[r][j - P] * a->Dv + c;
                const __m512 e = _mm512_set1_ps(g->e[r][j]);
                acc[r][0] = _mm512_fmadd_ps(e, _mm512_maskz_loadu_ps(lo, v), acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(e, _mm512_maskz_loadu_ps(hi, v + LANES), acc[r][1]);
            }
        for (int r = 0; r < GROUP; ++r) {
            if (!g->out[r]) continue;
            const __m512 total = _mm512_set1_ps(g->total[r]);
            _mm512_mask_storeu_ps(g->out[r] + c, lo, _mm512_div_ps(acc[r][0], total));
            _mm512_mask_storeu_ps(g->out[r] + c + LANES, hi, _mm512_div_ps(acc[r][1], total));
        }
    }
}

int64_t lc_tree_attention_scratch(const LcTreeAttention *a) {
    /* per row of a group: its scores, then its visible new keys' indices (int64) */
    return GROUP * (lc_tree_attention_kt_stride(a) + 2 * a->N);
}

/* Query rows [first, end) of the G * N reading KV head bh % Hkv (row i: head i / N of
   the group, node i % N), four at a time (the last group may have fewer). */
void lc_tree_attention_rows(const LcTreeAttention *a, int64_t bh, const float *kt,
                            int64_t first, int64_t end, float *scratch) {
    const int64_t b = bh / a->Hkv, kvh = bh % a->Hkv, G = a->H / a->Hkv, P = a->past_len[b];
    const int64_t stride = lc_tree_attention_kt_stride(a), blocks = round_up(P + a->N) / LANES;
    for (int64_t r0 = first; r0 < end; r0 += GROUP) {
        Group g;
        const float *q[GROUP];
        int64_t node[GROUP];
        for (int r = 0; r < GROUP; ++r) {
            const int64_t i = r0 + r < end ? r0 + r : end - 1;
            const int64_t h = kvh * G + i / a->N, row = (b * a->H + h) * a->N + i % a->N;
            node[r] = i % a->N;
            q[r] = a->q + row * a->D;
            g.e[r] = scratch + r * (stride + 2 * a->N);
            g.fresh[r] = (int64_t *)(void *)(g.e[r] + stride);
            const int64_t at = a->tokens_major ? (b * a->N + node[r]) * a->H + h : row;
            g.out[r] = r0 + r < end ? a->out + at * a->Dv : NULL;
        }
        int64_t start[GROUP];
        g.rows = end - r0 < GROUP ? (int)(end - r0) : GROUP;
        g.from = P + a->N;
        for (int r = 0; r < g.rows; ++r) {
            const uint8_t *sees = a->tree_mask + (b * a->N + node[r]) * a->N;
            int64_t count = P; /* the visible new keys, in order, behind the cache's */
            for (int64_t m = 0; m < a->N; ++m)
                if (sees[m]) g.fresh[r][count++ - P] = m;
            g.count[r] = count;
            start[r] = a->window && count > a->window ? count - a->window : 0;
            if (start[r] < g.from) g.from = start[r];
        }
        g.from = g.from / (2 * LANES) * (2 * LANES); /* scores run 32 keys at a time */
        scores(g.rows, q, kt, a->D, stride, g.from / LANES, blocks, a->scale, a->softcap, g.e);
        for (int r = 0; r < g.rows; ++r) {
            float *s = g.e[r];
            for (int64_t j = P; j < g.count[r]; ++j) s[j] = s[P + g.fresh[r][j - P]];
            g.total[r] = softmax_numerators(s, start[r], g.count[r]);
            for (int64_t j = g.from; j < start[r]; ++j) s[j] = 0.0f; /* outside the window */
        }
        weighted_values(a, bh, P, &g);
    }
}

/* One head's row of the projections, rotated: (x1, x2) = its first R inputs in halves,
   out = (x1 cos - x2 sin, x2 cos + x1 sin, the inputs past R unchanged), the arithmetic
   of ONNX's RotaryEmbedding (non-interleaved), element by element. */
static void rotate(const float *x, const float *cos, const float *sin, int64_t D, int64_t R,
                   float *out) {
    const int64_t half = R / 2;
    for (int64_t i = 0; i < half; ++i) {
        out[i] = cos[i] * x[i] - sin[i] * x[i + half];
        out[i + half] = sin[i] * x[i] + cos[i] * x[i + half];
    }
    for (int64_t i = R; i < D; ++i) out[i] = x[i];
}

void lc_rotary_split(const float *qkv, const float *cos, const float *sin, int64_t B, int64_t N,
                     int64_t H, int64_t Hkv, int64_t D, int64_t Dv, int64_t R, float *q, float *k,
                     float *v) {
    const int64_t width = (H + Hkv) * D + Hkv * Dv;
    for (int64_t b = 0; b < B; ++b)
        for (int64_t n = 0; n < N; ++n) {
            const float *x = qkv + (b * N + n) * width;
            const float *c = cos + (b * N + n) * (R / 2), *s = sin + (b * N + n) * (R / 2);
            for (int64_t h = 0; h < H; ++h)
                rotate(x + h * D, c, s, D, R, q + ((b * H + h) * N + n) * D);
            for (int64_t h = 0; h < Hkv; ++h) {
                rotate(x + (H + h) * D, c, s, D, R, k + ((b * Hkv + h) * N + n) * D);
                const float *xv = x + (H + Hkv) * D + h * Dv;
                float *out = v + ((b * Hkv + h) * N + n) * Dv;
                for (int64_t i = 0; i < Dv; ++i) out[i] = xv[i];
            }
        }
}
