// TopKSAE's selection kernels: row-wise top-m column indices, and dot products at chosen (row, column) pairs.
//
// Built on first use by featuretree/native.py with the system C++ compiler (no torch headers, ~2 s) and
// loaded with ctypes; featuretree falls back to torch ops when no compiler is available.
//
// Top-m: each value is mapped to an integer key whose signed order is the float order. Per row the columns
// fall into G strided groups; one vectorised pass takes each group's max key; the m-th largest group max is
// a threshold every top-m key reaches (m groups reach it), so only the ~m groups at or above it are
// scanned, and nth_element picks the best m of their keys. Two readers feed it: float32, and the int32
// accumulators of an int8 matmul, dequantised on the fly (acc * row_scale * col_scale + bias).
// Rows are split over `threads` OpenMP threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

namespace {

// float bits -> signed integer with the same order as the float values (negatives reversed, NaN aside)
inline int32_t key32(float v) {
    int32_t s;
    std::memcpy(&s, &v, sizeof s);
    return s ^ ((s >> 31) & 0x7FFFFFFF);
}

struct F32Reader {  // (n, width) float32
    using Key = int32_t;
    const float* p;
    int64_t width;
    const float* row = nullptr;
    void start(int64_t r) { row = p + r * width; }
    Key at(int64_t j) const { return key32(row[j]); }
};

struct Int8MatmulReader {  // (n, width) int32 = int8 x int8 products; value = acc * rs[r] * cs[j] + bias[j]
    using Key = int32_t;
    const int32_t* p;
    int64_t width;
    const float* rs;
    const float* cs;
    const float* bias;
    const int32_t* row = nullptr;
    float scale = 1.0f;
    void start(int64_t r) { row = p + r * width; scale = rs[r]; }
    Key at(int64_t j) const { return key32(static_cast<float>(row[j]) * (scale * cs[j]) + bias[j]); }
};

// A key t with at least m of the G group maxima >= t, and no looser than their m-th largest rounded down to its
// top 16 bits (so every top-m key is >= t, and few others are): a two-byte radix select, free of the
// unpredictable branches that make nth_element slow on a few hundred values.
int32_t radix_threshold(const int32_t* gm, int64_t G, int64_t m) {
    auto ukey = [](int32_t k) { return static_cast<uint32_t>(k) ^ 0x80000000u; };  // signed -> unsigned order
    int32_t hist[256];
    std::fill(hist, hist + 256, 0);
    for (int64_t g = 0; g < G; ++g) ++hist[ukey(gm[g]) >> 24];
    int64_t above = 0;
    int b1 = 255;
    for (; b1 > 0 && above + hist[b1] < m; --b1) above += hist[b1];
    std::fill(hist, hist + 256, 0);
    for (int64_t g = 0; g < G; ++g) {
        const uint32_t u = ukey(gm[g]);
        hist[(u >> 16) & 0xFF] += (u >> 24) == static_cast<uint32_t>(b1);
    }
    int b2 = 255;
    for (; b2 > 0 && above + hist[b2] < m; --b2) above += hist[b2];
    const uint32_t u = (static_cast<uint32_t>(b1) << 24) | (static_cast<uint32_t>(b2) << 16);
    return static_cast<int32_t>(u ^ 0x80000000u);
}

template <typename Reader>
void rows_topk(Reader rd, int64_t m, int64_t* out, int64_t r0, int64_t r1) {
    using Key = typename Reader::Key;
    constexpr Key KEY_MIN = std::numeric_limits<Key>::min();
    const int64_t width = rd.width;
    // G groups, column j in group j % G: the group maxima are a vertical (vectorisable) max over blocks of G
    int64_t G = 64;
    while (G < 1024 && G * 16 < width) G *= 2;
    std::vector<Key> gmax(G);
    std::vector<std::pair<Key, int32_t>> buf(width);
    auto by_key_desc = [](const std::pair<Key, int32_t>& a, const std::pair<Key, int32_t>& b) {
        return a.first > b.first;
    };
    for (int64_t r = r0; r < r1; ++r) {
        rd.start(r);
        Key* __restrict gm = gmax.data();
        std::fill(gmax.begin(), gmax.end(), KEY_MIN);
        for (int64_t b = 0; b < width; b += G) {
            const int64_t len = std::min(G, width - b);
            for (int64_t g = 0; g < len; ++g) gm[g] = std::max(gm[g], rd.at(b + g));
        }
        const int32_t thr = m <= G ? radix_threshold(gm, G, m) : KEY_MIN;
        int64_t cnt = 0;
        for (int64_t g = 0; g < G; ++g) {
            if (gm[g] < thr) continue;
            for (int64_t j = g; j < width; j += G) {  // branch-free append of the keys >= thr
                const Key kj = rd.at(j);
                buf[cnt] = {kj, static_cast<int32_t>(j)};
                cnt += kj >= thr;
            }
        }
        std::nth_element(buf.begin(), buf.begin() + (m - 1), buf.begin() + cnt, by_key_desc);
        int64_t* o = out + r * m;
        for (int64_t t = 0; t < m; ++t) o[t] = buf[t].second;
    }
}

// o[t] = ar . bt[ci[t]] for t < m, with ar (d,) and bt (width, d) row-major float32
inline void row_dots(const float* ar, int64_t d, const float* bt, const int64_t* ci, int64_t m, float* o) {
    constexpr int L = 16;  // independent partial sums: the compiler keeps them in one vector register
    for (int64_t t = 0; t < m; ++t) {
        const float* br = bt + ci[t] * d;
        float acc[L] = {0};
        int64_t e = 0;
        for (; e + L <= d; e += L)
            for (int l = 0; l < L; ++l) acc[l] += ar[e + l] * br[e + l];
        float s = 0;
        for (; e < d; ++e) s += ar[e] * br[e];
        for (int l = 0; l < L; ++l) s += acc[l];
        o[t] = s;
    }
}

// Exact re-ranking: per row, val[t] = a[r] . bt[cand[r, t]] + bias[cand[r, t]] (-inf where !among), keep the k
// largest (values and indices, in no particular order).
void rows_refine(const float* a, int64_t d, const float* bt, const float* bias, const uint8_t* among,
                 const int64_t* cand, int64_t m, int64_t k, float* vals, int64_t* idx, int64_t r0, int64_t r1) {
    std::vector<float> v(m);
    std::vector<std::pair<float, int64_t>> buf(m);
    for (int64_t r = r0; r < r1; ++r) {
        row_dots(a + r * d, d, bt, cand + r * m, m, v.data());
        for (int64_t t = 0; t < m; ++t) {
            const int64_t j = cand[r * m + t];
            const bool ok = among == nullptr || among[j];
            buf[t] = {ok ? v[t] + bias[j] : -std::numeric_limits<float>::infinity(), j};
        }
        std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(),
                         [](const std::pair<float, int64_t>& x, const std::pair<float, int64_t>& y) {
                             return x.first > y.first;
                         });
        for (int64_t t = 0; t < k; ++t) {
            vals[r * k + t] = buf[t].first;
            idx[r * k + t] = buf[t].second;
        }
    }
}

// |v| as int32 bits: for non-negative floats the integer order is the float order, and integer max vectorises
inline int32_t abs_bits(float v) {
    int32_t b;
    std::memcpy(&b, &v, sizeof b);
    return b & 0x7FFFFFFF;
}
inline float from_bits(int32_t b) {
    float v;
    std::memcpy(&v, &b, sizeof v);
    return v;
}
inline int8_t round_i8(float v) { return static_cast<int8_t>(static_cast<int32_t>(v + (v >= 0 ? 0.5f : -0.5f))); }

// Symmetric int8 quantisation of a row-major (rows, cols) matrix with one scale per row (per_row) or per column
void quantize(const float* t, int64_t rows, int64_t cols, bool per_row, int8_t* q, float* scale,
              int64_t r0, int64_t r1) {
    if (per_row) {
        for (int64_t r = r0; r < r1; ++r) {
            const float* tr = t + r * cols;
            int32_t mb = 0;
            for (int64_t c = 0; c < cols; ++c) mb = std::max(mb, abs_bits(tr[c]));
            const float mx = from_bits(mb);
            const float s = mx > 0 ? mx / 127.0f : 1.0f, inv = 1.0f / s;
            scale[r] = s;
            for (int64_t c = 0; c < cols; ++c) q[r * cols + c] = round_i8(tr[c] * inv);
        }
    } else {  // r0..r1 is a range of columns here; rows are walked in order so the loads stay contiguous
        std::vector<float> inv(r1 - r0, 0.0f);
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = r0; c < r1; ++c) inv[c - r0] = std::max(inv[c - r0], std::fabs(t[r * cols + c]));
        for (int64_t c = r0; c < r1; ++c) {
            const float s = inv[c - r0] > 0 ? inv[c - r0] / 127.0f : 1.0f;
            scale[c] = s;
            inv[c - r0] = 1.0f / s;
        }
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = r0; c < r1; ++c)
                q[r * cols + c] = round_i8(t[r * cols + c] * inv[c - r0]);
    }
}

template <typename Fn>
void parallel_rows(int64_t n, int threads, Fn fn) {
    // OpenMP, so the work runs on torch's own thread pool (the library links the libgomp torch has loaded):
    // a second pool would fight torch's spinning workers for the cores between calls.
    threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
    const int64_t per = (n + threads - 1) / threads;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; ++t) {
        const int64_t r0 = t * per, r1 = std::min(n, r0 + per);
        if (r0 < r1) fn(r0, r1);
    }
}

template <typename Reader>
int topk(Reader rd, int64_t n, int64_t m, int64_t* out, int threads) {
    if (m <= 0 || m > rd.width || rd.width > INT32_MAX) return 1;
    parallel_rows(n, threads, [&](int64_t r0, int64_t r1) { rows_topk(rd, m, out, r0, r1); });
    return 0;
}

}  // namespace

extern "C" {

int ft_topk_f32(const float* pre, int64_t n, int64_t width, int64_t m, int64_t* out, int threads) {
    return topk(F32Reader{pre, width}, n, m, out, threads);
}

int ft_topk_i8mm(const int32_t* acc, int64_t n, int64_t width, const float* row_scale, const float* col_scale,
                 const float* bias, int64_t m, int64_t* out, int threads) {
    return topk(Int8MatmulReader{acc, width, row_scale, col_scale, bias}, n, m, out, threads);
}

int ft_refine_topk(const float* a, int64_t n, int64_t d, const float* bt, const float* bias, const uint8_t* among,
                   const int64_t* cand, int64_t m, int64_t k, float* vals, int64_t* idx, int threads) {
    if (k <= 0 || k > m) return 1;
    parallel_rows(n, threads, [&](int64_t r0, int64_t r1) {
        rows_refine(a, d, bt, bias, among, cand, m, k, vals, idx, r0, r1);
    });
    return 0;
}

int ft_quantize_int8(const float* t, int64_t rows, int64_t cols, int per_row, int8_t* q, float* scale, int threads) {
    parallel_rows(per_row ? rows : cols, threads,
                  [&](int64_t r0, int64_t r1) { quantize(t, rows, cols, per_row != 0, q, scale, r0, r1); });
    return 0;
}

// Feature-major CSR pattern of n*k (token, feature) entries: a stable counting sort by feature.
// order[e] = flat entry index of the e-th entry in feature order; crow (width + 1); col[e] = order[e] / k.
int ft_csr_pattern(const int64_t* idx, int64_t n, int64_t k, int64_t width, int64_t* order, int64_t* crow,
                   int64_t* col) {
    const int64_t nk = n * k;
    std::fill(crow, crow + width + 1, 0);
    for (int64_t e = 0; e < nk; ++e) {
        if (idx[e] < 0 || idx[e] >= width) return 1;
        ++crow[idx[e] + 1];
    }
    for (int64_t j = 0; j < width; ++j) crow[j + 1] += crow[j];
    std::vector<int64_t> next(crow, crow + width);
    for (int64_t e = 0; e < nk; ++e) {
        const int64_t p = next[idx[e]]++;
        order[p] = e;
        col[p] = e / k;
    }
    return 0;
}

int ft_sampled_dots(const float* a, int64_t n, int64_t d, const float* bt, const int64_t* idx, int64_t m,
                    float* out, int threads) {
    parallel_rows(n, threads, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) row_dots(a + r * d, d, bt, idx + r * m, m, out + r * m);
    });
    return 0;
}

}  // extern "C"
