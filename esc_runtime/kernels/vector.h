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

// One hardware register: what the register-blocked loops (gemm.h, the FFN's depthwise pass, the correlation) block
// on. A v16f is one AVX-512 register but two AVX2 ones, and AVX2 has 16 registers against AVX-512's 32: blocks sized
// in v16f for AVX-512 need four times the registers AVX2 has and spill (the first AVX2 measurement: 2-4x torch's
// time). So those loops count in `reg` (16 floats on AVX-512, 8 on AVX2) and size their blocks by REGISTERS.
typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_unaligned __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32)));
#if ESC_AVX512
typedef v16f reg;
typedef v16i reg_int;
constexpr int REGISTERS = 32;
#else
typedef v8f reg;
typedef v8i reg_int;
constexpr int REGISTERS = 16;
#endif
constexpr int REG = sizeof(reg) / sizeof(float);  // floats per register

inline v8f load(const float* p, v8f) { return *reinterpret_cast<const v8f_unaligned*>(p); }
inline v16f load(const float* p, v16f) { return load(p); }
inline reg load_reg(const float* p) { return load(p, reg{}); }
inline void store(float* p, v8f v) { *reinterpret_cast<v8f_unaligned*>(p) = v; }
inline v8f splat(float x, v8f) { return v8f{x, x, x, x, x, x, x, x}; }
inline v16f splat(float x, v16f) { return splat(x); }
// (not reg{} + x: 0 + x is not x for x = -0, so GCC kept a scalar add in front of every broadcast)
inline reg splat_reg(float x) { return splat(x, reg{}); }
inline float sum_lanes(reg v) {
    float s = 0.0f;
    for (int i = 0; i < REG; ++i) s += v[i];
    return s;
}

// 2^y for y < 128 (0 below -149): y = n + f with n an integer and |f| <= 1/2, 2^f by its degree-6 Taylor polynomial (relative error
// below 1.2e-7, about one ulp), 2^n applied to the exponent.
template <class V, class VI>
inline V exp2(V y) {
    const auto splat = [](float x) { return ESC_NS::splat(x, V{}); };
    V n;
    if constexpr (ESC_AVX512 && sizeof(V) == 64) {
        n = (V)_mm512_roundscale_ps((__m512)y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
        y = y < splat(-126.0f) ? splat(-126.0f) : y;  // keeps 2^n a normal float for the exponent arithmetic below
        const V magic = splat(12582912.0f);            // 1.5 * 2^23: adding it rounds to an integer
        n = (y + magic) - magic;
    }
    const V f = y - n;
    V p = splat(1.5403530393381609e-4f);  // ln2^6 / 6!
    p = p * f + splat(1.3333558146428443e-3f);
    p = p * f + splat(9.6181291076284772e-3f);
    p = p * f + splat(5.5504108664821580e-2f);
    p = p * f + splat(2.4022650695910071e-1f);
    p = p * f + splat(6.9314718055994531e-1f);
    p = p * f + splat(1.0f);
    if constexpr (ESC_AVX512 && sizeof(V) == 64) {
        return (V)_mm512_scalef_ps((__m512)p, (__m512)n);  // p * 2^n, underflowing to 0 below 2^-149
    } else {
        const VI exponent = (__builtin_convertvector(n, VI) + 127) << 23;
        return p * (V)exponent;
    }
}
inline v16f exp2(v16f y) { return exp2<v16f, v16i>(y); }
#if !ESC_AVX512
inline v8f exp2(v8f y) { return exp2<v8f, v8i>(y); }
#endif

// The exact (erf) GELU, x * (1 + erf(x / sqrt 2)) / 2, as torch's F.gelu computes it. 1 + erf(z) is erfc(-z), and
// erfc(|z|) = t exp(-z^2 + P(t)) with t = 1 / (1 + |z| / 2) and P the Chebyshev fit of Numerical Recipes (relative
// error below 1.2e-7 for every z): no cancellation where erfc is small.
template <class V>
inline V gelu_of(V x) {
    const auto splat = [](float v) { return ESC_NS::splat(v, V{}); };
    const V z = x * splat(0.70710678118654752f);
    const V a = z < splat(0.0f) ? -z : z;
    const V t = splat(1.0f) / (splat(1.0f) + splat(0.5f) * a);
    V p = splat(0.17087277f);
    p = p * t + splat(-0.82215223f);
    p = p * t + splat(1.48851587f);
    p = p * t + splat(-1.13520398f);
    p = p * t + splat(0.27886807f);
    p = p * t + splat(-0.18628806f);
    p = p * t + splat(0.09678418f);
    p = p * t + splat(0.37409196f);
    p = p * t + splat(1.00002368f);
    p = p * t + splat(-1.26551223f);
    const V exponent = (p - a * a) * splat(1.4426950408889634f);  // to base 2
    const V erfc_a = t * exp2(exponent);
    const V one_plus_erf = z < splat(0.0f) ? erfc_a : splat(2.0f) - erfc_a;
    return splat(0.5f) * x * one_plus_erf;
}

inline v16f gelu(v16f x) { return gelu_of(x); }
#if !ESC_AVX512
inline v8f gelu(v8f x) { return gelu_of(x); }
#endif

}  // namespace ESC_NS
