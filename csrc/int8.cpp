// C++ twins of the passes around the int8 product in kernels/int8.py (same contract, see its
// docstring): the per-token activation quantization before `torch._int_mm`, with the pre-norm
// LayerNorm fused in front of it when asked, and the rescale after it, with GELU or the
// residual add fused behind it. In torch each of these is one to six elementwise passes over
// the activations (layer_norm; abs, amax, div, round, clamp, cast; cast, mul, mul, add; gelu;
// add); here each side is one pass per row.
//
// Where the arithmetic can be torch's it is, operation for operation, so the results are
// bitwise the torch passes': quantization, rescale, residual add. Two parts cannot be: the
// LayerNorm statistics (torch: fp32 Welford; here fp64) and GELU's erf (torch: Sleef with
// FMA); their bounds against the unfused passes are stated below and in kernels/int8.py.
//
// Each pass has an AVX2 version chosen at run time beside the x86-64 baseline one (which
// cannot round half-to-even in vectors: that is SSE4.1). No FMA anywhere: a fused
// multiply-add rounds once where torch rounds twice.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

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

// LayerNorm before the quantization, for an int8 linear that is the norm's only reader (the
// pre-norm layers: LN1 -> q|k|v, LN_cross -> cross q, LN2 -> linear1), so the normalized fp32
// activations never go to memory. The statistics in fp64, two passes (the mean, then the mean
// of the centred squares), rounded to fp32 once: mean, and rstd = 1 / sqrt(var + eps); then
// y = (x * rstd + (-mean * rstd)) * weight + bias in fp32, the form torch's CPU layer_norm
// evaluates, into a scratch row that the quantization above reads. torch accumulates the
// statistics in fp32 (Welford), so its mean and rstd are a few fp32 ulps off these: the
// normalized values differ by that much, which moves a code by one step only where x / s falls
// that close to a half (kernels/int8.py states the bound the tests hold).
struct Norm {
    const float* weight;   // [K]
    const float* bias;     // [K]
    double eps;            // a double, as torch adds it to the variance
};

inline void normalize_row(const float* x, int64_t k, const Norm& n, double mean, double var, float* y) {
    const float rstd = static_cast<float>(1.0 / std::sqrt(var + n.eps));
    const float shift = -static_cast<float>(mean) * rstd;
    for (int64_t j = 0; j < k; ++j) y[j] = (x[j] * rstd + shift) * n.weight[j] + n.bias[j];
}

void norm_quantize_row_base(const float* x, int64_t k, const Norm& n, float* y, int8_t* q, float* s) {
    double sum = 0.0;
    for (int64_t j = 0; j < k; ++j) sum += x[j];
    const double mean = sum / static_cast<double>(k);
    double squares = 0.0;
    for (int64_t j = 0; j < k; ++j) {
        const double d = x[j] - mean;
        squares += d * d;
    }
    normalize_row(x, k, n, mean, squares / static_cast<double>(k), y);
    quantize_row_base(y, k, q, s);
}

#if ME_HAVE_DISPATCH
ME_AVX2 inline double sum_lanes(__m256d v) {
    alignas(32) double lanes[4];
    _mm256_store_pd(lanes, v);
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

// The same statistics with four fp64 lanes a pass (another summation order: the sums differ
// from the scalar ones in fp64's last bits, far below the fp32 rounding they go through).
ME_AVX2 void norm_quantize_row_avx2(const float* x, int64_t k, const Norm& n, float* y, int8_t* q, float* s) {
    __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
    int64_t j = 0;
    for (; j + 8 <= k; j += 8) {
        const __m256 v = _mm256_loadu_ps(x + j);
        lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
        hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    }
    double sum = sum_lanes(_mm256_add_pd(lo, hi));
    for (int64_t t = j; t < k; ++t) sum += x[t];
    const double mean = sum / static_cast<double>(k);
    const __m256d vmean = _mm256_set1_pd(mean);
    lo = hi = _mm256_setzero_pd();
    for (j = 0; j + 8 <= k; j += 8) {
        const __m256 v = _mm256_loadu_ps(x + j);
        const __m256d a = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), vmean);
        const __m256d b = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), vmean);
        lo = _mm256_add_pd(lo, _mm256_mul_pd(a, a));
        hi = _mm256_add_pd(hi, _mm256_mul_pd(b, b));
    }
    double squares = sum_lanes(_mm256_add_pd(lo, hi));
    for (int64_t t = j; t < k; ++t) {
        const double d = x[t] - mean;
        squares += d * d;
    }
    normalize_row(x, k, n, mean, squares / static_cast<double>(k), y);   // vectorized here (AVX2, no FMA)
    quantize_row_avx2(y, k, q, s);
}
#endif

// GELU as F.gelu's default, v * 0.5 * (1 + erf(v / sqrt(2))), with erf a rational
// approximation (odd numerator / even denominator in x², the coefficients Eigen and XLA use
// for fp32 erf, inputs clamped to [-4, 4] where fp32 erf is ±1). torch's own vectorized erf
// cannot be reproduced bitwise here (Sleef's exp, FMA), so GELU is held to a tolerance instead
// of to torch's arithmetic: against an fp64 GELU, the error is below 2^-21 |v| (measured
// ~2^-22, as torch's own fp32 GELU; kernels/int8.py GELU_TOLERANCE). No FMA here either: the
// scalar and AVX2 versions run the same operations in the same order and agree bitwise.
constexpr float kErfAlpha[] = {-2.72614225801306e-10f, 2.77068142495902e-08f, -2.10102402082508e-06f,
                               -5.69250639462346e-05f, -7.34990630326855e-04f, -2.95459980854025e-03f,
                               -1.60960333262415e-02f};
constexpr float kErfBeta[] = {-1.45660718464996e-05f, -2.13374055278905e-04f, -1.68282697438203e-03f,
                              -7.37332916720468e-03f, -1.42647390514189e-02f};
constexpr float kSqrtHalf = 0.70710678118654752440f;

inline float gelu_one(float v) {
    float x = v * kSqrtHalf;
    // a NaN stays NaN through v below, whatever the clamp makes of it
    x = x < 4.0f ? x : 4.0f;
    x = x > -4.0f ? x : -4.0f;
    const float x2 = x * x;
    float p = kErfAlpha[0];
    for (int i = 1; i < 7; ++i) p = p * x2 + kErfAlpha[i];
    float q = kErfBeta[0];
    for (int i = 1; i < 5; ++i) q = q * x2 + kErfBeta[i];
    const float erf = (x * p) / q;
    return (v * 0.5f) * (1.0f + erf);
}

// y = float(acc) * s_row * scale + bias, rounded after each operation as torch's
// `acc.to(float32).mul_(s).mul_(scale).add_(bias)`; then, when asked, GELU (above) and the
// residual add `res + y` (torch's `x + linear(...)`, bitwise). y may alias acc (int32 and
// fp32 share a size), not res.
struct Epilogue {
    const float* bias;   // [N] or nullptr
    const float* res;    // this row of the residual [M, N], or nullptr
    bool gelu;
};

inline float rescale_one(int32_t acc, float s, float scale, int64_t j, const Epilogue& e) {
    float y = (static_cast<float>(acc) * s) * scale;
    if (e.bias != nullptr) y = y + e.bias[j];
    if (e.gelu) y = gelu_one(y);
    if (e.res != nullptr) y = e.res[j] + y;
    return y;
}

void rescale_row_base(const int32_t* acc, float s, const float* scale, const Epilogue& e, int64_t n, float* y) {
    for (int64_t j = 0; j < n; ++j) y[j] = rescale_one(acc[j], s, scale[j], j, e);
}

#if ME_HAVE_DISPATCH
ME_AVX2 inline __m256 gelu8(__m256 v) {
    __m256 x = _mm256_mul_ps(v, _mm256_set1_ps(kSqrtHalf));
    // min/max return their second operand on a NaN, as the scalar comparisons above do
    x = _mm256_min_ps(x, _mm256_set1_ps(4.0f));
    x = _mm256_max_ps(x, _mm256_set1_ps(-4.0f));
    const __m256 x2 = _mm256_mul_ps(x, x);
    __m256 p = _mm256_set1_ps(kErfAlpha[0]);
    for (int i = 1; i < 7; ++i) p = _mm256_add_ps(_mm256_mul_ps(p, x2), _mm256_set1_ps(kErfAlpha[i]));
    __m256 q = _mm256_set1_ps(kErfBeta[0]);
    for (int i = 1; i < 5; ++i) q = _mm256_add_ps(_mm256_mul_ps(q, x2), _mm256_set1_ps(kErfBeta[i]));
    const __m256 erf = _mm256_div_ps(_mm256_mul_ps(x, p), q);
    return _mm256_mul_ps(_mm256_mul_ps(v, _mm256_set1_ps(0.5f)), _mm256_add_ps(_mm256_set1_ps(1.0f), erf));
}

ME_AVX2 void rescale_row_avx2(const int32_t* acc, float s, const float* scale, const Epilogue& e, int64_t n,
                              float* y) {
    const __m256 vs = _mm256_set1_ps(s);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + j));
        __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a), vs), _mm256_loadu_ps(scale + j));
        if (e.bias != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(e.bias + j));
        if (e.gelu) v = gelu8(v);
        if (e.res != nullptr) v = _mm256_add_ps(_mm256_loadu_ps(e.res + j), v);
        _mm256_storeu_ps(y + j, v);
    }
    for (; j < n; ++j) y[j] = rescale_one(acc[j], s, scale[j], j, e);
}
#endif

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

void quantize_rows(py::array x, py::array q, py::array s, py::object norm_weight, py::object norm_bias, double eps) {
    const auto xb = buffer_of<float>(x, "x", 2);
    const auto qb = buffer_of<int8_t>(q, "q", 2);
    const auto sb = buffer_of<float>(s, "s", 1);
    if (qb.rows != xb.rows || qb.cols != xb.cols || sb.cols != xb.rows)
        throw py::value_error("quantize_rows: expected q [M, K] and s [M] for x [M, K]");
    const int64_t m = xb.rows, k = xb.cols;
    if (norm_weight.is_none() != norm_bias.is_none())
        throw py::value_error("quantize_rows: norm_weight and norm_bias go together");
    py::array weight_array, bias_array;
    Norm norm{nullptr, nullptr, eps};
    if (!norm_weight.is_none()) {
        weight_array = norm_weight.cast<py::array>();
        bias_array = norm_bias.cast<py::array>();
        const auto wb = buffer_of<float>(weight_array, "norm_weight", 1);
        const auto bb = buffer_of<float>(bias_array, "norm_bias", 1);
        if (wb.cols != k || bb.cols != k) throw py::value_error("quantize_rows: expected norm_weight, norm_bias [K]");
        norm.weight = wb.data;
        norm.bias = bb.data;
    }
#if ME_HAVE_DISPATCH
    const auto row = has_avx2() ? quantize_row_avx2 : quantize_row_base;
    const auto norm_row = has_avx2() ? norm_quantize_row_avx2 : norm_quantize_row_base;
#else
    const auto row = quantize_row_base;
    const auto norm_row = norm_quantize_row_base;
#endif
    py::gil_scoped_release release;
    if (norm.weight == nullptr) {
#pragma omp parallel for schedule(static) if (m * k >= kParallelElements)
        for (int64_t r = 0; r < m; ++r) row(xb.data + r * xb.row_stride, k, qb.data + r * qb.row_stride, sb.data + r);
        return;
    }
#pragma omp parallel if (m * k >= kParallelElements)
    {
        std::vector<float> scratch(k);   // one normalized row per thread, in L1/L2
#pragma omp for schedule(static)
        for (int64_t r = 0; r < m; ++r)
            norm_row(xb.data + r * xb.row_stride, k, norm, scratch.data(), qb.data + r * qb.row_stride, sb.data + r);
    }
}

void rescale(py::array acc, py::array s, py::array scale, py::object bias, py::array out, py::object residual,
             bool gelu) {
    const auto ab = buffer_of<int32_t>(acc, "acc", 2);
    const auto sb = buffer_of<float>(s, "s", 1);
    const auto wb = buffer_of<float>(scale, "scale", 1);
    const auto yb = buffer_of<float>(out, "out", 2);
    Epilogue e{nullptr, nullptr, gelu};
    py::array bias_array, res_array;
    if (!bias.is_none()) {
        bias_array = bias.cast<py::array>();
        const auto bb = buffer_of<float>(bias_array, "bias", 1);
        if (bb.cols != ab.cols) throw py::value_error("rescale: expected bias [N]");
        e.bias = bb.data;
    }
    Buffer<float> rb{nullptr, 0, 0, 0};
    if (!residual.is_none()) {
        res_array = residual.cast<py::array>();
        rb = buffer_of<float>(res_array, "residual", 2);
        if (rb.rows != ab.rows || rb.cols != ab.cols) throw py::value_error("rescale: expected residual [M, N]");
    }
    if (sb.cols != ab.rows || wb.cols != ab.cols || yb.rows != ab.rows || yb.cols != ab.cols)
        throw py::value_error("rescale: expected s [M], scale [N] and out [M, N] for acc [M, N]");
    const int64_t m = ab.rows, n = ab.cols;
#if ME_HAVE_DISPATCH
    const auto row = has_avx2() ? rescale_row_avx2 : rescale_row_base;
#else
    const auto row = rescale_row_base;
#endif
    py::gil_scoped_release release;
#pragma omp parallel for schedule(static) firstprivate(e) if (m * n >= kParallelElements)
    for (int64_t r = 0; r < m; ++r) {
        if (rb.data != nullptr) e.res = rb.data + r * rb.row_stride;
        row(ab.data + r * ab.row_stride, sb.data[r], wb.data, e, n, yb.data + r * yb.row_stride);
    }
}

}  // namespace

void register_int8(py::module_& m) {
    m.def("int8_quantize_rows", &quantize_rows,
          "kernels/int8.py quantize_rows: x [M, K] fp32 -> q [M, K] int8 and s [M] fp32, written in place; with "
          "norm_weight and norm_bias [K], of layer_norm(x) (fp64 statistics, see csrc/int8.cpp).",
          py::arg("x"), py::arg("q"), py::arg("s"), py::arg("norm_weight") = py::none(),
          py::arg("norm_bias") = py::none(), py::arg("eps") = 1e-5);
    m.def("int8_rescale", &rescale,
          "kernels/int8.py's rescale: out [M, N] fp32 = acc [M, N] int32 * s [M] * scale [N] (+ bias [N]), then "
          "gelu(out) if gelu, then residual [M, N] + out if given; out may be acc's own buffer viewed as fp32.",
          py::arg("acc"), py::arg("s"), py::arg("scale"), py::arg("bias"), py::arg("out"),
          py::arg("residual") = py::none(), py::arg("gelu") = false);
}
