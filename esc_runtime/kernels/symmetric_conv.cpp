// ESC's shared large-kernel correlation plus each sample's dynamic 3x3 depthwise kernel, for CPU inference, using
// the large kernel's symmetry.
//
// ESC convolves with the geometric ensemble of its raw kernel (the average over the 8 flips and rotations), so for
// every (out, in) pair the kernel is the same at all positions of an orbit of the square's symmetry group: (dy, dx),
// (-dy, dx), (dy, -dx), (-dy, -dx) and the four transposed. A 13x13 kernel has 28 orbits instead of 169 positions.
// The correlation is then sum over orbits r of K_r[out][in] * S_r[in], where S_r sums the input over r's positions:
// 169 vector additions per pixel and a (pixels, 28 x in) x (28 x in, out) product, against 169 x in x out
// multiply-adds per pixel for the direct correlation (4.4x fewer operations at 16 channels).
//
// Built and loaded with the other kernels (setup.py, esc_runtime/native.py); why: esc_runtime/native.py.
//
// Layout. x: (batch, height, width) pixels of `channels` consecutive floats, at the strides x_strides[0..2] (the
// first channels of a channels-last map, or of a tile cut from one); out likewise at out_strides. weights: (orbits * C, C) floats with C = channels rounded
// up to 16, row r * C + i holding K_r[.][i] (zero rows and columns for padded channels); orbit r of offset (dy, dx)
// is a (a + 1) / 2 + b with a = max(|dy|, |dx|), b = min(|dy|, |dx|). dynamic: (batch, 9, C), each sample's 3x3
// depthwise kernel tap by tap (zero for padded channels).

#include "target.h"

ESC_TARGET_BEGIN
#include "gemm.h"
#include "vector.h"

namespace ESC_NS {
namespace {

// Pixels sharing each loaded weight register, and the registers of one 16-channel output vector: the product's
// block is PIXEL_BLOCK x PER_VECTOR accumulators, 8 x 1 of AVX-512's 32 registers, 6 x 2 of AVX2's 16 (8 x 2 v16f
// halves spilled there).
constexpr int PIXEL_BLOCK = ESC_AVX512 ? 8 : 6;
constexpr int PER_VECTOR = LANES / REG;

struct Orbits {  // the kernel's offsets grouped by orbit, as float offsets into the padded input
    std::vector<int64_t> offset;
    std::vector<int> start;  // orbit r's offsets: offset[start[r] .. start[r + 1])
};

Orbits orbits(int radius, int64_t row_floats, int64_t pixel_floats) {
    const int count = (radius + 1) * (radius + 2) / 2;
    std::vector<std::vector<int64_t>> members(count);
    for (int dy = -radius; dy <= radius; ++dy)
        for (int dx = -radius; dx <= radius; ++dx) {
            const int a = std::max(std::abs(dy), std::abs(dx)), b = std::min(std::abs(dy), std::abs(dx));
            members[a * (a + 1) / 2 + b].push_back(dy * row_floats + dx * pixel_floats);
        }
    Orbits o;
    o.start.push_back(0);
    for (auto& m : members) {
        o.offset.insert(o.offset.end(), m.begin(), m.end());
        o.start.push_back(static_cast<int>(o.offset.size()));
    }
    return o;
}

// The padded input and the orbits of one call, and the correlation of one row from them.
class Correlation {
  public:
    Correlation(const float* x, const int64_t* x_strides, const float* weights, const float* dynamic, int64_t batch,
                int64_t height, int64_t width, int channels, int radius)
        : weights_(weights), dynamic_(dynamic), height_(height), width_(width), channels_(channels), radius_(radius),
          C_((channels + LANES - 1) / LANES * LANES), count_((radius + 1) * (radius + 2) / 2),
          row_floats_((width + 2 * radius) * C_), image_floats_((height + 2 * radius) * row_floats_),
          // zero padding and zero padded channels; PIXEL_BLOCK pixels of slack after the last row, which the block
          // sums of a row's last, partial block read past (and never use)
          padded_(static_cast<size_t>(batch * image_floats_ + PIXEL_BLOCK * C_), 0.0f),
          orbits_(orbits(radius, row_floats_, C_)), x_(x), x_strides_(x_strides) {}

    int sums_per_pixel() const { return count_ * C_; }

    void pad_row(int64_t row) {  // copy input row `row` (of batch * height) into the padded buffer
        const int64_t b = row / height_, y = row % height_;
        float* dst = padded_.data() + b * image_floats_ + (y + radius_) * row_floats_ + radius_ * C_;
        const float* src = x_ + b * x_strides_[0] + y * x_strides_[1];
        for (int64_t p = 0; p < width_; ++p) std::memcpy(dst + p * C_, src + p * x_strides_[2], channels_ * sizeof(float));
    }

    // Row `row`'s correlation plus dynamic 3x3, `channels` floats per pixel at `dst + p * pixel_stride`; `sums` is
    // scratch of PIXEL_BLOCK * sums_per_pixel() floats.
    void row(int64_t row, float* dst, int64_t pixel_stride, float* sums) const {
        const int64_t b = row / height_, y = row % height_;
        const int K = count_ * C_, vectors = C_ / LANES;
        const float* centre_row = padded_.data() + b * image_floats_ + (y + radius_) * row_floats_ + radius_ * C_;
        const float* taps = dynamic_ + b * 9 * C_;
        for (int64_t first = 0; first < width_; first += PIXEL_BLOCK) {
            const int pixels = static_cast<int>(std::min<int64_t>(PIXEL_BLOCK, width_ - first));
            // S for the block's pixels side by side: PIXEL_BLOCK independent sums per offset (one pixel's 169-long
            // chains of dependent additions ran at a third of the speed)
            const float* base = centre_row + first * C_;
            for (int r = 0; r < count_; ++r)
                for (int u = 0; u < C_; u += REG) {
                    reg acc[PIXEL_BLOCK] = {};
                    for (int j = orbits_.start[r]; j < orbits_.start[r + 1]; ++j) {
                        const float* at = base + orbits_.offset[j] + u;
                        for (int p = 0; p < PIXEL_BLOCK; ++p) acc[p] += load_reg(at + p * C_);
                    }
                    for (int p = 0; p < pixels; ++p) store(sums + p * K + r * C_ + u, acc[p]);
                }
            for (int v = 0; v < vectors; ++v) {
                reg acc[PIXEL_BLOCK][PER_VECTOR];
                for (int p = 0; p < pixels; ++p) {  // the dynamic depthwise 3x3: channel vector v of the input
                    const float* centre = centre_row + (first + p) * C_ + v * LANES;
                    for (int h = 0; h < PER_VECTOR; ++h) {
                        reg a = reg{};
                        for (int t = 0; t < 9; ++t)
                            a += load_reg(taps + t * C_ + v * LANES + h * REG) *
                                 load_reg(centre + (t / 3 - 1) * row_floats_ + (t % 3 - 1) * C_ + h * REG);
                        acc[p][h] = a;
                    }
                }
                if (pixels == PIXEL_BLOCK) {
                    for (int k = 0; k < K; ++k) {
                        reg w[PER_VECTOR];
                        for (int h = 0; h < PER_VECTOR; ++h) w[h] = load_reg(weights_ + k * C_ + v * LANES + h * REG);
                        for (int p = 0; p < PIXEL_BLOCK; ++p) {
                            const reg s = splat_reg(sums[p * K + k]);
                            for (int h = 0; h < PER_VECTOR; ++h) acc[p][h] += s * w[h];
                        }
                    }
                } else {
                    for (int k = 0; k < K; ++k) {
                        reg w[PER_VECTOR];
                        for (int h = 0; h < PER_VECTOR; ++h) w[h] = load_reg(weights_ + k * C_ + v * LANES + h * REG);
                        for (int p = 0; p < pixels; ++p) {
                            const reg s = splat_reg(sums[p * K + k]);
                            for (int h = 0; h < PER_VECTOR; ++h) acc[p][h] += s * w[h];
                        }
                    }
                }
                const int lanes = std::min(LANES, channels_ - v * LANES);
                for (int p = 0; p < pixels; ++p) {
                    float* out = dst + (first + p) * pixel_stride + v * LANES;
                    if (lanes == LANES) {
                        for (int h = 0; h < PER_VECTOR; ++h) store(out + h * REG, acc[p][h]);
                    } else {
                        float lane[LANES];
                        for (int h = 0; h < PER_VECTOR; ++h) store(lane + h * REG, acc[p][h]);
                        std::memcpy(out, lane, lanes * sizeof(float));
                    }
                }
            }
        }
    }

  private:
    const float *weights_, *dynamic_;
    int64_t height_, width_;
    int channels_, radius_, C_, count_;
    int64_t row_floats_, image_floats_;
    std::vector<float> padded_;
    Orbits orbits_;
    const float* x_;
    const int64_t* x_strides_;
};

// Runs `body(row, scratch)` for every row of every image on `threads` OpenMP threads, after padding the input;
// scratch: `scratch_floats` per thread. Returns 0, or 2 when memory runs out.
template <typename Body>
int for_each_row(Correlation& c, int64_t rows, int threads, size_t scratch_floats, Body body) {
    std::atomic<bool> failed{false};
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t row = 0; row < rows; ++row) c.pad_row(row);
        std::unique_ptr<float[]> scratch;
        try {
            scratch.reset(new float[scratch_floats]);
        } catch (const std::bad_alloc&) {
            failed = true;  // the thread still takes part in the loop (every thread must), doing nothing
        }
#pragma omp for schedule(dynamic)
        for (int64_t row = 0; row < rows; ++row)
            if (scratch) body(row, scratch.get());
    }
    return failed ? 2 : 0;
}

}  // namespace

// Plain C ABI (loaded with ctypes); the names carry the variant (target.h).
extern "C" {

// The correlation alone: returns 0 on success, 1 for arguments the kernel does not take, 2 when its buffers cannot be
// allocated.
int ESC_EXPORT(esc_symmetric_correlate)(const float* x, const int64_t* x_strides, const float* weights,
                                        const float* dynamic, float* out, const int64_t* out_strides, int64_t batch,
                                        int64_t height, int64_t width, int channels, int radius, int threads) {
    if (channels < 1 || radius < 1 || batch < 1 || height < 1 || width < 1) return 1;
    try {
        Correlation c(x, x_strides, weights, dynamic, batch, height, width, channels, radius);
        return for_each_row(c, batch * height, threads, static_cast<size_t>(PIXEL_BLOCK) * c.sums_per_pixel(),
                            [&](int64_t row, float* sums) {
                                c.row(row, out + row / height * out_strides[0] + row % height * out_strides[1],
                                      out_strides[2], sums);
                            });
    } catch (const std::bad_alloc&) {
        return 2;
    }
}

// ESC's whole partial convolution with its 1x1 projection: out = project([correlation of x's first `channels`
// channels, x's other channels]) + bias (+ add), per row, so the concatenated map is never written. x, add and out:
// `dim` floats per pixel (channels-last maps or tiles of them; strides are per image and per row). project: (dim,
// dim) transposed (inputs, outputs); dim a multiple of 16. Returns as esc_symmetric_correlate.
int ESC_EXPORT(esc_partial_conv_attention)(const float* x, const int64_t* x_strides, const float* weights,
                                           const float* dynamic, const float* project, const float* project_bias,
                                           const float* add, const int64_t* add_strides, float* out,
                                           const int64_t* out_strides, int64_t batch, int64_t height, int64_t width,
                                           int channels, int dim, int radius, int threads) {
    if (channels < 1 || channels > dim || dim % LANES || radius < 1 || batch < 1 || height < 1 || width < 1) return 1;
    const int64_t x_pixel[3] = {x_strides[0], x_strides[1], dim};
    try {
        Correlation c(x, x_pixel, weights, dynamic, batch, height, width, channels, radius);
        const size_t sums = static_cast<size_t>(PIXEL_BLOCK) * c.sums_per_pixel();
        return for_each_row(c, batch * height, threads, sums + static_cast<size_t>(width) * dim,
                            [&](int64_t row, float* scratch) {
                                const int64_t b = row / height, y = row % height;
                                float* mixed = scratch + sums;  // the row as the projection reads it
                                const float* x_row = x + b * x_strides[0] + y * x_strides[1];
                                for (int64_t p = 0; p < width; ++p)
                                    std::memcpy(mixed + p * dim + channels, x_row + p * dim + channels,
                                                (dim - channels) * sizeof(float));
                                c.row(row, mixed, dim, scratch);
                                gemm_row<false>(mixed, static_cast<int>(width), dim, project, dim, project_bias,
                                                add ? add + b * add_strides[0] + y * add_strides[1] : nullptr,
                                                out + b * out_strides[0] + y * out_strides[1]);
                            });
    } catch (const std::bad_alloc&) {
        return 2;
    }
}

}  // extern "C"

}  // namespace ESC_NS

ESC_TARGET_END
