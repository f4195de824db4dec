// Row-by-row matrix products for the CPU kernels: a row of pixels (channels-last: each pixel's channels consecutive)
// times a (inputs, outputs) weight matrix, with the bias, then GELU or an added row, in registers; and the per-pixel
// LayerNorm that precedes some of them.
// Included inside ESC_TARGET_BEGIN / ESC_TARGET_END (target.h), as vector.h.
#pragma once

#include "vector.h"

namespace ESC_NS {

// out[p][o] = act(bias[o] + sum_i in[p][i] w[i][o] (+ add[p][o])) for PIXELS pixels and COLS registers of outputs:
// PIXELS x COLS accumulators, COLS weight registers and one broadcast input, all in registers.
template <int PIXELS, int COLS, bool GELU>
inline void gemm_block(const float* in, int in_stride, int inputs, const float* w, int w_stride, const float* bias,
                       const float* add, int add_stride, float* out, int out_stride) {
    static_assert(PIXELS * COLS + COLS + 1 <= REGISTERS, "the block must fit the registers (no spills)");
    reg acc[PIXELS][COLS];
    for (int g = 0; g < COLS; ++g) {
        const reg b = load_reg(bias + g * REG);
        for (int p = 0; p < PIXELS; ++p) acc[p][g] = b;
    }
    for (int i = 0; i < inputs; ++i) {
        reg wv[COLS];
        for (int g = 0; g < COLS; ++g) wv[g] = load_reg(w + i * w_stride + g * REG);
        for (int p = 0; p < PIXELS; ++p) {
            const reg xv = splat_reg(in[p * in_stride + i]);
            for (int g = 0; g < COLS; ++g) acc[p][g] += xv * wv[g];
        }
    }
    for (int p = 0; p < PIXELS; ++p)
        for (int g = 0; g < COLS; ++g) {
            reg v = acc[p][g];
            if (GELU) v = gelu(v);
            if (add) v += load_reg(add + p * add_stride + g * REG);
            store(out + p * out_stride + g * REG, v);
        }
}

// The register block: 6 pixels x COLS registers of outputs, as BLIS's and oneDNN's kernels block. AVX-512: 6 x 4
// (24 accumulators of 32 registers; 64 outputs per pass over the input); AVX2: 6 x 2 (12 of 16: 16 outputs).
constexpr int GEMM_PIXELS = 6;
constexpr int GEMM_COLS = ESC_AVX512 ? 4 : 2;

// A row of `width` pixels: out = act(in w + bias (+ add)), outputs in groups of up to GEMM_COLS registers, pixels
// in blocks of GEMM_PIXELS. outputs is a multiple of 16 (and so of REG).
template <bool GELU>
void gemm_row(const float* in, int width, int inputs, const float* w, int outputs, const float* bias, const float* add,
              float* out) {
    for (int o = 0; o < outputs; o += GEMM_COLS * REG) {
        const int group = std::min(GEMM_COLS, (outputs - o) / REG);
        const float* a = add ? add + o : nullptr;
        int p = 0;
#define ESC_GEMM(P, G) gemm_block<P, G, GELU>(in + p * inputs, inputs, inputs, w + o, outputs, bias + o, \
                                              a ? a + p * outputs : nullptr, outputs, out + p * outputs + o, outputs)
#define ESC_GEMM_GROUPS(P)                          \
    switch (group) {                                \
        case 4: ESC_GEMM(P, (GEMM_COLS >= 4 ? 4 : 1)); break; \
        case 3: ESC_GEMM(P, (GEMM_COLS >= 3 ? 3 : 1)); break; \
        case 2: ESC_GEMM(P, 2); break;              \
        default: ESC_GEMM(P, 1); break;             \
    }
        for (; p + GEMM_PIXELS <= width; p += GEMM_PIXELS) ESC_GEMM_GROUPS(GEMM_PIXELS)
        for (; p < width; ++p) ESC_GEMM_GROUPS(1)
#undef ESC_GEMM_GROUPS
#undef ESC_GEMM
    }
}

// dst[p] = (src[p] - mean) / sqrt(var + eps) * weight + bias over each pixel's `inputs` channels (biased variance,
// as torch's layer_norm)
inline void layer_norm(const float* src, int64_t pixels, int inputs, const float* weight, const float* bias, float eps,
                       float* dst) {
    for (int64_t p = 0; p < pixels; ++p) {
        const float* x = src + p * inputs;
        float* y = dst + p * inputs;
        if (inputs % REG == 0) {  // by registers: the scalar sums below are chains the compiler may not reorder
            reg sum = reg{};
            for (int i = 0; i < inputs; i += REG) sum += load_reg(x + i);
            const reg mean = splat_reg(sum_lanes(sum) / inputs);
            reg squares = reg{};
            for (int i = 0; i < inputs; i += REG) {
                const reg d = load_reg(x + i) - mean;
                squares += d * d;
            }
            const reg inv = splat_reg(1.0f / std::sqrt(sum_lanes(squares) / inputs + eps));
            for (int i = 0; i < inputs; i += REG)
                store(y + i, (load_reg(x + i) - mean) * inv * load_reg(weight + i) + load_reg(bias + i));
            continue;
        }
        float mean = 0.0f;
        for (int i = 0; i < inputs; ++i) mean += x[i];
        mean /= inputs;
        float var = 0.0f;
        for (int i = 0; i < inputs; ++i) var += (x[i] - mean) * (x[i] - mean);
        const float inv = 1.0f / std::sqrt(var / inputs + eps);
        for (int i = 0; i < inputs; ++i) y[i] = (x[i] - mean) * inv * weight[i] + bias[i];
    }
}

}  // namespace ESC_NS
