// Row-by-row matrix products for the CPU kernels: a row of pixels (channels-last: each pixel's channels consecutive)
// times a (inputs, outputs) weight matrix, with the bias, then GELU or an added row, in registers; and the per-pixel
// LayerNorm that precedes some of them.
// Included inside ESC_TARGET_BEGIN / ESC_TARGET_END (target.h), as vector.h.
#pragma once

#include "vector.h"

namespace ESC_NS {

// out[p][o] = act(bias[o] + sum_i in[p][i] w[i][o] (+ add[p][o])) for PIXELS pixels and GROUP vectors of outputs.
template <int PIXELS, int GROUP, bool GELU>
inline void gemm_block(const float* in, int in_stride, int inputs, const float* w, int w_stride, const float* bias,
                       const float* add, int add_stride, float* out, int out_stride) {
    v16f acc[PIXELS][GROUP];
    for (int g = 0; g < GROUP; ++g) {
        const v16f b = load(bias + g * LANES);
        for (int p = 0; p < PIXELS; ++p) acc[p][g] = b;
    }
    for (int i = 0; i < inputs; ++i) {
        v16f wv[GROUP];
        for (int g = 0; g < GROUP; ++g) wv[g] = load(w + i * w_stride + g * LANES);
        for (int p = 0; p < PIXELS; ++p) {
            const v16f xv = splat(in[p * in_stride + i]);
            for (int g = 0; g < GROUP; ++g) acc[p][g] += xv * wv[g];
        }
    }
    for (int p = 0; p < PIXELS; ++p)
        for (int g = 0; g < GROUP; ++g) {
            v16f v = acc[p][g];
            if (GELU) v = gelu(v);
            if (add) v += load(add + p * add_stride + g * LANES);
            store(out + p * out_stride + g * LANES, v);
        }
}

// A row of `width` pixels: out = act(in w + bias (+ add)), outputs in groups of up to 4 vectors, pixels in blocks.
template <bool GELU>
void gemm_row(const float* in, int width, int inputs, const float* w, int outputs, const float* bias, const float* add,
              float* out) {
    constexpr int BLOCK = 6;  // 6 pixels x 4 vectors: 24 accumulators of 32 registers
    for (int o = 0; o < outputs; o += 4 * LANES) {
        const int group = std::min(4, (outputs - o) / LANES);
        const float* a = add ? add + o : nullptr;
        int p = 0;
#define ESC_GEMM(P, G) gemm_block<P, G, GELU>(in + p * inputs, inputs, inputs, w + o, outputs, bias + o, \
                                              a ? a + p * outputs : nullptr, outputs, out + p * outputs + o, outputs)
        for (; p + BLOCK <= width; p += BLOCK) {
            switch (group) {
                case 4: ESC_GEMM(BLOCK, 4); break;
                case 3: ESC_GEMM(BLOCK, 3); break;
                case 2: ESC_GEMM(BLOCK, 2); break;
                default: ESC_GEMM(BLOCK, 1); break;
            }
        }
        for (; p < width; ++p) {
            switch (group) {
                case 4: ESC_GEMM(1, 4); break;
                case 3: ESC_GEMM(1, 3); break;
                case 2: ESC_GEMM(1, 2); break;
                default: ESC_GEMM(1, 1); break;
            }
        }
#undef ESC_GEMM
    }
}

// dst[p] = (src[p] - mean) / sqrt(var + eps) * weight + bias over each pixel's `inputs` channels (biased variance,
// as torch's layer_norm)
inline void layer_norm(const float* src, int64_t pixels, int inputs, const float* weight, const float* bias, float eps,
                float* dst) {
    for (int64_t p = 0; p < pixels; ++p) {
        const float* x = src + p * inputs;
        float mean = 0.0f;
        for (int i = 0; i < inputs; ++i) mean += x[i];
        mean /= inputs;
        float var = 0.0f;
        for (int i = 0; i < inputs; ++i) var += (x[i] - mean) * (x[i] - mean);
        const float inv = 1.0f / std::sqrt(var / inputs + eps);
        for (int i = 0; i < inputs; ++i) dst[p * inputs + i] = (x[i] - mean) * inv * weight[i] + bias[i];
    }
}

}  // namespace ESC_NS
