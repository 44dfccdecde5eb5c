/* The packed 1-bit / ternary product on x86 CPUs with AVX-512, at any batch size (codegen/native.py
 * builds it, codegen/binary_cpu.py calls it): table lookups, as T-MAC does for low-bit weights,
 * in fp32.
 *
 * For each group of 4 columns, a row of x has 16 subset sums, entry c = Σ_{bit i of c} x[4g + i]:
 * one 16-float table, one AVX-512 register. The weights of 16 outputs for that group are 16 4-bit
 * indices; `vpermps` looks all 16 up at once, so 64 weights cost one permute and one add, and the
 * 16 outputs sit in the lanes of the accumulator (no horizontal sums):
 *
 *   binary:   x·Wᵀ = 2·Σ_{bit set} x − Σ x
 *   ternary:  x·Wᵀ = Σ_{mask ∧ sign} x − Σ_{mask ∧ ¬sign} x   (two lookups into the same table)
 *
 * in fp32, no quantization: the reference's sums up to their order.
 *
 * Layout (made once from the packed planes by binary_cpu.lut_layout, the same bits): for each block
 * of 16 outputs and each pair p of groups (columns 8p .. 8p + 7), 16 bytes, byte j = that output's
 * packed byte p (low nibble: columns 8p .. 8p + 3; fxopt/bits.py packs column 32·w + j into bit j of
 * word w, little-endian, so byte p of a row's words is columns 8p .. 8p + 7). Outputs past n are
 * zero bytes.
 *
 * x: (m, 32·W) floats, zero past K; out: (m, n). Each thread takes a contiguous range of output
 * blocks and walks K in chunks whose tables it builds itself (TABLE_FLOATS), adding each chunk's
 * sums into `out`. With `scale` (n floats; and `bias`, n floats or NULL) the last chunk finishes
 * each output, clamp(y·scale + bias, low, high) (±inf: no bound; a NaN stays NaN, as in
 * torch.clamp): a relu or clamp the fuse pass put after the layer then costs no second pass over
 * the output, which on 2 cores would also read the half the other core wrote. Returns 1 where some
 * row's Σ x is not finite (an inf or a NaN in the row, or a sum that overflowed: the caller
 * recomputes such rows), -1 where memory for the row sums could not be had, else 0.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

/* A thread's tables per chunk of K. One row: up to 64 KB (K ≤ 16384 in one chunk, so each thread
 * reads its weights as one stream; from L2 the lookups run as fast as from L1). More rows: 16 KB,
 * half of L1, since each weight byte then feeds that many rows' loads (4096 × 4096, 4 rows: 320 µs
 * against 375 µs with 64 KB on the 2-core EPYC VM). */
#define TABLE_FLOATS 16384
#define L1_TABLE_FLOATS 4096
#define BY_ROWS_BYTES (256 << 10) /* weights up to this size: threads may split the rows */

/* Σ x over a padded row of `words` · 32 floats. */
static inline float row_sum(const float *x, int64_t words) {
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    for (int64_t i = 0; i < 32 * words; i += 32) {
        a = _mm512_add_ps(a, _mm512_loadu_ps(x + i));
        b = _mm512_add_ps(b, _mm512_loadu_ps(x + i + 16));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a, b));
}

/* The tables of `rows` rows (`stride` floats apart) for `pairs` pairs of groups from pair p0:
 * t holds rows × pairs · 32 floats. */
static void build_tables(const float *x, int64_t stride, int rows, int64_t p0, int64_t pairs, float *t) {
    for (int r = 0; r < rows; r++)
        for (int64_t g = 0; g < 2 * pairs; g++) {
            const float *xg = x + r * stride + 8 * p0 + 4 * g;
            __m512 v = _mm512_setzero_ps();
            v = _mm512_mask_add_ps(v, 0xAAAA, v, _mm512_set1_ps(xg[0]));
            v = _mm512_mask_add_ps(v, 0xCCCC, v, _mm512_set1_ps(xg[1]));
            v = _mm512_mask_add_ps(v, 0xF0F0, v, _mm512_set1_ps(xg[2]));
            v = _mm512_mask_add_ps(v, 0xFF00, v, _mm512_set1_ps(xg[3]));
            _mm512_store_ps(t + r * 32 * pairs + 16 * g, v);
        }
}

/* One pair of groups for a block's 16 outputs: the lookups of `rows` rows added into accumulators
 * j and j + 1 (ternary: minus those of the −1 plane `wm`). */
static inline __attribute__((always_inline)) void lookup_pair(const uint8_t *wp, const uint8_t *wm, const float *t,
                                                              int64_t tstride, int64_t p, __m512 a[][4],
                                                              const int j, const int rows) {
    const __m512i low = _mm512_set1_epi32(15);
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wp + 16 * p)));
    __m512i lo = _mm512_and_epi32(b, low), hi = _mm512_srli_epi32(b, 4), lo2 = lo, hi2 = hi;
    if (wm) {
        __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wm + 16 * p)));
        lo2 = _mm512_and_epi32(c, low), hi2 = _mm512_srli_epi32(c, 4);
    }
    for (int r = 0; r < rows; r++) {
        const float *tr = t + r * tstride + 32 * p;
        __m512 t0 = _mm512_load_ps(tr), t1 = _mm512_load_ps(tr + 16);
        a[r][j] = _mm512_add_ps(a[r][j], _mm512_permutexvar_ps(lo, t0));
        a[r][j + 1] = _mm512_add_ps(a[r][j + 1], _mm512_permutexvar_ps(hi, t1));
        if (wm) {
            a[r][j] = _mm512_sub_ps(a[r][j], _mm512_permutexvar_ps(lo2, t0));
            a[r][j + 1] = _mm512_sub_ps(a[r][j + 1], _mm512_permutexvar_ps(hi2, t1));
        }
    }
}

/* A block's 16 sums over `pairs` pairs for `rows` rows (at most 4): two pairs per step into four
 * accumulators per row (the adds' latency). Always inlined with a constant `rows`, so the row loops
 * unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void block_sums(const uint8_t *wp, const uint8_t *wm, const float *t,
                                                             int64_t pairs, __m512 *acc, const int rows) {
    __m512 a[4][4];
    for (int r = 0; r < rows; r++)
        a[r][0] = a[r][1] = a[r][2] = a[r][3] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p += 2) { /* pairs is even: 4 per word */
        lookup_pair(wp, wm, t, 32 * pairs, p, a, 0, rows);
        lookup_pair(wp, wm, t, 32 * pairs, p + 1, a, 2, rows);
    }
    for (int r = 0; r < rows; r++)
        acc[r] = _mm512_add_ps(_mm512_add_ps(a[r][0], a[r][1]), _mm512_add_ps(a[r][2], a[r][3]));
}

/* minus == NULL: binary, `plus` the sign plane's layout; else ternary, plus and minus the layouts of
 * mask ∧ sign and mask ∧ ¬sign. scale == NULL: the bare products. */
int fxopt_bits_product(const float *x, const uint8_t *plus, const uint8_t *minus, const float *scale,
                       const float *bias, float low, float high, float *out, int64_t m, int64_t n, int64_t words,
                       int threads) {
    int64_t pairs = 4 * words, blocks = (n + 15) / 16, stride = 32 * words;
    float few[64], *sums = m <= 64 ? few : malloc(sizeof(float) * m);
    int binary = minus == 0, finite = 1;
    if (!sums)
        return -1;
    for (int64_t r = 0; r < m; r++) {
        sums[r] = row_sum(x + r * stride, words);
        finite &= isfinite(sums[r]) != 0;
    }
    /* Threads split the outputs (each reads its share of the weights once per 4 rows), or, where
     * there are enough rows and the weights are small enough for every thread to read them all
     * from cache, the rows (each row's tables then built once instead of once per thread: at
     * 512 × 512, 32 rows, 58 → 48 µs on the 2-core EPYC VM). */
    int by_rows = (m + 3) / 4 >= threads && n * words * 4 * (binary ? 1 : 2) <= BY_ROWS_BYTES;
#pragma omp parallel num_threads(threads)
    {
        float t[TABLE_FLOATS] __attribute__((aligned(64)));
        int64_t id = omp_get_thread_num(), count = omp_get_num_threads(), groups = (m + 3) / 4;
        int64_t first = 0, last = blocks, g0 = 0, g1 = groups;
        if (by_rows)
            g0 = groups * id / count, g1 = groups * (id + 1) / count;
        else
            first = blocks * id / count, last = blocks * (id + 1) / count;
        for (int64_t r0 = 4 * g0; r0 < m && r0 < 4 * g1; r0 += 4) {
            int rows = m - r0 < 4 ? (int)(m - r0) : 4;
            int64_t chunk = (rows == 1 ? TABLE_FLOATS / 32 : L1_TABLE_FLOATS / (32 * rows)) & ~(int64_t)1;
            for (int64_t p0 = 0; p0 < pairs; p0 += chunk) {
                int64_t cp = pairs - p0 < chunk ? pairs - p0 : chunk;
                if (first < last)
                    build_tables(x + r0 * stride, stride, rows, p0, cp, t);
                for (int64_t b = first; b < last; b++) {
                    int64_t o = 16 * b;
                    __mmask16 keep = n - o >= 16 ? 0xFFFF : (__mmask16)((1u << (n - o)) - 1);
                    const uint8_t *wp = plus + (b * pairs + p0) * 16;
                    const uint8_t *wm = binary ? 0 : minus + (b * pairs + p0) * 16;
                    __m512 acc[4];
                    switch (rows) {
                    case 1: block_sums(wp, wm, t, cp, acc, 1); break;
                    case 2: block_sums(wp, wm, t, cp, acc, 2); break;
                    case 3: block_sums(wp, wm, t, cp, acc, 3); break;
                    default: block_sums(wp, wm, t, cp, acc, 4);
                    }
                    for (int r = 0; r < rows; r++) {
                        float *dst = out + (r0 + r) * n + o;
                        __m512 y = p0 ? _mm512_add_ps(acc[r], _mm512_maskz_loadu_ps(keep, dst)) : acc[r];
                        if (p0 + cp == pairs) { /* the last chunk: finish */
                            if (binary)
                                y = _mm512_sub_ps(_mm512_add_ps(y, y), _mm512_set1_ps(sums[r0 + r]));
                            if (scale) {
                                y = _mm512_mul_ps(y, _mm512_maskz_loadu_ps(keep, scale + o));
                                if (bias)
                                    y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(keep, bias + o));
                                /* y second: max/min return their second operand where one is NaN */
                                y = _mm512_min_ps(_mm512_set1_ps(high), _mm512_max_ps(_mm512_set1_ps(low), y));
                            }
                        }
                        _mm512_mask_storeu_ps(dst, keep, y);
                    }
                }
            }
        }
    }
    if (sums != few)
        free(sums);
    return !finite;
}
