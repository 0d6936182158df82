/* 3×3 neighbourhood attention on the CPU: the forward and backward kernels of geca/models/attention_cpu.py.
 *
 * Cells are rows of B·H·W; q, k, v (and their gradients) are read and written in place through a row stride, so
 * the packed output of the qkv projection needs no copy. Head h of a row holds its query and key at h·HD and its
 * value at h·DV; HD and DV are compile-time constants, so each head is whole vector registers. A neighbour outside
 * the grid is a dead cell: the `dead` row of zeros (a zero key gives logit 0, a zero value adds nothing).
 * Each kernel stores tensors in S and computes in T: float and double natively, bfloat16 stored and float computed
 * (converted in registers, so a bf16 model's attention reads and saves half the bytes; stores round as torch does). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if !defined(HD) || !defined(DV)
#error "compile with -DHD=<head dimension> -DDV=<value dimension>"
#endif

#define VBYTES 32

typedef uint16_t bf16;
typedef float vec_float __attribute__((vector_size(VBYTES)));
typedef double vec_double __attribute__((vector_size(VBYTES)));
typedef uint32_t u32_lanes __attribute__((vector_size(VBYTES)));

/* Loads and stores of VBYTES of compute type, and their scalar forms, per storage type. */
#define PLAIN(T)                                                                                                     \
static inline vec_##T load_##T(const T *p) { vec_##T v; memcpy(&v, p, sizeof v); return v; }                        \
static inline void store_##T(T *p, vec_##T v) { memcpy(p, &v, sizeof v); }                                          \
static inline T get_##T(T x) { return x; }                                                                           \
static inline T put_##T(T x) { return x; }
PLAIN(float)
PLAIN(double)

/* Lane by lane (GCC vectorises the loops): __builtin_convertvector would need GCC 9, and every kernel with it. */
static inline vec_float load_bf16(const bf16 *p) {
    u32_lanes u;
    for (int l = 0; l < (int)(VBYTES / sizeof(float)); l++) u[l] = (uint32_t)p[l] << 16;  /* a bf16: a float's top */
    vec_float v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* Round to nearest, ties to even, as torch converts; a NaN stays a NaN (its sign and payload are not kept). */
static inline void store_bf16(bf16 *p, vec_float v) {
    u32_lanes u, nan = (u32_lanes)(v != v);
    memcpy(&u, &v, sizeof u);
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16 & ~nan) | (0x7FC0 & nan);
    for (int l = 0; l < (int)(VBYTES / sizeof(float)); l++) p[l] = (bf16)u[l];
}

static inline float get_bf16(bf16 x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline bf16 put_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return f != f ? 0x7FC0 : (bf16)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* The 9 neighbour rows of `cell` (row-major over the window), or -1 outside the grid. */
static inline void window(int64_t cell, int64_t H, int64_t W, int64_t nb[9]) {
    int64_t j = cell % W, i = (cell / W) % H;
    for (int n = 0; n < 9; n++) {
        int64_t di = n / 3 - 1, dj = n % 3 - 1, ii = i + di, jj = j + dj;
        nb[n] = (ii >= 0 && ii < H && jj >= 0 && jj < W) ? cell + di * W + dj : -1;
    }
}

/* The rows whose window holds `cell` at position n: the reverse of `window`, or -1 outside the grid. */
static inline void holders(int64_t cell, int64_t H, int64_t W, int64_t from[9]) {
    int64_t j = cell % W, i = (cell / W) % H;
    for (int n = 0; n < 9; n++) {
        int64_t di = n / 3 - 1, dj = n % 3 - 1, ii = i - di, jj = j - dj;
        from[n] = (ii >= 0 && ii < H && jj >= 0 && jj < W) ? cell - di * W - dj : -1;
    }
}

#define DEFINE(S, T, SUF, EXP)                                                                                        \
enum { L_##SUF = VBYTES / sizeof(T) };                                                                                \
                                                                                                                      \
static inline T hsum_##SUF(vec_##T v) { T s = 0; for (int l = 0; l < L_##SUF; l++) s += v[l]; return s; }             \
                                                                                                                      \
/* y[n]: head `offset` of row nb[n] of x (row stride xs), or the dead row. */                                         \
static inline void at_##SUF(const int64_t nb[9], const S *x, int64_t xs, int64_t offset, const S *dead,               \
                            const S *y[9]) {                                                                          \
    for (int n = 0; n < 9; n++) y[n] = nb[n] < 0 ? dead : x + nb[n] * xs + offset;                                    \
}                                                                                                                     \
                                                                                                                      \
/* s[n] = x[0:LEN] · y[n][0:LEN]; the nine dot products share each load of x. */                                      \
static inline void dots9_##SUF(const S *x, const S *const y[9], T s[9], int len) {                                    \
    vec_##T acc[9] = {{0}};                                                                                           \
    int c = 0;                                                                                                        \
    for (; c + L_##SUF <= len; c += L_##SUF) {                                                                        \
        vec_##T xv = load_##S(x + c);                                                                                 \
        for (int n = 0; n < 9; n++) acc[n] += xv * load_##S(y[n] + c);                                                \
    }                                                                                                                 \
    for (int n = 0; n < 9; n++) {                                                                                     \
        T t = hsum_##SUF(acc[n]);                                                                                     \
        for (int r = c; r < len; r++) t += get_##S(x[r]) * get_##S(y[n][r]);                                          \
        s[n] = t;                                                                                                     \
    }                                                                                                                 \
}                                                                                                                     \
                                                                                                                      \
/* out[0:LEN] = Σ_{e < count} w[e] · y[e][0:LEN] */                                                                   \
static inline void mixn_##SUF(int count, const T *w, const S *const *y, S *out, int len) {                            \
    int c = 0;                                                                                                        \
    for (; c + L_##SUF <= len; c += L_##SUF) {                                                                        \
        vec_##T acc = {0};                                                                                            \
        for (int e = 0; e < count; e++) acc += w[e] * load_##S(y[e] + c);                                             \
        store_##S(out + c, acc);                                                                                      \
    }                                                                                                                 \
    for (; c < len; c++) {                                                                                            \
        T t = 0;                                                                                                      \
        for (int e = 0; e < count; e++) t += w[e] * get_##S(y[e][c]);                                                 \
        out[c] = put_##S(t);                                                                                          \
    }                                                                                                                 \
}                                                                                                                     \
                                                                                                                      \
/* out (N, heads·DV) and the attention weights attn (N, heads, 9) at the N rows `cells`. */                           \
void na_forward_##SUF(const S *q, const S *k, const S *v, int64_t qs, int64_t ks, int64_t vs, const S *dead,          \
                      const int64_t *cells, int64_t N, S *out, T *attn, int64_t H, int64_t W, int64_t heads,          \
                      T scale, int threads) {                                                                         \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                                                 \
    for (int64_t r = 0; r < N; r++) {                                                                                 \
        int64_t nb[9];                                                                                                \
        window(cells[r], H, W, nb);                                                                                   \
        for (int64_t h = 0; h < heads; h++) {                                                                         \
            const S *kn[9], *vn[9];                                                                                   \
            at_##SUF(nb, k, ks, h * HD, dead, kn);                                                                    \
            at_##SUF(nb, v, vs, h * DV, dead, vn);                                                                    \
            T s[9], m, z = 0, *a = attn + (r * heads + h) * 9;                                                        \
            dots9_##SUF(q + cells[r] * qs + h * HD, kn, s, HD);                                                       \
            m = s[0];                                                                                                 \
            for (int n = 1; n < 9; n++) m = s[n] > m ? s[n] : m;                                                      \
            for (int n = 0; n < 9; n++) { s[n] = EXP((s[n] - m) * scale); z += s[n]; }                                \
            for (int n = 0; n < 9; n++) a[n] = s[n] / z;                                                              \
            mixn_##SUF(9, a, vn, out + (r * heads + h) * DV, DV);                                                     \
        }                                                                                                             \
    }                                                                                                                 \
}                                                                                                                     \
                                                                                                                      \
/* The gradients of q, k, v (written through their row strides gqs, gks, gvs) from go (N, heads·DV). row_of           \
 * (B·H·W): each row's index in `cells`, or -1; gl (N, heads, 9): scratch for the logits' gradient. */                \
void na_backward_##SUF(const S *q, const S *k, const S *v, int64_t qs, int64_t ks, int64_t vs, const S *dead,         \
                       const int64_t *cells, const int64_t *row_of, int64_t N, const T *attn, const S *go, T *gl,     \
                       S *gq, S *gk, S *gv, int64_t gqs, int64_t gks, int64_t gvs, int64_t rows, int64_t H,           \
                       int64_t W, int64_t heads, T scale, int threads) {                                              \
    _Pragma("omp parallel num_threads(threads)")                                                                      \
    {                                                                                                                 \
    /* Queries, and the logits' gradient, at the selected rows. */                                                    \
    _Pragma("omp for schedule(static)")                                                                               \
    for (int64_t r = 0; r < N; r++) {                                                                                 \
        int64_t nb[9];                                                                                                \
        window(cells[r], H, W, nb);                                                                                   \
        for (int64_t h = 0; h < heads; h++) {                                                                         \
            const S *kn[9], *vn[9];                                                                                   \
            const T *a = attn + (r * heads + h) * 9;                                                                  \
            at_##SUF(nb, k, ks, h * HD, dead, kn);                                                                    \
            at_##SUF(nb, v, vs, h * DV, dead, vn);                                                                    \
            T ga[9], dot = 0, *l = gl + (r * heads + h) * 9;                                                          \
            dots9_##SUF(go + (r * heads + h) * DV, vn, ga, DV);                                                       \
            for (int n = 0; n < 9; n++) dot += a[n] * ga[n];                                                          \
            for (int n = 0; n < 9; n++) l[n] = a[n] * (ga[n] - dot) * scale;                                          \
            mixn_##SUF(9, l, kn, gq + cells[r] * gqs + h * HD, HD);                                                   \
        }                                                                                                             \
    }                                                                                                                 \
    /* Keys and values: each row gathers from the selected rows whose window holds it, so no two threads write the    \
     * same memory and the result does not depend on their number. */                                                 \
    _Pragma("omp for schedule(static)")                                                                               \
    for (int64_t cell = 0; cell < rows; cell++) {                                                                     \
        int64_t from[9], src[9];                                                                                      \
        int held[9], count = 0;                                                                                       \
        holders(cell, H, W, from);                                                                                    \
        if (row_of[cell] < 0) memset(gq + cell * gqs, 0, heads * HD * sizeof(S));                                     \
        for (int n = 0; n < 9; n++)                                                                                   \
            if (from[n] >= 0 && row_of[from[n]] >= 0) { held[count] = n; src[count++] = row_of[from[n]]; }            \
        for (int64_t h = 0; h < heads; h++) {                                                                         \
            T wl[9], wa[9];                                                                                           \
            const S *qn[9], *gn[9];                                                                                   \
            for (int e = 0; e < count; e++) {                                                                         \
                int64_t r = src[e], at = (r * heads + h) * 9 + held[e];                                               \
                wl[e] = gl[at];                                                                                       \
                wa[e] = attn[at];                                                                                     \
                qn[e] = q + cells[r] * qs + h * HD;                                                                   \
                gn[e] = go + (r * heads + h) * DV;                                                                    \
            }                                                                                                         \
            mixn_##SUF(count, wl, qn, gk + cell * gks + h * HD, HD);                                                  \
            mixn_##SUF(count, wa, gn, gv + cell * gvs + h * DV, DV);                                                  \
        }                                                                                                             \
    }                                                                                                                 \
    }                                                                                                                 \
}

DEFINE(float, float, f32, expf)
DEFINE(double, double, f64, exp)
DEFINE(bf16, float, bf16, expf)
