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
// Built and loaded with the other kernels by esc_arch/native.py; why and what it was measured against:
// esc_arch/native.py.
//
// Layout. x: (batch, height, width) pixels of `channels` consecutive floats, at the strides x_strides[0..2] (the
// first channels of a channels-last map, or of a tile cut from one); out likewise at out_strides. weights: (orbits * C, C) floats with C = channels rounded
// up to 16, row r * C + i holding K_r[.][i] (zero rows and columns for padded channels); orbit r of offset (dy, dx)
// is a (a + 1) / 2 + b with a = max(|dy|, |dx|), b = min(|dy|, |dx|). dynamic: (batch, 9, C), each sample's 3x3
// depthwise kernel tap by tap (zero for padded channels).

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include <omp.h>

#include "vector.h"

namespace {

using namespace esc;

constexpr int PIXEL_BLOCK = 8;  // pixels sharing each loaded weight vector

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

}  // namespace

extern "C" {

// Returns 0 on success, 1 for arguments the kernel does not take, 2 when its buffers cannot be allocated.
int esc_symmetric_correlate(const float* x, const int64_t* x_strides, const float* weights, const float* dynamic,
                            float* out, const int64_t* out_strides, int64_t batch, int64_t height, int64_t width,
                            int channels, int radius, int threads) {
    if (channels < 1 || radius < 1 || batch < 1 || height < 1 || width < 1) return 1;
    const int C = (channels + LANES - 1) / LANES * LANES, vectors = C / LANES;
    const int64_t padded_w = width + 2 * radius, padded_h = height + 2 * radius;
    const int64_t row_floats = padded_w * C, image_floats = padded_h * row_floats;
    const int count = (radius + 1) * (radius + 2) / 2, K = count * C;
    std::vector<float> padded;
    Orbits o;
    try {
        padded.assign(static_cast<size_t>(batch * image_floats), 0.0f);  // zero padding, and zero padded channels
        o = orbits(radius, row_floats, C);
    } catch (const std::bad_alloc&) {
        return 2;
    }
    std::atomic<bool> failed{false};
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t row = 0; row < batch * height; ++row) {
            const int64_t b = row / height, y = row % height;
            float* dst = padded.data() + b * image_floats + (y + radius) * row_floats + radius * C;
            const float* src = x + b * x_strides[0] + y * x_strides[1];
            for (int64_t p = 0; p < width; ++p)
                std::memcpy(dst + p * C, src + p * x_strides[2], channels * sizeof(float));
        }
        std::unique_ptr<float[]> sums;  // S for a block of pixels: (PIXEL_BLOCK, K)
        try {
            sums.reset(new float[static_cast<size_t>(PIXEL_BLOCK) * K]);
        } catch (const std::bad_alloc&) {
            failed = true;
        }
#pragma omp for schedule(dynamic)
        for (int64_t row = 0; row < batch * height; ++row) {
            if (!sums) continue;
            const int64_t b = row / height, y = row % height;
            const float* centre_row = padded.data() + b * image_floats + (y + radius) * row_floats + radius * C;
            const float* taps = dynamic + b * 9 * C;
            for (int64_t first = 0; first < width; first += PIXEL_BLOCK) {
                const int pixels = static_cast<int>(std::min<int64_t>(PIXEL_BLOCK, width - first));
                for (int p = 0; p < pixels; ++p) {
                    const float* centre = centre_row + (first + p) * C;
                    for (int r = 0; r < count; ++r)
                        for (int v = 0; v < vectors; ++v) {
                            v16f acc = v16f{};
                            for (int j = o.start[r]; j < o.start[r + 1]; ++j) acc += load(centre + o.offset[j] + v * LANES);
                            store(sums.get() + p * K + r * C + v * LANES, acc);
                        }
                }
                for (int v = 0; v < vectors; ++v) {
                    v16f acc[PIXEL_BLOCK];
                    for (int p = 0; p < pixels; ++p) {  // the dynamic depthwise 3x3: channel v of the input
                        const float* centre = centre_row + (first + p) * C + v * LANES;
                        v16f a = v16f{};
                        for (int t = 0; t < 9; ++t)
                            a += load(taps + t * C + v * LANES) * load(centre + (t / 3 - 1) * row_floats + (t % 3 - 1) * C);
                        acc[p] = a;
                    }
                    if (pixels == PIXEL_BLOCK) {
                        for (int k = 0; k < K; ++k) {
                            const v16f w = load(weights + k * C + v * LANES);
                            for (int p = 0; p < PIXEL_BLOCK; ++p) acc[p] += splat(sums[p * K + k]) * w;
                        }
                    } else {
                        for (int k = 0; k < K; ++k) {
                            const v16f w = load(weights + k * C + v * LANES);
                            for (int p = 0; p < pixels; ++p) acc[p] += splat(sums[p * K + k]) * w;
                        }
                    }
                    const int lanes = std::min(LANES, channels - v * LANES);
                    for (int p = 0; p < pixels; ++p) {
                        float* dst = out + b * out_strides[0] + y * out_strides[1] + (first + p) * out_strides[2] +
                                     v * LANES;
                        if (lanes == LANES) {
                            store(dst, acc[p]);
                        } else {
                            float lane[LANES];
                            store(lane, acc[p]);
                            std::memcpy(dst, lane, lanes * sizeof(float));
                        }
                    }
                }
            }
        }
    }
    return failed ? 2 : 0;
}

}  // extern "C"
