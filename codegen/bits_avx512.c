/* The packed 1-bit / ternary product for a few rows on x86 CPUs with AVX-512 (codegen/native.py
 * builds it, codegen/binary_cpu.py calls it).
 *
 * A packed word's 32 bits are the signs of 32 consecutive columns (fxopt/bits.py: bit j of word w
 * is column 32·w + j); each 16-bit half is an AVX-512 lane mask as it stands. So Σ bit·x over 16
 * columns is one masked add of 16 floats of x, and no weight is ever turned into a number:
 *
 *   binary:   x·Wᵀ = 2·Σ_{bit set} x − Σ x
 *   ternary:  x·Wᵀ = Σ_{mask ∧ sign} x − Σ_{mask ∧ ¬sign} x   (a masked add and a masked subtract)
 *
 * in fp32, no quantization: the reference's sums up to their order. Eight accumulators (four words
 * unrolled, two halves each) keep the adds independent. x: (m, 32·W) floats, zero past K (the
 * padding's bits add zeros); plus, minus: (n, W) words; out: (m, n). Outputs are split across
 * `threads` OpenMP threads.
 */
#include <immintrin.h>
#include <stdint.h>

/* Σ x over a padded row of `words` · 32 floats. */
static inline float row_sum(const float *x, int64_t words) {
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    for (int64_t i = 0; i < 32 * words; i += 32) {
        a = _mm512_add_ps(a, _mm512_loadu_ps(x + i));
        b = _mm512_add_ps(b, _mm512_loadu_ps(x + i + 16));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a, b));
}

#define LO(w) ((__mmask16)((uint32_t)(w) & 0xFFFFu))
#define HI(w) ((__mmask16)((uint32_t)(w) >> 16))

/* Σ x over the columns whose bit is set in `plus`, minus Σ x over those set in `minus` (NULL: none). */
static inline float masked_sum(const float *x, const int32_t *plus, const int32_t *minus, int64_t words) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    int64_t w = 0;
#define ADD4(op, planes)                                                                          \
    {                                                                                             \
        uint32_t b0 = (uint32_t)planes[w], b1 = (uint32_t)planes[w + 1], b2 = (uint32_t)planes[w + 2], \
                 b3 = (uint32_t)planes[w + 3];                                                    \
        a0 = op(a0, LO(b0), a0, _mm512_loadu_ps(p));                                              \
        a1 = op(a1, HI(b0), a1, _mm512_loadu_ps(p + 16));                                         \
        a2 = op(a2, LO(b1), a2, _mm512_loadu_ps(p + 32));                                         \
        a3 = op(a3, HI(b1), a3, _mm512_loadu_ps(p + 48));                                         \
        a4 = op(a4, LO(b2), a4, _mm512_loadu_ps(p + 64));                                         \
        a5 = op(a5, HI(b2), a5, _mm512_loadu_ps(p + 80));                                         \
        a6 = op(a6, LO(b3), a6, _mm512_loadu_ps(p + 96));                                         \
        a7 = op(a7, HI(b3), a7, _mm512_loadu_ps(p + 112));                                        \
    }
    for (; w + 4 <= words; w += 4) {
        const float *p = x + 32 * w;
        ADD4(_mm512_mask_add_ps, plus)
        if (minus)
            ADD4(_mm512_mask_sub_ps, minus)
    }
#undef ADD4
    for (; w < words; w++) {
        const float *p = x + 32 * w;
        a0 = _mm512_mask_add_ps(a0, LO(plus[w]), a0, _mm512_loadu_ps(p));
        a1 = _mm512_mask_add_ps(a1, HI(plus[w]), a1, _mm512_loadu_ps(p + 16));
        if (minus) {
            a2 = _mm512_mask_sub_ps(a2, LO(minus[w]), a2, _mm512_loadu_ps(p));
            a3 = _mm512_mask_sub_ps(a3, HI(minus[w]), a3, _mm512_loadu_ps(p + 16));
        }
    }
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                             _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
    return _mm512_reduce_add_ps(s);
}

/* minus == NULL: binary, `plus` the sign plane; else ternary, plus = mask ∧ sign, minus = mask ∧ ¬sign
 * (two planes made once from the layer's sign and mask planes, the same 2 bits per weight). */
void fxopt_bits_product(const float *x, const int32_t *plus, const int32_t *minus, float *out, int64_t m,
                        int64_t n, int64_t words, int threads) {
    float sums[64];  /* the caller passes at most 64 rows */
    int binary = minus == 0;
    if (binary)
        for (int64_t r = 0; r < m; r++)
            sums[r] = row_sum(x + r * 32 * words, words);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < n; o++) {
        const int32_t *po = plus + o * words;
        const int32_t *mo = binary ? 0 : minus + o * words;
        for (int64_t r = 0; r < m; r++) {
            const float *xr = x + r * 32 * words;
            if (binary)
                out[r * n + o] = 2.0f * masked_sum(xr, po, 0, words) - sums[r];
            else
                out[r * n + o] = masked_sum(xr, po, mo, words);
        }
    }
}
