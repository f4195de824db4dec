// 16-float vectors for the CPU kernels: one AVX-512 register, or two AVX2 registers (GCC/Clang vector extensions),
// and the transcendental functions the kernels need on them. Included inside ESC_TARGET_BEGIN / ESC_TARGET_END
// (target.h): compiled once per variant, in the variant's namespace.
#pragma once

#ifndef ESC_NS
#error "include target.h first"
#endif

namespace ESC_NS {

typedef float v16f __attribute__((vector_size(64)));
typedef float v16f_unaligned __attribute__((vector_size(64), aligned(4)));
typedef int32_t v16i __attribute__((vector_size(64)));

constexpr int LANES = 16;

inline v16f load(const float* p) { return *reinterpret_cast<const v16f_unaligned*>(p); }
inline void store(float* p, v16f v) { *reinterpret_cast<v16f_unaligned*>(p) = v; }
inline v16f splat(float x) { return v16f{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
inline v16f select(v16i mask, v16f a, v16f b) { return mask ? a : b; }

// 2^y for y < 128 (0 below -149): y = n + f with n an integer and |f| <= 1/2, 2^f by its degree-6 Taylor polynomial (relative error
// below 1.2e-7, about one ulp), 2^n applied to the exponent.
inline v16f exp2(v16f y) {
#if ESC_AVX512
    const v16f n = (v16f)_mm512_roundscale_ps((__m512)y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    y = y < splat(-126.0f) ? splat(-126.0f) : y;  // keeps 2^n a normal float for the exponent arithmetic below
    const v16f magic = splat(12582912.0f);         // 1.5 * 2^23: adding it rounds to an integer
    const v16f n = (y + magic) - magic;
#endif
    const v16f f = y - n;
    v16f p = splat(1.5403530393381609e-4f);  // ln2^6 / 6!
    p = p * f + splat(1.3333558146428443e-3f);
    p = p * f + splat(9.6181291076284772e-3f);
    p = p * f + splat(5.5504108664821580e-2f);
    p = p * f + splat(2.4022650695910071e-1f);
    p = p * f + splat(6.9314718055994531e-1f);
    p = p * f + splat(1.0f);
#if ESC_AVX512
    return (v16f)_mm512_scalef_ps((__m512)p, (__m512)n);  // p * 2^n, underflowing to 0 below 2^-149
#else
    const v16i exponent = (__builtin_convertvector(n, v16i) + 127) << 23;
    return p * (v16f)exponent;
#endif
}

// The exact (erf) GELU, x * (1 + erf(x / sqrt 2)) / 2, as torch's F.gelu computes it. 1 + erf(z) is erfc(-z), and
// erfc(|z|) = t exp(-z^2 + P(t)) with t = 1 / (1 + |z| / 2) and P the Chebyshev fit of Numerical Recipes (relative
// error below 1.2e-7 for every z): no cancellation where erfc is small.
inline v16f gelu(v16f x) {
    const v16f z = x * splat(0.70710678118654752f);
    const v16f a = z < splat(0.0f) ? -z : z;
    const v16f t = splat(1.0f) / (splat(1.0f) + splat(0.5f) * a);
    v16f p = splat(0.17087277f);
    p = p * t + splat(-0.82215223f);
    p = p * t + splat(1.48851587f);
    p = p * t + splat(-1.13520398f);
    p = p * t + splat(0.27886807f);
    p = p * t + splat(-0.18628806f);
    p = p * t + splat(0.09678418f);
    p = p * t + splat(0.37409196f);
    p = p * t + splat(1.00002368f);
    p = p * t + splat(-1.26551223f);
    const v16f exponent = (p - a * a) * splat(1.4426950408889634f);  // to base 2
    const v16f erfc_a = t * exp2(exponent);
    const v16f one_plus_erf = z < splat(0.0f) ? erfc_a : splat(2.0f) - erfc_a;
    return splat(0.5f) * x * one_plus_erf;
}

}  // namespace ESC_NS
