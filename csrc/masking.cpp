// C++ twin of kernels/masking.py `remask` (same contract, see its docstring). OpenMP over
// batch rows. Tie order: chunk / token modes reproduce torch.topk on CPU exactly by running
// ATen's own algorithm (aten/src/ATen/native/TopKImpl.h); stride1 sorts spans with a stable
// sort, lowest start first among equal span sums, like the torch path.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <utility>
#include <vector>

#include "ops.h"

namespace py = pybind11;

namespace {

enum Arrangement { CHUNK = 0, STRIDE1 = 1, TOKEN = 2 };

// torch.topk(scores, k, largest=True) on CPU chooses the first k entries of `queue` after
// std::partial_sort (k * 64 <= n) or std::nth_element (otherwise), with a comparator on the
// value only (NaN largest) over (value, index) pairs. Same algorithm, same libstdc++
// templates -> the same set under ties. (ATen's final sort of the k only orders them.)
using Elem = std::pair<float, int64_t>;

void topk_choice(const float* scores, int64_t n, int64_t k, std::vector<Elem>& queue, uint8_t* chosen) {
    std::fill(chosen, chosen + n, uint8_t{0});
    k = std::min(std::max<int64_t>(k, 0), n);
    if (k == 0) return;
    for (int64_t j = 0; j < n; ++j) queue[j] = Elem(scores[j], j);
    auto greater = [](const Elem& x, const Elem& y) -> bool {
        return (std::isnan(x.first) && !std::isnan(y.first)) || (x.first > y.first);
    };
    if (k * 64 <= n) std::partial_sort(queue.begin(), queue.begin() + k, queue.begin() + n, greater);
    else std::nth_element(queue.begin(), queue.begin() + (k - 1), queue.begin() + n, greater);
    for (int64_t i = 0; i < k; ++i) chosen[queue[i].second] = 1;
}

// Python's round(0.5 * s) for an integer s >= 0: halves go to the even neighbour.
inline int64_t round_half_even(int64_t s) {
    const int64_t half = s / 2;
    return (s % 2 == 1 && half % 2 == 1) ? half + 1 : half;
}

// docs/model.md §7, least-probable-span search for one row: frames[t] = 1 on the chosen
// spans' cover. Spans are ranked by their score sums, descending, ties by lowest start.
struct Lps {
    std::vector<float> sums;
    std::vector<int64_t> order, rank;

    void run(const float* scores, int64_t T, int64_t L, int64_t num_masked, uint8_t* frames) {
        const int64_t n_spans = T - L + 1;
        std::fill(frames, frames + T, uint8_t{0});
        if (n_spans <= 0) return;
        sums.resize(n_spans);
        order.resize(n_spans);
        rank.resize(n_spans);
        for (int64_t j = 0; j < n_spans; ++j) {
            float s = scores[j];
            for (int64_t l = 1; l < L; ++l) s += scores[j + l];
            sums[j] = s;
        }
        std::iota(order.begin(), order.end(), int64_t{0});
        std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
            return (std::isnan(sums[a]) && !std::isnan(sums[b])) || sums[a] > sums[b];
        });
        for (int64_t i = 0; i < n_spans; ++i) rank[order[i]] = i;

        auto cover = [&](int64_t u) {  // frames of the u best spans; returns how many
            std::fill(frames, frames + T, uint8_t{0});
            for (int64_t j = 0; j < n_spans; ++j)
                if (rank[j] < u) std::fill(frames + j, frames + j + L, uint8_t{1});
            return std::count(frames, frames + T, uint8_t{1});
        };
        const int64_t n = std::max(num_masked, L);
        int64_t lo = n / L, hi = n - L + 1, mid = round_half_even(lo + hi);
        if (mid == lo || mid == hi) {
            cover(mid);
            return;
        }
        while (lo < mid && mid < hi) {  // the last cover evaluated is the result
            if (cover(mid) > n) hi = mid;
            else lo = mid;
            mid = round_half_even(lo + hi);
        }
    }
};

void remask(py::array codes, py::array scores, py::object num_masked, int arrangement, int64_t span_len,
            int64_t prompt_len, int64_t mask_id, py::array masked) {
    const auto cd = buffer_of<int64_t>(codes, "stage_codes", 2);
    const auto sc = buffer_of<float>(scores, "span_scores", 2);
    const auto out = buffer_of<bool>(masked, "masked", 2);
    const int64_t B = cd.rows, T = cd.cols, n = sc.cols;
    // num_masked: an int (every row) or a [B] int64 array (one count per row).
    int64_t count = 0;
    const int64_t* counts = nullptr;
    if (py::isinstance<py::array>(num_masked)) {
        auto counts_array = num_masked.cast<py::array>();
        const auto nb = buffer_of<int64_t>(counts_array, "num_masked", 1);
        if (nb.cols != B) throw py::value_error("num_masked: expected an int or one count per row");
        counts = nb.data;
    } else {
        count = num_masked.cast<int64_t>();
    }
    const int64_t L = arrangement == TOKEN ? 1 : span_len;
    if (arrangement < CHUNK || arrangement > TOKEN) throw py::value_error("arrangement: expected 0..2");
    if (sc.rows != B || out.rows != B || out.cols != n) throw py::value_error("span_scores/masked: shape mismatch");
    if (arrangement == CHUNK ? n * L > T : n != T) throw py::value_error("span_scores: wrong number of spans");

    py::gil_scoped_release release;
    // A row is microseconds of work: threads only pay off for large batches.
#pragma omp parallel if (B * T >= 65536)
    {
        std::vector<Elem> queue(n);
        std::vector<uint8_t> chosen(std::max(n, T));
        Lps lps;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; ++b) {
            const float* s = sc.data + b * sc.row_stride;
            int64_t* y = cd.data + b * cd.row_stride;
            bool* m = out.data + b * out.row_stride;
            const int64_t k = counts != nullptr ? counts[b] : count;
            if (arrangement == STRIDE1) lps.run(s, T, L, k, chosen.data());
            else topk_choice(s, n, k, queue, chosen.data());
            // Span j covers frames [j*L, j*L + L) (L = 1 in token modes, where spans are
            // frames). Prompt frames are never written: the canvas already holds the prompt
            // there, so this equals the reference's mask-then-restore.
            for (int64_t j = 0; j < (arrangement == CHUNK ? n : T); ++j) {
                if (!chosen[j]) continue;
                const int64_t first = arrangement == CHUNK ? j * L : j;
                for (int64_t t = std::max(first, prompt_len); t < first + (arrangement == CHUNK ? L : 1); ++t)
                    y[t] = mask_id;
            }
            for (int64_t j = 0; j < n; ++j) m[j] = arrangement == CHUNK ? chosen[j] != 0 : y[j] == mask_id;
        }
    }
}

}  // namespace

void register_masking(py::module_& m) {
    m.def("remask", &remask,
          "kernels/masking.py remask on numpy views: writes mask_id into stage_codes [B, T] int64 in place and "
          "the masked spans into masked [B, n] bool. arrangement: 0 nonoverlap chunks, 1 stride1, 2 token. "
          "num_masked: an int, or a [B] int64 array (one count per row).",
          py::arg("stage_codes"), py::arg("span_scores"), py::arg("num_masked"), py::arg("arrangement"),
          py::arg("span_len"), py::arg("prompt_len"), py::arg("mask_id"), py::arg("masked"));
}
