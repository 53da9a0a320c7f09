// C++ twin of kernels/attention.py `banded_attention` (same contract, see its docstring) for
// fp32 CPU tensors: query i of each (batch, head) attends keys j with |i - j| <= window.
// One pass per query over its <= 2W+1 keys (scores, max, exp, weighted sum of V rows), so the
// work is O(T * W * d) and the only scratch is one score row per thread; no T x T buffer.
// OpenMP over (batch, head, block of queries).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "ops.h"

namespace py = pybind11;

namespace {

// A [B, H, T, d] fp32 numpy view with any strides but a contiguous last dimension (the model
// passes permuted views of its packed qkv projection), strides in elements.
struct Heads {
    float* data;
    int64_t B, H, T, d, sb, sh, st;
    float* row(int64_t b, int64_t h, int64_t t) const { return data + b * sb + h * sh + t * st; }
};

Heads heads_of(py::array& a, const char* name) {
    if (!a.dtype().is(py::dtype::of<float>()))
        throw py::type_error(std::string(name) + ": expected dtype float32, found " + std::string(py::str(a.dtype())));
    if (a.ndim() != 4)
        throw py::value_error(std::string(name) + ": expected 4 dimensions [B, H, T, d], found " +
                              std::to_string(a.ndim()));
    const auto item = static_cast<py::ssize_t>(sizeof(float));
    if (a.shape(3) > 1 && a.strides(3) != item)
        throw py::value_error(std::string(name) + ": last dimension must be contiguous");
    return {static_cast<float*>(a.mutable_data()), a.shape(0), a.shape(1), a.shape(2), a.shape(3),
            a.strides(0) / item, a.strides(1) / item, a.strides(2) / item};
}

inline float dot(const float* x, const float* y, int64_t d) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < d; ++c) acc += x[c] * y[c];
    return acc;
}

// out_i = softmax_j(scale * q_i . k_j) v_j over j in [i - W, i + W] ∩ [0, T). Row i always
// holds its own key, so the normaliser is >= 1 and no row is fully masked.
void attend_rows(const Heads& q, const Heads& k, const Heads& v, const Heads& o, int64_t b, int64_t h,
                 int64_t first, int64_t last, int64_t window, float scale, float* score, float* acc) {
    const int64_t T = q.T, d = q.d;
    for (int64_t i = first; i < last; ++i) {
        const float* qi = q.row(b, h, i);
        const int64_t j0 = std::max<int64_t>(0, i - window), j1 = std::min<int64_t>(T - 1, i + window);
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = j0; j <= j1; ++j) {
            score[j - j0] = scale * dot(qi, k.row(b, h, j), d);
            mx = std::max(mx, score[j - j0]);
        }
        float sum = 0.f;
        std::fill(acc, acc + d, 0.f);
        for (int64_t j = j0; j <= j1; ++j) {
            const float p = std::exp(score[j - j0] - mx);
            const float* vj = v.row(b, h, j);
            sum += p;
#pragma omp simd
            for (int64_t c = 0; c < d; ++c) acc[c] += p * vj[c];
        }
        float* oi = o.row(b, h, i);
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) oi[c] = acc[c] * inv;
    }
}

void banded_attention(py::array q_arr, py::array k_arr, py::array v_arr, py::array out_arr, int64_t window,
                      double scale) {
    const Heads q = heads_of(q_arr, "q"), k = heads_of(k_arr, "k"), v = heads_of(v_arr, "v"),
                o = heads_of(out_arr, "out");
    for (const Heads* x : {&k, &v, &o})
        if (x->B != q.B || x->H != q.H || x->T != q.T || x->d != q.d)
            throw py::value_error("k/v/out: expected the shape of q [B, H, T, d]");
    if (window < 0) throw py::value_error("window: expected >= 0, found " + std::to_string(window));
    const int64_t T = q.T, W = std::min<int64_t>(window, std::max<int64_t>(T - 1, 0));
    constexpr int64_t kRowsPerTask = 64;  // enough tasks to balance B*H = 16..48 heads on few cores
    const int64_t blocks = (T + kRowsPerTask - 1) / kRowsPerTask, tasks = q.B * q.H * blocks;

    py::gil_scoped_release release;
#pragma omp parallel
    {
        std::vector<float> score(static_cast<size_t>(std::min<int64_t>(2 * W + 1, std::max<int64_t>(T, 1))));
        std::vector<float> acc(static_cast<size_t>(q.d));
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; ++task) {
            const int64_t bh = task / blocks, first = (task % blocks) * kRowsPerTask;
            attend_rows(q, k, v, o, bh / q.H, bh % q.H, first, std::min(first + kRowsPerTask, T), W,
                        static_cast<float>(scale), score.data(), acc.data());
        }
    }
}

}  // namespace

void register_attention(py::module_& m) {
    m.def("banded_attention", &banded_attention,
          "kernels/attention.py banded_attention on fp32 numpy views q, k, v [B, H, T, d] (last dimension "
          "contiguous); writes out [B, H, T, d] (any strides, last dimension contiguous).",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("window"), py::arg("scale"));
}
