// Linear layers over f32 weights laid out in panels, for decoding on a CPU with AVX-512.
//
// A decode step multiplies a few rows by every weight matrix of the model, so its products are
// bound by reading the weights from memory. Here a weight `(out, in)` is stored as panels of 16
// outputs (`(panels, in, 16)`: for each input feature, the 16 outputs' weights as one 64-byte
// vector), padded with zero outputs to an even number of panels. A product walks a pair of
// panels once, in order, and multiplies each pair of vectors by up to 12 rows of the input at a
// time (each input value broadcast, 24 accumulators); more rows take more passes over the same
// pair while it is still in the cache. The two threads split the pairs between them. No
// horizontal sums and no reblocking of the input are needed beyond one transpose of it per call.
//
// Each output sums its products in the order of the input features, as a plain dot product
// does, so the results equal libtorch's products up to f32 rounding.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SIPT_PANELS 1
#endif

#include <array>
#include <cstring>
#include <exception>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;     // outputs per panel: one AVX-512 vector of f32
constexpr int kMaxChunk = 12;      // input rows per pass over a pair of panels

void set_error(char* err, size_t len, const char* message) {
    if (err == nullptr || len == 0) return;
    std::strncpy(err, message, len - 1);
    err[len - 1] = '\0';
}

#ifdef SIPT_PANELS

using PairKernel = void (*)(const float*, const float*, int64_t, float*, int64_t, int64_t);

// `out[r, n0 .. n0 + 32)` for the `R` rows of `xt (K, R)` (the input transposed) times the
// pair of panels at `p0`; outputs at or past `n_out` are not written.
template <int R>
__attribute__((target("avx512f"))) void pair_product(const float* __restrict xt,
                                                      const float* __restrict p0, int64_t K,
                                                      float* __restrict out, int64_t n0,
                                                      int64_t n_out) {
    __m512 a0[R];
    __m512 a1[R];
    for (int r = 0; r < R; ++r) {
        a0[r] = _mm512_setzero_ps();
        a1[r] = _mm512_setzero_ps();
    }
    const float* p1 = p0 + K * kLanes;
    for (int64_t k = 0; k < K; ++k) {
        const __m512 w0 = _mm512_loadu_ps(p0 + k * kLanes);
        const __m512 w1 = _mm512_loadu_ps(p1 + k * kLanes);
        const float* xk = xt + k * R;
        for (int r = 0; r < R; ++r) {
            const __m512 x = _mm512_set1_ps(xk[r]);
            a0[r] = _mm512_fmadd_ps(w0, x, a0[r]);
            a1[r] = _mm512_fmadd_ps(w1, x, a1[r]);
        }
    }
    const auto mask = [&](int64_t start) -> __mmask16 {
        const int64_t left = n_out - start;
        if (left >= kLanes) return static_cast<__mmask16>(0xFFFF);
        return left <= 0 ? static_cast<__mmask16>(0)
                         : static_cast<__mmask16>((1u << left) - 1u);
    };
    const __mmask16 m0 = mask(n0);
    const __mmask16 m1 = mask(n0 + kLanes);
    for (int r = 0; r < R; ++r) {
        float* row = out + r * n_out + n0;
        _mm512_mask_storeu_ps(row, m0, a0[r]);
        if (m1 != 0) _mm512_mask_storeu_ps(row + kLanes, m1, a1[r]);
    }
}

template <int... R>
constexpr std::array<PairKernel, sizeof...(R) + 1> kernel_table(std::integer_sequence<int, R...>) {
    return {nullptr, &pair_product<R + 1>...};
}

const std::array<PairKernel, kMaxChunk + 1>& kernels() {
    static constexpr auto table = kernel_table(std::make_integer_sequence<int, kMaxChunk>{});
    return table;
}

#endif  // SIPT_PANELS

bool supported() {
#ifdef SIPT_PANELS
    static const bool has = __builtin_cpu_supports("avx512f");
    return has;
#else
    return false;
#endif
}

}  // namespace

extern "C" {

// Whether this CPU (and this build) has the panel kernels.
bool sipt_panels_supported() { return supported(); }

// `input (..., in)` (f32) times the panels `(panels, in, 16)` of a weight with `out_features`
// outputs, transposed: `(..., out_features)`, contiguous; null on error.
at::Tensor* sipt_panel_linear(const at::Tensor* input, const at::Tensor* panels,
                              int64_t out_features, char* err, size_t err_len) {
    try {
        TORCH_CHECK(supported(), "panel products need a CPU with AVX-512");
        const at::Tensor& p = *panels;
        TORCH_CHECK(p.dim() == 3 && p.size(2) == kLanes && p.size(0) % 2 == 0 &&
                        p.scalar_type() == at::kFloat && p.is_contiguous() && p.is_cpu(),
                    "panels must be contiguous f32 (2n, in, 16) on the CPU, got ", p.sizes(),
                    " ", p.scalar_type());
        const int64_t K = p.size(1);
        TORCH_CHECK(out_features > 0 && out_features <= p.size(0) * kLanes, "panels of ",
                    p.sizes(), " cannot hold ", out_features, " outputs");
        TORCH_CHECK(input->dim() >= 1 && input->size(-1) == K, "input of shape ",
                    input->sizes(), " for a weight of ", K, " input features");
        TORCH_CHECK(input->scalar_type() == at::kFloat && input->is_cpu(),
                    "panel products take f32 input on the CPU, got ", input->scalar_type());
        const at::Tensor x = input->contiguous();
        std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
        shape.back() = out_features;
        at::Tensor y = at::empty(shape, x.options());
        const int64_t M = x.numel() / K;
        if (M == 0) return new at::Tensor(y);
#ifdef SIPT_PANELS
        // The rows in near-equal chunks of at most kMaxChunk, each transposed to (K, rows).
        const int64_t chunks = (M + kMaxChunk - 1) / kMaxChunk;
        std::vector<int64_t> start(chunks + 1);
        for (int64_t c = 0; c <= chunks; ++c) start[c] = c * M / chunks;
        std::vector<float> xt(static_cast<size_t>(M * K));
        const float* xs = x.data_ptr<float>();
        at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
            for (int64_t c = first; c < last; ++c) {
                const int64_t r0 = start[c], rows = start[c + 1] - start[c];
                float* dst = xt.data() + r0 * K;
                for (int64_t r = 0; r < rows; ++r) {
                    const float* src = xs + (r0 + r) * K;
                    for (int64_t k = 0; k < K; ++k) dst[k * rows + r] = src[k];
                }
            }
        });
        const float* ps = p.data_ptr<float>();
        float* ys = y.data_ptr<float>();
        const int64_t pairs = p.size(0) / 2;
        const auto& table = kernels();
        at::parallel_for(0, pairs, 1, [&](int64_t first, int64_t last) {
            for (int64_t pair = first; pair < last; ++pair) {
                const float* p0 = ps + pair * 2 * K * kLanes;
                for (int64_t c = 0; c < chunks; ++c) {
                    const int64_t r0 = start[c], rows = start[c + 1] - start[c];
                    table[rows](xt.data() + r0 * K, p0, K, ys + r0 * out_features,
                                pair * 2 * kLanes, out_features);
                }
            }
        });
#endif
        return new at::Tensor(y);
    } catch (const std::exception& e) {
        set_error(err, err_len, e.what());
        return nullptr;
    }
}

}  // extern "C"
