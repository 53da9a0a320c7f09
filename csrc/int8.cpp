// C++ twins of the two passes around the int8 product in kernels/int8.py (same contract, see
// its docstring): the per-token activation quantization before `torch._int_mm` and the
// rescale after it. In torch each is five or six elementwise passes over the activations
// (abs, amax, div, round, clamp, cast; cast, mul, mul, add), ~15% of an int8 step; here each
// is one pass per row, with the same fp32 operations in the same order, so the results are
// bitwise those of the torch path.
//
// Each pass has an AVX2 version chosen at run time beside the x86-64 baseline one (which
// cannot round half-to-even in vectors: that is SSE4.1). No FMA anywhere: a fused
// multiply-add rounds once where torch rounds twice.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "ops.h"

namespace py = pybind11;

namespace {

constexpr float kActQmax = 127.0f;

#if defined(__x86_64__) && defined(__GNUC__)
#define ME_AVX2 __attribute__((target("avx2")))
#define ME_HAVE_DISPATCH 1
#else
#define ME_AVX2
#define ME_HAVE_DISPATCH 0
#endif

// s = max|x| / 127 (at least FLT_MIN; NaN if x holds one), q = clamp(round_half_even(x / s), -127, 127).
inline float row_scale(float amax, bool nan) {
    // torch's amax propagates a NaN (std::max would drop it and hide the token's NaN)
    return nan ? std::numeric_limits<float>::quiet_NaN() : std::max(amax / kActQmax, std::numeric_limits<float>::min());
}

inline int8_t quantize_one(float v, float scale) {
    const float r = std::nearbyint(v / scale);   // the default rounding mode: half to even
    // NaN (inf / inf in a token holding an inf) becomes 0, as torch's cast does here
    return r != r ? 0 : static_cast<int8_t>(std::min(std::max(r, -kActQmax), kActQmax));
}

void quantize_row_base(const float* x, int64_t k, int8_t* q, float* s) {
    float amax = 0.0f;
    bool nan = false;
    for (int64_t j = 0; j < k; ++j) {
        const float a = std::fabs(x[j]);
        amax = a > amax ? a : amax;
        nan |= a != a;
    }
    const float scale = row_scale(amax, nan);
    for (int64_t j = 0; j < k; ++j) q[j] = quantize_one(x[j], scale);
    *s = scale;
}

#if ME_HAVE_DISPATCH
// GCC does not vectorize either loop above (an fp max reduction, and rounding that must not
// raise), so the AVX2 version is written out: 32 values a pass, packed to int8 in order.
ME_AVX2 inline __m256i codes(const float* p, __m256 scale) {
    __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(p), scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_and_ps(r, _mm256_cmp_ps(r, r, _CMP_ORD_Q));   // NaN -> 0, as quantize_one
    return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-kActQmax)), _mm256_set1_ps(kActQmax)));
}

ME_AVX2 void quantize_row_avx2(const float* x, int64_t k, int8_t* q, float* s) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vmax = _mm256_setzero_ps(), vnan = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= k; j += 8) {
        const __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + j), abs_mask);
        vmax = _mm256_max_ps(vmax, a);
        vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vmax);
    float amax = 0.0f;
    for (float v : lanes) amax = v > amax ? v : amax;
    bool nan = _mm256_movemask_ps(vnan) != 0;
    for (; j < k; ++j) {
        const float a = std::fabs(x[j]);
        amax = a > amax ? a : amax;
        nan |= a != a;
    }
    const float scale = row_scale(amax, nan);
    *s = scale;
    const __m256 vs = _mm256_set1_ps(scale);
    // packs work per 128-bit lane: after two of them the 32 bytes hold dwords in the order
    // 0 2 4 6 1 3 5 7 of the four inputs' halves, which one permute puts back
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (j = 0; j + 32 <= k; j += 32) {
        const __m256i ab = _mm256_packs_epi32(codes(x + j, vs), codes(x + j + 8, vs));
        const __m256i cd = _mm256_packs_epi32(codes(x + j + 16, vs), codes(x + j + 24, vs));
        const __m256i packed = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j), packed);
    }
    for (; j < k; ++j) q[j] = quantize_one(x[j], scale);
}
#endif

// y = float(acc) * s_row * scale + bias, rounded after each operation as torch's
// `acc.to(float32).mul_(s).mul_(scale).add_(bias)`; y may alias acc (int32 and fp32 share a size).
template <int Isa>
inline void rescale_row_impl(const int32_t* acc, float s, const float* scale, const float* bias, int64_t n,
                             float* y) {
    if (bias != nullptr) {
        for (int64_t j = 0; j < n; ++j) {
            const float a = static_cast<float>(acc[j]) * s;
            const float b = a * scale[j];
            y[j] = b + bias[j];
        }
    } else {
        for (int64_t j = 0; j < n; ++j) {
            const float a = static_cast<float>(acc[j]) * s;
            y[j] = a * scale[j];
        }
    }
}

ME_AVX2 void rescale_row_avx2(const int32_t* acc, float s, const float* scale, const float* bias, int64_t n,
                              float* y) {
    rescale_row_impl<1>(acc, s, scale, bias, n, y);
}
void rescale_row_base(const int32_t* acc, float s, const float* scale, const float* bias, int64_t n, float* y) {
    rescale_row_impl<0>(acc, s, scale, bias, n, y);
}

bool has_avx2() {
#if ME_HAVE_DISPATCH
    static const bool yes = __builtin_cpu_supports("avx2");
    return yes;
#else
    return false;
#endif
}

// Below this many elements a thread team costs more than it saves (a late step's few rows).
constexpr int64_t kParallelElements = 1 << 16;

void quantize_rows(py::array x, py::array q, py::array s) {
    const auto xb = buffer_of<float>(x, "x", 2);
    const auto qb = buffer_of<int8_t>(q, "q", 2);
    const auto sb = buffer_of<float>(s, "s", 1);
    if (qb.rows != xb.rows || qb.cols != xb.cols || sb.cols != xb.rows)
        throw py::value_error("quantize_rows: expected q [M, K] and s [M] for x [M, K]");
    const int64_t m = xb.rows, k = xb.cols;
#if ME_HAVE_DISPATCH
    const auto row = has_avx2() ? quantize_row_avx2 : quantize_row_base;
#else
    const auto row = quantize_row_base;
#endif
    py::gil_scoped_release release;
#pragma omp parallel for schedule(static) if (m * k >= kParallelElements)
    for (int64_t r = 0; r < m; ++r) row(xb.data + r * xb.row_stride, k, qb.data + r * qb.row_stride, sb.data + r);
}

void rescale(py::array acc, py::array s, py::array scale, py::object bias, py::array out) {
    const auto ab = buffer_of<int32_t>(acc, "acc", 2);
    const auto sb = buffer_of<float>(s, "s", 1);
    const auto wb = buffer_of<float>(scale, "scale", 1);
    const auto yb = buffer_of<float>(out, "out", 2);
    const float* bias_data = nullptr;
    py::array bias_array;
    if (!bias.is_none()) {
        bias_array = bias.cast<py::array>();
        const auto bb = buffer_of<float>(bias_array, "bias", 1);
        if (bb.cols != ab.cols) throw py::value_error("rescale: expected bias [N]");
        bias_data = bb.data;
    }
    if (sb.cols != ab.rows || wb.cols != ab.cols || yb.rows != ab.rows || yb.cols != ab.cols)
        throw py::value_error("rescale: expected s [M], scale [N] and out [M, N] for acc [M, N]");
    const int64_t m = ab.rows, n = ab.cols;
    const auto row = has_avx2() ? rescale_row_avx2 : rescale_row_base;
    py::gil_scoped_release release;
#pragma omp parallel for schedule(static) if (m * n >= kParallelElements)
    for (int64_t r = 0; r < m; ++r)
        row(ab.data + r * ab.row_stride, sb.data[r], wb.data, bias_data, n, yb.data + r * yb.row_stride);
}

}  // namespace

void register_int8(py::module_& m) {
    m.def("int8_quantize_rows", &quantize_rows,
          "kernels/int8.py quantize_rows: x [M, K] fp32 -> q [M, K] int8 and s [M] fp32, written in place.",
          py::arg("x"), py::arg("q"), py::arg("s"));
    m.def("int8_rescale", &rescale,
          "kernels/int8.py's rescale: out [M, N] fp32 = acc [M, N] int32 * s [M] * scale [N] (+ bias [N]); "
          "out may be acc's own buffer viewed as fp32.",
          py::arg("acc"), py::arg("s"), py::arg("scale"), py::arg("bias"), py::arg("out"));
}
