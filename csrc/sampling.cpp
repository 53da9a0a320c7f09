// C++ twin of kernels/sampling.py `sample_tokens` (same contract, see its docstring) and of
// kernels/rng.py `uniform` (bit-identical integer hashing). OpenMP over rows.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "ops.h"

namespace py = pybind11;

namespace {

enum Mode { GREEDY = 0, TOP_P = 1, TOP_K = 2, CATEGORICAL = 3 };

// ---- keyed RNG (kernels/rng.py) ----

inline uint32_t mix32(uint32_t x) {  // lowbias32
    x ^= x >> 16;
    x *= 0x21F0AAADu;
    x ^= x >> 15;
    x *= 0x735A2D97u;
    x ^= x >> 15;
    return x;
}

struct RngKey {
    uint32_t k1, k2;
};

RngKey rng_key(int64_t seed, int64_t offset) {
    const auto s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
    uint32_t k1 = mix32(static_cast<uint32_t>(s) ^ 0x9E3779B9u);
    k1 = mix32(k1 ^ static_cast<uint32_t>(s >> 32));
    k1 = mix32(k1 ^ static_cast<uint32_t>(o));
    k1 = mix32(k1 ^ static_cast<uint32_t>(o >> 32));
    return {k1, mix32(k1 ^ 0x85EBCA6Bu)};
}

inline float uniform01(const RngKey& key, uint64_t index) {
    const uint32_t h = mix32(mix32(static_cast<uint32_t>(index) ^ key.k1) ^ key.k2);
    return static_cast<float>(static_cast<int32_t>((h >> 9) * 2 + 1)) * 5.9604644775390625e-08f;  // 2^-24
}

// Sum in 16 interleaved lanes folded pairwise, the shape of ATen's AVX512 float
// reductions (torch.softmax's normaliser): more accurate than a running sum, vectorisable.
float lane_sum(const float* x, int64_t n) {
    float acc[16] = {0.f};
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; ++l) acc[l] += x[j + l];
    for (int l = 0; j + l < n; ++l) acc[l] += x[j + l];
    for (int width = 8; width >= 1; width /= 2)
        for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
    return acc[0];
}

// ---- thresholds of the kept set {pi >= threshold} ----
// Both are found as in the Triton kernel, by bisection on the fp32 bit pattern (monotone
// for values >= 0), each step one vectorisable pass over the candidates: no sort.

inline uint32_t bits_of(float x) {
    uint32_t b;
    std::memcpy(&b, &x, sizeof b);
    return b;
}

inline float float_of(uint32_t b) {
    float x;
    std::memcpy(&x, &b, sizeof x);
    return x;
}

float mass_above(const float* x, int64_t n, float v) {  // sum of x[j] > v, in lanes
    float acc[16] = {0.f};
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; ++l) acc[l] += x[j + l] > v ? x[j + l] : 0.f;
    for (int l = 0; j + l < n; ++l) acc[l] += x[j + l] > v ? x[j + l] : 0.f;
    for (int width = 8; width >= 1; width /= 2)
        for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
    return acc[0];
}

int64_t count_at_least(const float* x, int64_t n, float v) {
    int32_t acc[16] = {0};
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; ++l) acc[l] += x[j + l] >= v;
    int64_t count = 0;
    for (; j < n; ++j) count += x[j] >= v;
    for (int l = 0; l < 16; ++l) count += acc[l];
    return count;
}

// Nucleus: the smallest v with sum(pi > v) <= top_p; it is always a value of the row.
float nucleus_threshold(const float* pi, int64_t C, float top_p, float pi_max, float* work) {
    // The answer is >= (1 - top_p) / C (the mass at or below it is >= 1 - top_p, over at
    // most C tokens), so smaller values can neither be it nor weigh above it: they are
    // dropped first (2x margin for fp32 sums). Peaked rows keep a handful of candidates.
    const float floor = std::max(0.5f * (1.f - top_p) / static_cast<float>(C), 0.f);
    int64_t n = 0;
    for (int64_t j = 0; j < C; ++j) {
        work[n] = pi[j];
        n += pi[j] >= floor;
    }
    uint32_t lo = bits_of(floor), hi = bits_of(pi_max);
    while (lo < hi) {
        const uint32_t mid = lo + (hi - lo) / 2;
        if (mass_above(work, n, float_of(mid)) <= top_p) hi = mid;
        else lo = mid + 1;
    }
    return float_of(hi);
}

// Top-k: the largest v with count(pi >= v) >= k, i.e. the k-th largest value (ties
// counted), so {pi >= v} keeps ties.
float kth_largest(const float* pi, int64_t C, int64_t k, float pi_max) {
    k = std::min(std::max<int64_t>(k, 1), C);
    uint32_t lo = 0, hi = bits_of(pi_max);
    while (lo < hi) {
        const uint32_t mid = lo + (hi - lo + 1) / 2;
        if (count_at_least(pi, C, float_of(mid)) >= k) lo = mid;
        else hi = mid - 1;
    }
    return float_of(lo);
}

// One row. `pi` and `work` are scratch of C floats.
void sample_row(const float* cond, const float* uncond, int64_t C, float g, float t, int mode,
                int64_t top_k, float top_p, const RngKey& key, uint64_t rng_row, float* pi,
                float* work, int64_t* token_out, float* prob_out) {
    float l_max = -std::numeric_limits<float>::infinity();
    int64_t argmax = 0;
    bool has_nan = false;
    for (int64_t j = 0; j < C; ++j) {
        float l = cond[j];
        if (uncond != nullptr) {
            const float u = uncond[j];
            l = l == u ? u : u + (l - u) * g;  // same op order as the reference
        }
        pi[j] = l;
        if (std::isnan(l)) has_nan = true;
        else if (l > l_max) l_max = l, argmax = j;
    }
    if (has_nan || !std::isfinite(l_max)) {  // no distribution: token 0, NaN prob
        *token_out = 0;
        *prob_out = std::numeric_limits<float>::quiet_NaN();
        return;
    }
    const float x_max = l_max / t;  // == max(l / t): division by t > 0 is monotone
    for (int64_t j = 0; j < C; ++j) {
        // Below e^-87.34 < FLT_MIN the result would be subnormal: flush it to 0. Subnormal
        // arithmetic is ~100x slower (large CFG coefficients put many logits there) and such
        // a token can never win the race nor move the fp32 normaliser.
        const float d = pi[j] / t - x_max;
        pi[j] = d < -87.34f ? 0.f : std::exp(d);
    }
    const float inv_z = 1.f / lane_sum(pi, C);  // torch.softmax multiplies by the reciprocal
    for (int64_t j = 0; j < C; ++j) pi[j] *= inv_z;
    if (mode == GREEDY) {
        *token_out = argmax;
        *prob_out = pi[argmax];
        return;
    }

    float threshold = 0.f;
    if (mode == TOP_P) threshold = nucleus_threshold(pi, C, top_p, pi[argmax], work);
    if (mode == TOP_K) threshold = kth_largest(pi, C, top_k, pi[argmax]);
    // Exponential race: argmax pi_j / E_j, E_j = -log(u_j), is an exact categorical draw.
    // Entries with pi = 0 race at 0 and never win (the max has pi > 0): skipped. And as
    // -log(u) >= 1 - u, pi / (1 - u) bounds the race value, so most logs are skipped; the
    // 2^-20 slack exceeds the rounding of log, the division and the bound, so a skipped
    // entry could never have won.
    for (int64_t j = 0; j < C; ++j) work[j] = uniform01(key, rng_row + static_cast<uint64_t>(j));  // vectorised
    float best = 0.f;
    int64_t token = argmax;
    for (int64_t j = 0; j < C; ++j) {
        if (!(pi[j] > 0.f && pi[j] >= threshold)) continue;
        const float u = work[j];
        if (pi[j] < best * (1.f - u) * (1.f - 0x1p-20f)) continue;
        const float race = pi[j] / -std::log(u);
        if (race > best) best = race, token = j;
    }
    *token_out = token;
    *prob_out = pi[token];
    if (mode == TOP_K) {  // the reference renormalises the kept probabilities in place
        for (int64_t j = 0; j < C; ++j) work[j] = pi[j] >= threshold ? pi[j] : 0.f;
        *prob_out /= lane_sum(work, C);
    }
}

inline int sampling_mode(bool use_sampling, int64_t top_k, float top_p) {  // kernels/sampling.py's precedence
    if (!use_sampling) return GREEDY;
    if (top_p > 0.f) return TOP_P;
    if (top_k > 0) return TOP_K;
    return CATEGORICAL;
}

// One value for every row (a Python scalar) or one per row (an [N] array), read once per row.
template <typename T>
struct PerRow {
    T value{};
    const T* data = nullptr;  // into the caller's array, alive for the call
    T operator[](int64_t r) const { return data != nullptr ? data[r] : value; }
};

template <typename T>
PerRow<T> per_row(py::object x, const char* name, int64_t n_rows) {
    PerRow<T> p;
    if (py::isinstance<py::array>(x)) {
        auto a = x.cast<py::array>();
        const auto b = buffer_of<T>(a, name, 1);
        if (b.cols != n_rows) throw py::value_error(std::string(name) + ": expected a scalar or one value per row");
        p.data = b.data;
    } else {
        p.value = x.cast<T>();
    }
    return p;
}

void sample_tokens(py::array cond, py::object uncond, py::object cfg_coef, py::object temperature,
                   py::object use_sampling, py::object top_k, py::object top_p, py::object seed, py::object offset,
                   py::object row_ids, py::array tokens, py::array prob) {
    const auto c = buffer_of<float>(cond, "cond", 2);
    const int64_t n_rows = c.rows, C = c.cols, stride = c.row_stride;
    const float* u = nullptr;
    if (!uncond.is_none()) {
        auto uncond_array = uncond.cast<py::array>();
        const auto ub = buffer_of<float>(uncond_array, "uncond", 2);
        if (ub.rows != c.rows || ub.cols != c.cols) throw py::value_error("uncond: shape differs from cond");
        if (ub.row_stride != c.row_stride) throw py::value_error("uncond: row stride differs from cond");
        u = ub.data;
    }
    const int64_t* rid = nullptr;
    if (!row_ids.is_none()) {
        auto rid_array = row_ids.cast<py::array>();
        const auto rb = buffer_of<int64_t>(rid_array, "row_ids", 1);
        if (rb.cols != c.rows) throw py::value_error("row_ids: expected one id per row");
        rid = rb.data;
    }
    const auto g = per_row<float>(cfg_coef, "cfg_coef", n_rows);
    const auto t = per_row<float>(temperature, "temperature", n_rows);
    const auto sampled = per_row<bool>(use_sampling, "use_sampling", n_rows);
    const auto k = per_row<int64_t>(top_k, "top_k", n_rows);
    const auto p = per_row<float>(top_p, "top_p", n_rows);
    const auto seeds = per_row<int64_t>(seed, "seed", n_rows);
    const auto offsets = per_row<int64_t>(offset, "offset", n_rows);
    const auto tok = buffer_of<int64_t>(tokens, "tokens", 1);
    const auto pr = buffer_of<float>(prob, "prob", 1);
    if (tok.cols != c.rows || pr.cols != c.rows) throw py::value_error("tokens/prob: expected one entry per row");
    // A key for the whole call unless a seed or an offset varies by row.
    const bool key_per_row = seeds.data != nullptr || offsets.data != nullptr;
    const RngKey call_key = key_per_row ? RngKey{} : rng_key(seeds.value, offsets.value);

    py::gil_scoped_release release;
    // A row costs ~10 us: a thread team only pays off for a few dozen rows (late decoding
    // steps sample a handful).
#pragma omp parallel if (n_rows >= 64)
    {
        std::vector<float> pi(C), work(C);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n_rows; ++r) {
            const uint64_t row_id = rid != nullptr ? static_cast<uint64_t>(rid[r]) : static_cast<uint64_t>(r);
            const RngKey row_key = key_per_row ? rng_key(seeds[r], offsets[r]) : call_key;  // once per row
            const float g_r = g[r];
            // g == 1 is no CFG: c exactly, where u + (c - u) * 1 may round away from it.
            const float* u_row = u != nullptr && g_r != 1.f ? u + r * stride : nullptr;
            sample_row(c.data + r * stride, u_row, C, g_r, t[r], sampling_mode(sampled[r], k[r], p[r]), k[r], p[r],
                       row_key, row_id * static_cast<uint64_t>(C), pi.data(), work.data(), tok.data + r, pr.data + r);
        }
    }
}

}  // namespace

void register_sampling(py::module_& m) {
    m.def("sample_tokens", &sample_tokens,
          "kernels/sampling.py sample_tokens on fp32 numpy views; writes tokens [N] int64 and prob [N] fp32. "
          "cfg_coef, temperature, use_sampling, top_k, top_p, seed, offset: each a scalar (every row) or an [N] "
          "array (float32, float32, bool, int64, float32, int64, int64: one per row).",
          py::arg("cond"), py::arg("uncond"), py::arg("cfg_coef"), py::arg("temperature"), py::arg("use_sampling"),
          py::arg("top_k"), py::arg("top_p"), py::arg("seed"), py::arg("offset"), py::arg("row_ids"),
          py::arg("tokens"), py::arg("prob"));
    m.def(
        "uniform",
        [](int64_t seed, int64_t offset, py::array index, py::array out) {
            const auto idx = buffer_of<int64_t>(index, "index", 1);
            const auto o = buffer_of<float>(out, "out", 1);
            if (idx.cols != o.cols) throw py::value_error("out: expected the shape of index");
            const RngKey key = rng_key(seed, offset);
            for (py::ssize_t i = 0; i < idx.cols; ++i) o.data[i] = uniform01(key, static_cast<uint64_t>(idx.data[i]));
        },
        "kernels/rng.py uniform for a 1-d int64 index array (test hook).", py::arg("seed"), py::arg("offset"),
        py::arg("index"), py::arg("out"));
}
