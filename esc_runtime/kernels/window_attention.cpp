// ESC's window attention for CPU inference: softmax(q k^T / sqrt(16) + bias) v per window and head, read from and
// written to raster-order channels-last maps, with the relative-position bias read from its (2ws-1)^2 table.
//
// Built by setup.py when the package is built, once per instruction-set variant (target.h), and loaded with ctypes
// by esc_runtime/native.py; plain C ABI, no torch headers. Why it exists: esc_runtime/native.py.
//
// Layout. qkv: (b, hp, wp, 3, heads, 16) floats, the to_qkv projection of every pixel in raster order (its channels
// are (q|k|v, head, c), as the 1x1 convolution orders them). out: (b, hp, wp, heads, 16), what to_out reads. A window
// (wr, wc) covers rows wr*ws .. wr*ws+ws-1 and columns wc*ws .. wc*ws+ws-1; its tokens are in raster order within
// the window. table: (heads, (2ws-1)^2), already multiplied by log2(e); the bias of query (qr, qc) and key (kr, kc)
// is table[h][(kr - qr + ws - 1) * (2ws - 1) + (kc - qc + ws - 1)], so the bias of one query over one key row is 
// ws consecutive floats of the table: no (heads, ws^2, ws^2) bias matrix is read (16 MiB at window 32).
//
// Arithmetic. Scores are kept in base 2 (q scaled by log2(e)/4, the table by log2(e)), so the softmax is
// 2^(s - max) / sum; each query's whole row of ws^2 scores is formed, exponentiated and summed before p v, the
// exact two-pass softmax (no online rescaling).
//
// Work. One task per (window, head): its keys are packed transposed (16 x ws^2) and its values (ws^2 x 16) into
// the thread's buffers, then queries go in blocks of QUERY_BLOCK, which share each loaded key and value vector.
// Tasks are shared out dynamically among `threads` OpenMP threads.

#include "target.h"

ESC_TARGET_BEGIN
#include "vector.h"

namespace ESC_NS {
namespace {

constexpr int HEAD_DIM = 16;
// Queries per block x key registers per step: the q k^T accumulators. AVX-512: 8 x 2 (16 of 32 registers, 32 keys a
// step); AVX2: 6 x 2 (12 of 16, 16 keys a step; 8 x 2 v16f spilled, at a sixth of the speed). p v then holds
// QUERY_BLOCK x HEAD_DIM / REG accumulators: 8 x 1, 6 x 2.
// AVX2 takes 6 queries (12 accumulators; tokens, a multiple of 256, leave a last block of 4): each block reads the
// window's packed keys and values from L2, so fewer, larger blocks read less (6 ran faster than 4).
constexpr int QUERY_BLOCK = ESC_AVX512 ? 8 : 6;
constexpr int LAST_BLOCK = 256 % QUERY_BLOCK;  // the queries left after the whole blocks (tokens % 256 == 0)
constexpr int KEY_REGS = 2;
constexpr int HEAD_REGS = HEAD_DIM / REG;

inline float horizontal_max(reg v) {
    float m = v[0];
    for (int i = 1; i < REG; ++i) m = std::max(m, v[i]);
    return m;
}

struct Geometry {
    int64_t batch, height, width;  // of the (padded) map
    int heads, window;
};

class Scratch {  // one thread's packed keys and values, its query block and the block's score rows
  public:
    explicit Scratch(int tokens)
        : buffer_(static_cast<size_t>(2 * HEAD_DIM + QUERY_BLOCK) * tokens + QUERY_BLOCK * HEAD_DIM) {}
    float* keys_transposed() { return buffer_.data(); }
    float* values(int tokens) { return buffer_.data() + HEAD_DIM * tokens; }
    float* scores(int tokens) { return buffer_.data() + 2 * HEAD_DIM * tokens; }
    float* queries(int tokens) { return buffer_.data() + (2 * HEAD_DIM + QUERY_BLOCK) * tokens; }

  private:
    std::vector<float> buffer_;
};

void attend(const float* qkv, const float* table, float* out, const Geometry& g, int64_t image, int64_t window_row,
            int64_t window_col, int head, Scratch& scratch) {
    const int ws = g.window, tokens = ws * ws, span = 2 * ws - 1, dim = g.heads * HEAD_DIM;
    const int64_t pixel_stride = 3 * dim, row_stride = g.width * pixel_stride;
    const float* window = qkv + (image * g.height + window_row * ws) * row_stride + window_col * ws * pixel_stride;
    float* keys_t = scratch.keys_transposed();
    float* values = scratch.values(tokens);
    float* scores = scratch.scores(tokens);

    for (int t = 0; t < tokens; ++t) {
        const float* pixel = window + (t / ws) * row_stride + (t % ws) * pixel_stride;
        const float* key = pixel + dim + head * HEAD_DIM;
        for (int d = 0; d < HEAD_DIM; ++d) keys_t[d * tokens + t] = key[d];
        std::memcpy(values + t * HEAD_DIM, pixel + 2 * dim + head * HEAD_DIM, HEAD_DIM * sizeof(float));
    }

    const float* head_table = table + static_cast<int64_t>(head) * span * span;
    const float query_scale = 1.4426950408889634f / 4.0f;  // log2(e) / sqrt(HEAD_DIM)
    // one block of QB queries from `first` (QB a compile-time constant: the accumulators stay in registers)
    const auto query_block = [&](int first, auto qb) {
        constexpr int QUERY_BLOCK = decltype(qb)::value;
        // The block's scaled queries live in the scratch buffer, not on the stack: as loads that may alias the score
        // stores, their broadcasts stay inside the key loop. From a local array GCC hoisted all 128 broadcasts out of
        // it and spilled them as full vectors, and the loop ran at half speed on those 64-byte loads.
        float* query = scratch.queries(tokens);
        const float* bias[QUERY_BLOCK];  // bias[i] + kr * span + kc: query i's bias for key (kr, kc)
        for (int i = 0; i < QUERY_BLOCK; ++i) {
            const int qr = (first + i) / ws, qc = (first + i) % ws;
            const float* q = window + qr * row_stride + qc * pixel_stride + head * HEAD_DIM;
            for (int d = 0; d < HEAD_DIM; ++d) query[i * HEAD_DIM + d] = q[d] * query_scale;
            bias[i] = head_table + (ws - 1 - qr) * span + (ws - 1 - qc);
        }

        // scores = bias + q k^T, KEY_REGS registers of keys at a time, and each row's running maximum
        reg row_max[QUERY_BLOCK];
        for (int i = 0; i < QUERY_BLOCK; ++i) row_max[i] = splat_reg(-3.0e38f);
        for (int key = 0; key < tokens; key += KEY_REGS * REG) {
            reg acc[QUERY_BLOCK][KEY_REGS];
            for (int r = 0; r < KEY_REGS; ++r) {
                const int k = key + r * REG, bias_at = (k / ws) * span + k % ws;  // REG keys of one key row
                for (int i = 0; i < QUERY_BLOCK; ++i) acc[i][r] = load_reg(bias[i] + bias_at);
            }
#pragma GCC unroll 16
            for (int d = 0; d < HEAD_DIM; ++d) {
                reg k[KEY_REGS];
                for (int r = 0; r < KEY_REGS; ++r) k[r] = load_reg(keys_t + d * tokens + key + r * REG);
                for (int i = 0; i < QUERY_BLOCK; ++i) {
                    const reg q = splat_reg(query[i * HEAD_DIM + d]);
                    for (int r = 0; r < KEY_REGS; ++r) acc[i][r] += q * k[r];
                }
            }
            for (int i = 0; i < QUERY_BLOCK; ++i)
                for (int r = 0; r < KEY_REGS; ++r) {
                    store(scores + i * tokens + key + r * REG, acc[i][r]);
                    row_max[i] = acc[i][r] > row_max[i] ? acc[i][r] : row_max[i];
                }
        }

        // p = 2^(scores - max), in place, and its row sums
        reg row_sum[QUERY_BLOCK];
        for (int i = 0; i < QUERY_BLOCK; ++i) {
            const reg m = splat_reg(horizontal_max(row_max[i]));
            float* row = scores + i * tokens;
            row_sum[i] = reg{};
            for (int key = 0; key < tokens; key += REG) {
                const reg p = exp2(load_reg(row + key) - m);
                store(row + key, p);
                row_sum[i] += p;
            }
        }

        // out = p v / sum
        reg acc[QUERY_BLOCK][HEAD_REGS];
        for (int i = 0; i < QUERY_BLOCK; ++i)
            for (int h = 0; h < HEAD_REGS; ++h) acc[i][h] = reg{};
        for (int key = 0; key < tokens; ++key) {
            reg v[HEAD_REGS];
            for (int h = 0; h < HEAD_REGS; ++h) v[h] = load_reg(values + key * HEAD_DIM + h * REG);
            for (int i = 0; i < QUERY_BLOCK; ++i) {
                const reg p = splat_reg(scores[i * tokens + key]);
                for (int h = 0; h < HEAD_REGS; ++h) acc[i][h] += p * v[h];
            }
        }
        for (int i = 0; i < QUERY_BLOCK; ++i) {
            const int qr = (first + i) / ws, qc = (first + i) % ws;
            float* o = out + ((image * g.height + window_row * ws + qr) * g.width + window_col * ws + qc) * dim +
                       head * HEAD_DIM;
            const reg scale = splat_reg(1.0f / sum_lanes(row_sum[i]));
            for (int h = 0; h < HEAD_REGS; ++h) store(o + h * REG, acc[i][h] * scale);
        }
    };
    int first = 0;
    for (; first + QUERY_BLOCK <= tokens; first += QUERY_BLOCK) query_block(first, std::integral_constant<int, QUERY_BLOCK>{});
    if constexpr (LAST_BLOCK > 0)
        if (first < tokens) query_block(first, std::integral_constant<int, LAST_BLOCK>{});
}

}  // namespace

// Plain C ABI (loaded with ctypes); the names carry the variant (target.h).
extern "C" {

// Returns 0 on success, 1 for a geometry the kernel does not take, 2 when its buffers cannot be allocated.
int ESC_EXPORT(esc_window_attention)(const float* qkv, const float* table, float* out, int64_t batch,
                                     int64_t height, int64_t width, int heads, int window, int threads) {
    if (window < LANES || window % LANES || height % window || width % window || heads < 1 || batch < 1)
        return 1;
    const Geometry g{batch, height, width, heads, window};
    const int64_t rows = height / window, cols = width / window, tasks = batch * rows * cols * heads;
    // Heads innermost: a window's pixels (768 KiB of q, k and v at window 32, dim 64) are read into the cache once
    // for all of its heads. OpenMP: the runtime torch has loaded (see conv_ffn.cpp), so the threads are torch's own.
    std::atomic<bool> failed{false};
#pragma omp parallel num_threads(threads)
    {
        std::unique_ptr<Scratch> scratch;
        try {
            scratch = std::make_unique<Scratch>(window * window);
        } catch (const std::bad_alloc&) {
            failed = true;  // the thread still takes part in the loop (every thread must), doing nothing
        }
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < tasks; ++task) {
            if (!scratch) continue;
            const int head = static_cast<int>(task % heads);
            const int64_t w = task / heads;
            attend(qkv, table, out, g, w / (rows * cols), (w / cols) % rows, w % cols, head, *scratch);
        }
    }
    return failed ? 2 : 0;
}

}  // extern "C"

}  // namespace ESC_NS

ESC_TARGET_END
