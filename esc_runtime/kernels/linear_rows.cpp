// A 1x1 convolution on rows of pixels (channels-last maps), optionally after a per-pixel LayerNorm and before an
// added residual, for CPU inference: ESC's attention projections, with the LayerNorm in front of to_qkv fused in so
// the normalised map is never written. Built and loaded with the other kernels (setup.py, esc_runtime/native.py).
//
// Layout. x: (rows, inputs) floats; out and add: (rows, outputs); weight: (inputs, outputs) transposed, outputs a
// multiple of 16; norm_weight / norm_bias: (inputs), or null for no LayerNorm.

#include "target.h"

ESC_TARGET_BEGIN
#include "gemm.h"

namespace ESC_NS {
namespace {

constexpr int64_t CHUNK = 96;  // pixels per task: a multiple of the row GEMM's 6-pixel blocks

}  // namespace

// Plain C ABI (loaded with ctypes); the names carry the variant (target.h).
extern "C" {

// Returns 0 on success, 1 for arguments the kernel does not take, 2 when its buffers cannot be allocated.
int ESC_EXPORT(esc_linear_rows)(const float* x, int64_t rows, int inputs, const float* weight, const float* bias,
                                int outputs, const float* norm_weight, const float* norm_bias, float eps,
                                const float* add, float* out, int threads) {
    if (rows < 1 || inputs < 1 || outputs < LANES || outputs % LANES) return 1;
    const int64_t chunks = (rows + CHUNK - 1) / CHUNK;
    std::atomic<bool> failed{false};
#pragma omp parallel num_threads(threads)
    {
        std::unique_ptr<float[]> normed;
        if (norm_weight) {
            try {
                normed.reset(new float[static_cast<size_t>(CHUNK) * inputs]);
            } catch (const std::bad_alloc&) {
                failed = true;
            }
        }
#pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; ++c) {
            if (norm_weight && !normed) continue;
            const int64_t first = c * CHUNK, pixels = std::min(CHUNK, rows - first);
            const float* in = x + first * inputs;
            if (norm_weight) {
                layer_norm(in, pixels, inputs, norm_weight, norm_bias, eps, normed.get());
                in = normed.get();
            }
            gemm_row<false>(in, static_cast<int>(pixels), inputs, weight, outputs, bias,
                            add ? add + first * outputs : nullptr, out + first * outputs);
        }
    }
    return failed ? 2 : 0;
}

// The machine's fused multiply-add peak for benchmarks/flops.py: each of `threads` threads runs `iterations` rounds of
// 12 independent register FMAs (enough chains to cover the FMA latency on two pipes: 4 cycles x 2, plus slack), so
// the rate is 2 x 12 x REG x iterations x threads flops over the wall time the caller measures. Writes the lanes'
// sum to *sink (so that nothing is optimised away) and returns the floats per register.
int ESC_EXPORT(esc_fma_peak)(int64_t iterations, float* sink, int threads) {
    float total = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        reg acc[12];
        for (int j = 0; j < 12; ++j) acc[j] = splat_reg(1.0f + j * 1e-3f);
        const reg a = splat_reg(0.999999f), b = splat_reg(1e-7f);
        for (int64_t i = 0; i < iterations; ++i)
            for (int j = 0; j < 12; ++j) acc[j] = acc[j] * a + b;
        for (int j = 0; j < 12; ++j) total += sum_lanes(acc[j]);
    }
    *sink = total;
    return REG;
}

}  // extern "C"

}  // namespace ESC_NS

ESC_TARGET_END
