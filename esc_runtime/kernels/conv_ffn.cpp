// ESC's ConvFFN for CPU inference, fused: 1x1 expand + GELU, depthwise 3x3 + GELU plus its input, 1x1 project
// (+ an optional residual), one image row at a time, so the expanded maps (hidden channels per pixel) never leave
// the core's cache: each thread keeps the expanded rows above, at and below its current row in a ring of three.
//
// Built and loaded with window_attention.cpp (setup.py, esc_runtime/native.py); why: esc_runtime/native.py.
//
// Layout. x, add, out: (batch, height, width, channels) floats (channels-last maps); norm_weight / norm_bias:
// (channels), a LayerNorm applied to each pixel of x first (ESC's ln_proj, and the conv-stage LayerNorms of the
// variants that have them), or null. Weights, transposed and padded by
// the caller so every row is whole vectors: expand (channels, hidden), depthwise (9, hidden) (tap-major, row by row),
// project (hidden, channels); biases (hidden), (hidden), (channels). hidden and channels are multiples of 16; padded
// hidden channels have zero weights and biases, so they stay 0 and add nothing.

#include "target.h"

ESC_TARGET_BEGIN
#include "gemm.h"
#include "vector.h"

namespace ESC_NS {
namespace {

struct FFN {
    const float *expand, *expand_bias, *depthwise, *depthwise_bias, *project, *project_bias;
    int channels, hidden;
    const float *norm_weight, *norm_bias;  // the LayerNorm in front, or null
    float eps;
};

class RowWorker {
  public:
    RowWorker(const FFN& f, int64_t width)
        : f_(f), width_(width), padded_(width + 2),
          ring_(static_cast<size_t>(3 * padded_ * f.hidden)), mixed_(static_cast<size_t>(width * f.hidden)),
          normed_(f.norm_weight ? static_cast<size_t>(width * f.channels) : 0) {}

    // Rows [first, last) of one image (height rows) from x into out.
    void run(const float* x, const float* add, float* out, int64_t height, int64_t first, int64_t last) {
        const int64_t row_floats = width_ * f_.channels;
        std::fill(ring_.begin(), ring_.end(), 0.0f);  // the zero padding left and right of every expanded row
        for (int64_t r = std::max<int64_t>(first - 1, 0); r <= std::min(first, height - 1); ++r) expand(x, r);
        for (int64_t r = first; r < last; ++r) {
            if (r + 1 < height) expand(x, r + 1);
            mix(r, height);
            gemm_row<false>(mixed_.data(), width_, f_.hidden, f_.project, f_.channels, f_.project_bias,
                            add ? add + r * row_floats : nullptr, out + r * row_floats);
        }
    }

  private:
    float* slot(int64_t r) { return ring_.data() + (r % 3) * padded_ * f_.hidden + f_.hidden; }  // pixel 0 of row r

    void expand(const float* x, int64_t r) {
        const float* row = x + r * width_ * f_.channels;
        if (f_.norm_weight) {
            layer_norm(row, width_, f_.channels, f_.norm_weight, f_.norm_bias, f_.eps, normed_.data());
            row = normed_.data();
        }
        gemm_row<true>(row, width_, f_.channels, f_.expand, f_.hidden, f_.expand_bias, nullptr, slot(r));
    }

    // mixed = GELU(depthwise 3x3 of the expanded rows r-1..r+1, zero-padded) + expanded row r
    void mix(int64_t r, int64_t height) {
        const int hidden = f_.hidden;
        const float* rows[3] = {r > 0 ? slot(r - 1) : nullptr, slot(r), r + 1 < height ? slot(r + 1) : nullptr};
        // one register of channels at a time: its 9 taps stay in registers (as v16f on AVX2 they took 18 of 16)
        for (int c = 0; c < hidden; c += REG) {
            reg tap[9];
            for (int k = 0; k < 9; ++k) tap[k] = load_reg(f_.depthwise + k * hidden + c);
            const reg bias = load_reg(f_.depthwise_bias + c);
            for (int64_t p = 0; p < width_; ++p) {
                reg acc = bias;
                for (int dy = 0; dy < 3; ++dy) {
                    if (!rows[dy]) continue;
                    const float* at = rows[dy] + (p - 1) * hidden + c;
                    acc += load_reg(at) * tap[3 * dy] + load_reg(at + hidden) * tap[3 * dy + 1] +
                           load_reg(at + 2 * hidden) * tap[3 * dy + 2];
                }
                store(mixed_.data() + p * hidden + c, gelu(acc) + load_reg(rows[1] + p * hidden + c));
            }
        }
    }

    const FFN& f_;
    int64_t width_, padded_;
    std::vector<float> ring_, mixed_, normed_;
};

}  // namespace

// Plain C ABI (loaded with ctypes); the names carry the variant (target.h).
extern "C" {

// Returns 0 on success, 1 for channel counts the kernel does not take, 2 when its buffers cannot be allocated.
int ESC_EXPORT(esc_conv_ffn)(const float* x, const float* expand, const float* expand_bias, const float* depthwise,
                             const float* depthwise_bias, const float* project, const float* project_bias,
                             const float* add, float* out, int64_t batch, int64_t height, int64_t width, int channels,
                             int hidden, const float* norm_weight, const float* norm_bias, float eps, int threads) {
    if (channels < LANES || channels % LANES || hidden < LANES || hidden % LANES || batch < 1 || height < 1 || width < 1)
        return 1;
    const FFN f{expand,   expand_bias, depthwise,   depthwise_bias, project, project_bias,
                channels, hidden,      norm_weight, norm_bias,      eps};
    // Each thread takes a band of rows of every image (one row of the expanded map is recomputed at each band's top).
    // OpenMP: the runtime torch has loaded (the library is loaded after torch, which provides libgomp.so.1), so the
    // threads are torch's own, awake from its previous operator instead of spinning beside new ones.
    const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, height)));
    std::atomic<bool> failed{false};
#pragma omp parallel num_threads(workers)
    {
        const int t = omp_get_thread_num(), team = omp_get_num_threads();
        try {
            RowWorker worker(f, width);
            const int64_t first = height * t / team, last = height * (t + 1) / team;
            const int64_t image_floats = height * width * channels;
            for (int64_t b = 0; b < batch; ++b)
                worker.run(x + b * image_floats, add ? add + b * image_floats : nullptr, out + b * image_floats,
                           height, first, last);
        } catch (const std::bad_alloc&) {
            failed = true;
        }
    }
    return failed ? 2 : 0;
}

}  // extern "C"

}  // namespace ESC_NS

ESC_TARGET_END
