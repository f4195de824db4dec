// What the library holds: the instruction-set variants it was built with (target.h), as a bit mask (1: AVX2,
// 2: AVX-512; setup.py defines ESC_BUILT_VARIANTS). esc_runtime/native.py reads it after loading the library and
// uses a variant only if the library has it and the CPU runs it. Compiled once, at the baseline x86-64 target.
#ifndef ESC_BUILT_VARIANTS
#error "setup.py defines ESC_BUILT_VARIANTS"
#endif

extern "C" __attribute__((visibility("default"))) int esc_kernel_variants() { return ESC_BUILT_VARIANTS; }
