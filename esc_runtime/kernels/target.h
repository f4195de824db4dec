// The instruction-set variants of the kernels. setup.py compiles every kernel source once per variant, with
// -DESC_VARIANT_AVX512 or -DESC_VARIANT_AVX2, into one library (esc_runtime/_esc_kernels.so); esc_runtime/native.py
// picks the variant the CPU runs. A variant's exported functions carry its name (esc_window_attention_avx512), its
// C++ code lives in its own namespace (esc_avx512), and its target is set by a pragma around the kernels' code:
//
//     #include "target.h"      // first: every standard header, at the baseline x86-64 target
//     ESC_TARGET_BEGIN
//     #include "vector.h"      // the kernels' own code, at the variant's target
//     ...
//     ESC_TARGET_END
//
// Why a pragma and not -mavx512f on the command line: the inline functions and templates of the standard headers
// (std::vector<float>'s constructor, say) are emitted in every object as weak copies, and the linker keeps one copy
// for both variants. Compiled with -mavx512f, that copy could hold AVX-512 instructions and the AVX2 variant would
// fault on a CPU without AVX-512. Outside the pragma they stay baseline x86-64 code (inlined where the kernels call
// them), and nothing outside a variant's namespace and exports uses the variant's instructions
// (tests/test_native.py disassembles the library to check this).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include <immintrin.h>
#include <omp.h>

#if defined(ESC_VARIANT_AVX512)
// x86-64-v4: AVX-512 F, BW, CD, DQ and VL on top of x86-64-v3
#define ESC_VARIANT avx512
#define ESC_AVX512 1
#define ESC_TARGET "avx512f,avx512bw,avx512cd,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2,lzcnt,movbe,popcnt"
#elif defined(ESC_VARIANT_AVX2)
// x86-64-v3: AVX2, FMA and their companions (every x86-64 CPU since Haswell and Zen)
#define ESC_VARIANT avx2
#define ESC_AVX512 0
#define ESC_TARGET "avx2,fma,f16c,bmi,bmi2,lzcnt,movbe,popcnt"
#else
#error "compile the kernels with -DESC_VARIANT_AVX512 or -DESC_VARIANT_AVX2 (setup.py does)"
#endif

#define ESC_JOIN_(a, b) a##_##b
#define ESC_JOIN(a, b) ESC_JOIN_(a, b)
// The variant's namespace: esc_avx512 or esc_avx2.
#define ESC_NS ESC_JOIN(esc, ESC_VARIANT)
// An exported function's name: ESC_EXPORT(esc_conv_ffn) is esc_conv_ffn_avx512 in the AVX-512 variant. The library
// is built with -fvisibility=hidden: these are its only symbols besides esc_kernel_variants (library.cpp).
#define ESC_EXPORT(name) __attribute__((visibility("default"))) ESC_JOIN(name, ESC_VARIANT)

#define ESC_PRAGMA_(text) _Pragma(#text)
#define ESC_PRAGMA(text) ESC_PRAGMA_(text)
#if defined(__clang__)
#define ESC_TARGET_BEGIN ESC_PRAGMA(clang attribute push(__attribute__((target(ESC_TARGET))), apply_to = function))
#define ESC_TARGET_END ESC_PRAGMA(clang attribute pop)
#else
#define ESC_TARGET_BEGIN ESC_PRAGMA(GCC push_options) ESC_PRAGMA(GCC target(ESC_TARGET))
#define ESC_TARGET_END ESC_PRAGMA(GCC pop_options)
#endif
