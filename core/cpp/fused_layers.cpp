// Fused CPU kernels, forward and backward, for the elementwise layers of a Llama block: RMSNorm,
// the SwiGLU product silu(gate) · up, and rotate-half rotary embeddings. libtorch eager runs
// each of them as a chain of separate passes over memory (RMSNorm alone is five forward and
// about ten backward), each with a fresh buffer; here each is one pass forward and one pass
// backward, with autograd nodes of their own (`torch::autograd::Function`), so that tch's
// `backward` reaches them like any other op. Also, forward only: the chunked loss's softmax, the
// attention of a decode step, the sampler's pick of each row's next token, and for inference
// (no autograd) each residual add with the RMSNorm after it, and SwiGLU, in f32 or bf16.
//
// f32 tensors on a CPU (the sampler and the inference kernels also take bf16); the Rust side (`model::fused`)
// decides when they apply and keeps libtorch's own ops for everything else. Tensors cross the
// boundary as the `at::Tensor*` handles tch uses; errors come back as text, never as C++
// exceptions.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <type_traits>
#include <vector>

// The loops below are compiled for AVX-512, AVX2+FMA and plain x86-64, picked at load time by
// the CPU (GCC's function multi-versioning), so that a binary built on one machine stays fast
// and correct on another.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SIPT_VECTOR_CLONES \
    __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SIPT_VECTOR_CLONES
#endif

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void set_error(char* err, size_t len, const char* message) {
    if (err == nullptr || len == 0) return;
    std::strncpy(err, message, len - 1);
    err[len - 1] = '\0';
}

// Rows per task of a parallel loop: about 16K elements, so that small inputs (a decode step)
// stay on the calling thread.
int64_t grain_rows(int64_t row_len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_len)); }

// e^x in f32, written so that the compiler vectorises it (no calls, no branches): x = n ln 2 + r
// with |r| ≤ ln 2 / 2, e^r by its Taylor series to the 7th power (relative error below 2e-7
// there), 2^n built in the exponent bits. Inputs are clamped to the range where e^x is a
// normal f32.
inline float exp_f32(float x) {
    x = x < -87.3365447505531f ? -87.3365447505531f : x;
    x = x > 88.3762626647949f ? 88.3762626647949f : x;
    // n = round(x / ln 2), by adding and taking away 1.5 · 2^23 (exact for |n| < 2^22).
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    // ln 2 in two parts, so that x − n ln 2 loses nothing.
    float r = x - n * 0.693145751953125f;
    r = r - n * 1.42860682030941723212e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    return p * __builtin_bit_cast(float, bits);
}

// Σ a[j] · b[j] · c[j] (c may be null: Σ a · b), in 16 running sums that the compiler keeps in
// vector registers (a float sum in one accumulator cannot be vectorised without reordering it).
inline float dot3(const float* __restrict a, const float* __restrict b,
                  const float* __restrict c, int64_t n) {
    constexpr int64_t L = 16;
    float acc[L] = {};
    int64_t j = 0;
    for (; j + L <= n; j += L) {
        for (int64_t k = 0; k < L; ++k) {
            acc[k] += a[j + k] * b[j + k] * (c == nullptr ? 1.0f : c[j + k]);
        }
    }
    float sum = 0.0f;
    for (int64_t k = 0; k < L; ++k) sum += acc[k];
    for (; j < n; ++j) sum += a[j] * b[j] * (c == nullptr ? 1.0f : c[j]);
    return sum;
}

inline float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

// ---- RMSNorm: y = x / sqrt(mean(x²) + eps) · w over the last dimension ---------------------

SIPT_VECTOR_CLONES
void rms_forward_rows(const float* __restrict x, const float* __restrict w, float* __restrict y,
                      float* __restrict rstd, int64_t d, double eps, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
        const float* xr = x + r * d;
        float* yr = y + r * d;
        const float sum = dot3(xr, xr, nullptr, d);
        const float s = 1.0f / std::sqrt(sum / static_cast<float>(d) + static_cast<float>(eps));
        rstd[r] = s;
        for (int64_t j = 0; j < d; ++j) yr[j] = (xr[j] * s) * w[j];
    }
}

// dx = s · w · dy − x · s³ · Σ(x · w · dy) / d per row; dw accumulates Σ_rows dy · x · s.
SIPT_VECTOR_CLONES
void rms_backward_rows(const float* __restrict x, const float* __restrict w,
                       const float* __restrict rstd, const float* __restrict dy,
                       float* __restrict dx, float* __restrict dw, int64_t d, int64_t begin,
                       int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
        const float* xr = x + r * d;
        const float* gr = dy + r * d;
        const float s = rstd[r];
        if (dx != nullptr) {
            const float dot = dot3(xr, w, gr, d);
            const float c = dot * s * s * s / static_cast<float>(d);
            float* out = dx + r * d;
            for (int64_t j = 0; j < d; ++j) out[j] = s * w[j] * gr[j] - xr[j] * c;
        }
        if (dw != nullptr) {
            for (int64_t j = 0; j < d; ++j) dw[j] += gr[j] * xr[j] * s;
        }
    }
}

struct RmsNorm : public torch::autograd::Function<RmsNorm> {
    static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                              const at::Tensor& weight, double eps) {
        const int64_t d = input.size(-1);
        TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d, "RMSNorm weight of shape ",
                    weight.sizes(), " for rows of ", d);
        auto x = input.contiguous();
        auto w = weight.contiguous();
        const int64_t rows = d == 0 ? 0 : x.numel() / d;
        auto y = at::empty_like(x);
        auto rstd = at::empty({rows}, x.options());
        const float* xp = x.const_data_ptr<float>();
        const float* wp = w.const_data_ptr<float>();
        float* yp = y.mutable_data_ptr<float>();
        float* sp = rstd.mutable_data_ptr<float>();
        at::parallel_for(0, rows, grain_rows(d), [&](int64_t begin, int64_t end) {
            rms_forward_rows(xp, wp, yp, sp, d, eps, begin, end);
        });
        ctx->save_for_backward({x, w, rstd});
        return y;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        auto saved = ctx->get_saved_variables();
        const auto& x = saved[0];
        const auto& w = saved[1];
        const auto& rstd = saved[2];
        auto dy = grads[0].contiguous();
        const int64_t d = x.size(-1);
        const int64_t rows = rstd.size(0);
        const bool want_x = ctx->needs_input_grad(0);
        const bool want_w = ctx->needs_input_grad(1);
        at::Tensor dx = want_x ? at::empty_like(x) : at::Tensor();
        // The weight's gradient is summed per task, then over the tasks.
        const int64_t grain = grain_rows(d);
        const int64_t tasks =
            std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (rows + grain - 1) / grain));
        at::Tensor partial = want_w ? at::zeros({tasks, d}, x.options()) : at::Tensor();
        const float* xp = x.const_data_ptr<float>();
        const float* wp = w.const_data_ptr<float>();
        const float* sp = rstd.const_data_ptr<float>();
        const float* gp = dy.const_data_ptr<float>();
        float* dxp = want_x ? dx.mutable_data_ptr<float>() : nullptr;
        float* pp = want_w ? partial.mutable_data_ptr<float>() : nullptr;
        const int64_t per = (rows + tasks - 1) / tasks;
        at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t last) {
            for (int64_t t = first; t < last; ++t) {
                const int64_t begin = t * per;
                const int64_t end = std::min(rows, begin + per);
                if (begin < end) {
                    rms_backward_rows(xp, wp, sp, gp, dxp, pp == nullptr ? nullptr : pp + t * d,
                                      d, begin, end);
                }
            }
        });
        at::Tensor dw = want_w ? partial.sum(0) : at::Tensor();
        return {dx, dw, at::Tensor()};
    }
};

// ---- SwiGLU: y = silu(gate) · up ------------------------------------------------------------

// Rows of `gate` and `up` may be strided (the halves of one fused gate/up product); the output
// and the gradients are contiguous.
SIPT_VECTOR_CLONES
void swiglu_forward_rows(const float* __restrict g, int64_t g_stride, const float* __restrict u,
                         int64_t u_stride, float* __restrict y, int64_t n, int64_t begin,
                         int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
        const float* gr = g + r * g_stride;
        const float* ur = u + r * u_stride;
        float* yr = y + r * n;
        for (int64_t j = 0; j < n; ++j) yr[j] = gr[j] * sigmoid_f32(gr[j]) * ur[j];
    }
}

// d gate = dy · up · σ(g) · (1 + g · (1 − σ(g))), d up = dy · g · σ(g).
SIPT_VECTOR_CLONES
void swiglu_backward_rows(const float* __restrict g, int64_t g_stride,
                          const float* __restrict u, int64_t u_stride,
                          const float* __restrict dy, float* __restrict dg,
                          float* __restrict du, int64_t n, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
        const float* gr = g + r * g_stride;
        const float* ur = u + r * u_stride;
        const float* dyr = dy + r * n;
        float* dgr = dg + r * n;
        float* dur = du + r * n;
        for (int64_t j = 0; j < n; ++j) {
            const float s = sigmoid_f32(gr[j]);
            const float silu = gr[j] * s;
            dgr[j] = dyr[j] * ur[j] * s * (1.0f + gr[j] * (1.0f - s));
            dur[j] = dyr[j] * silu;
        }
    }
}

// A `(rows, n)` view of `t (..., n)` whose last dimension is dense, copied only if it is not.
at::Tensor rows_view(const at::Tensor& t) {
    const int64_t n = t.size(-1);
    auto v = t.reshape({-1, n});
    if (v.stride(1) != 1 || (v.size(0) > 1 && v.stride(0) < n)) v = v.contiguous();
    return v;
}

struct SwiGlu : public torch::autograd::Function<SwiGlu> {
    static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
        TORCH_CHECK(gate.sizes() == up.sizes(), "SwiGLU halves of shapes ", gate.sizes(), " and ",
                    up.sizes());
        auto g = rows_view(gate);
        auto u = rows_view(up);
        const int64_t rows = g.size(0);
        const int64_t n = g.size(1);
        auto y = at::empty({rows, n}, g.options());
        const float* gp = g.const_data_ptr<float>();
        const float* upp = u.const_data_ptr<float>();
        float* yp = y.mutable_data_ptr<float>();
        const int64_t gs = g.stride(0);
        const int64_t us = u.stride(0);
        at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
            swiglu_forward_rows(gp, gs, upp, us, yp, n, begin, end);
        });
        ctx->save_for_backward({g, u});
        ctx->saved_data["shape"] = gate.sizes().vec();
        return y.view(gate.sizes());
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        auto saved = ctx->get_saved_variables();
        const auto& g = saved[0];
        const auto& u = saved[1];
        auto shape = ctx->saved_data["shape"].toIntVector();
        auto dy = grads[0].contiguous().view({g.size(0), g.size(1)});
        const int64_t rows = g.size(0);
        const int64_t n = g.size(1);
        auto dg = at::empty({rows, n}, g.options());
        auto du = at::empty({rows, n}, g.options());
        const float* gp = g.const_data_ptr<float>();
        const float* upp = u.const_data_ptr<float>();
        const float* dyp = dy.const_data_ptr<float>();
        float* dgp = dg.mutable_data_ptr<float>();
        float* dup = du.mutable_data_ptr<float>();
        const int64_t gs = g.stride(0);
        const int64_t us = u.stride(0);
        at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
            swiglu_backward_rows(gp, gs, upp, us, dyp, dgp, dup, n, begin, end);
        });
        return {dg.view(shape), du.view(shape)};
    }
};

// ---- Inference: RMSNorm with the residual add before it, and SwiGLU, in f32 or bf16 ---------
// Without autograd (decoding runs under no_grad), for activations of either type: what a bf16
// model's plain path runs as about eight libtorch ops per norm (the conversions to f32 and
// back, the square, the mean, the rsqrt, two products) and three for a residual add with its
// norm. Arithmetic is in f32 and rounds to the activations' type where the plain path's ops
// do: `x + h`, then `x · s`, then that times the weight; `silu(g)`, then that times `u`.
// bf16 rounds to nearest even, as libtorch converts.

inline float bf16_to_f32(uint16_t h) {
    return __builtin_bit_cast(float, static_cast<uint32_t>(h) << 16);
}

inline uint16_t f32_to_bf16(float f) {
    const uint32_t u = __builtin_bit_cast(uint32_t, f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return f != f ? static_cast<uint16_t>(0x7fc0u) : static_cast<uint16_t>(rounded);
}

// Loads, stores and the rounding of an intermediate result, per activation type.
template <typename T>
struct Act;
template <>
struct Act<float> {
    static float load(float x) { return x; }
    static float store(float x) { return x; }
    static float round(float x) { return x; }
};
template <>
struct Act<uint16_t> {
    static float load(uint16_t x) { return bf16_to_f32(x); }
    static uint16_t store(float x) { return f32_to_bf16(x); }
    static float round(float x) { return bf16_to_f32(f32_to_bf16(x)); }
};

// Rows [begin, end) of `x (rows, d)`: x ← x + h when `h` is given, then y = RMSNorm(x) · w.
// `buf` holds d floats (a row of x in f32).
template <typename T>
inline __attribute__((always_inline)) void add_rms_rows_of(T* __restrict x, const T* __restrict h,
                                                           const T* __restrict w,
                                                           T* __restrict y, float* __restrict buf,
                                                           int64_t d, float eps, int64_t begin,
                                                           int64_t end) {
    using A = Act<T>;
    for (int64_t r = begin; r < end; ++r) {
        T* xr = x + r * d;
        if (h != nullptr) {
            const T* hr = h + r * d;
            for (int64_t j = 0; j < d; ++j) {
                const T sum = A::store(A::load(xr[j]) + A::load(hr[j]));
                xr[j] = sum;
                buf[j] = A::load(sum);
            }
        } else {
            for (int64_t j = 0; j < d; ++j) buf[j] = A::load(xr[j]);
        }
        const float s = 1.0f / std::sqrt(dot3(buf, buf, nullptr, d) / static_cast<float>(d) + eps);
        T* yr = y + r * d;
        for (int64_t j = 0; j < d; ++j) yr[j] = A::store(A::round(buf[j] * s) * A::load(w[j]));
    }
}

SIPT_VECTOR_CLONES
void add_rms_rows(void* x, const void* h, const void* w, void* y, bool bf16, int64_t d,
                  float eps, int64_t begin, int64_t end) {
    std::vector<float> buf(static_cast<size_t>(d));
    if (bf16) {
        add_rms_rows_of(static_cast<uint16_t*>(x), static_cast<const uint16_t*>(h),
                        static_cast<const uint16_t*>(w), static_cast<uint16_t*>(y), buf.data(),
                        d, eps, begin, end);
    } else {
        add_rms_rows_of(static_cast<float*>(x), static_cast<const float*>(h),
                        static_cast<const float*>(w), static_cast<float*>(y), buf.data(), d, eps,
                        begin, end);
    }
}

template <typename T>
inline __attribute__((always_inline)) void swiglu_rows_of(const T* __restrict g, int64_t gs,
                                                          const T* __restrict u, int64_t us,
                                                          T* __restrict y, int64_t n,
                                                          int64_t begin, int64_t end) {
    using A = Act<T>;
    for (int64_t r = begin; r < end; ++r) {
        const T* gr = g + r * gs;
        const T* ur = u + r * us;
        T* yr = y + r * n;
        for (int64_t j = 0; j < n; ++j) {
            const float gj = A::load(gr[j]);
            yr[j] = A::store(A::round(gj * sigmoid_f32(gj)) * A::load(ur[j]));
        }
    }
}

SIPT_VECTOR_CLONES
void swiglu_infer_rows(const void* g, int64_t gs, const void* u, int64_t us, void* y, bool bf16,
                       int64_t n, int64_t begin, int64_t end) {
    if (bf16) {
        swiglu_rows_of(static_cast<const uint16_t*>(g), gs, static_cast<const uint16_t*>(u), us,
                       static_cast<uint16_t*>(y), n, begin, end);
    } else {
        swiglu_rows_of(static_cast<const float*>(g), gs, static_cast<const float*>(u), us,
                       static_cast<float*>(y), n, begin, end);
    }
}

bool is_cpu_act(const at::Tensor& t) {
    return t.device().is_cpu() &&
           (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16);
}

// Whether no gradient can flow through these tensors: gradients are off, or none needs one.
bool no_gradient(std::initializer_list<const at::Tensor*> ts) {
    if (!at::GradMode::is_enabled()) return true;
    for (const at::Tensor* t : ts) {
        if (t != nullptr && t->requires_grad()) return false;
    }
    return true;
}

at::Tensor add_rms_norm_infer(at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
                              double eps) {
    const int64_t d = x.dim() == 0 ? 0 : x.size(-1);
    TORCH_CHECK(is_cpu_act(x) && weight.scalar_type() == x.scalar_type() &&
                    weight.device().is_cpu(),
                "inference RMSNorm takes f32 or bf16 activations on a CPU with weights of the "
                "same type, not ", x.scalar_type(), " and ", weight.scalar_type());
    TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d, "RMSNorm weight of shape ",
                weight.sizes(), " for rows of ", d);
    TORCH_CHECK(no_gradient({&x, residual, &weight}),
                "inference RMSNorm runs without gradients (under no_grad)");
    at::Tensor h;
    if (residual != nullptr) {
        // x is updated in place, so it must be the dense tensor itself.
        TORCH_CHECK(x.is_contiguous() && residual->sizes() == x.sizes() &&
                        residual->scalar_type() == x.scalar_type(),
                    "residual add of ", residual->scalar_type(), " ", residual->sizes(),
                    " into ", x.scalar_type(), " ", x.sizes(), " (contiguous)");
        h = residual->contiguous();
    }
    // Without a residual x is only read: a dense copy will do.
    at::Tensor xs = residual != nullptr ? x : x.contiguous();
    auto w = weight.contiguous();
    auto y = at::empty_like(xs, at::MemoryFormat::Contiguous);
    const int64_t rows = d == 0 ? 0 : xs.numel() / d;
    const bool bf16 = xs.scalar_type() == at::kBFloat16;
    void* xp = xs.data_ptr();
    const void* hp = residual != nullptr ? h.const_data_ptr() : nullptr;
    const void* wp = w.const_data_ptr();
    void* yp = y.data_ptr();
    const float e = static_cast<float>(eps);
    at::parallel_for(0, rows, grain_rows(d), [&](int64_t begin, int64_t end) {
        add_rms_rows(xp, hp, wp, yp, bf16, d, e, begin, end);
    });
    if (residual != nullptr) x.unsafeGetTensorImpl()->bump_version();
    return y;
}

at::Tensor swiglu_infer(const at::Tensor& gate, const at::Tensor& up) {
    TORCH_CHECK(gate.sizes() == up.sizes(), "SwiGLU halves of shapes ", gate.sizes(), " and ",
                up.sizes());
    TORCH_CHECK(no_gradient({&gate, &up}), "inference SwiGLU runs without gradients");
    auto g = rows_view(gate);
    auto u = rows_view(up);
    const int64_t rows = g.size(0);
    const int64_t n = g.size(1);
    auto y = at::empty({rows, n}, g.options());
    const bool bf16 = g.scalar_type() == at::kBFloat16;
    const void* gp = g.const_data_ptr();
    const void* upp = u.const_data_ptr();
    void* yp = y.data_ptr();
    const int64_t gs = g.stride(0);
    const int64_t us = u.stride(0);
    at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
        swiglu_infer_rows(gp, gs, upp, us, yp, bf16, n, begin, end);
    });
    return y.view(gate.sizes());
}

// ---- A decode step's q, k and v from one product, paired layout, into the KV cache -----------
// The packed weights give q and k with each rotated pair of dimensions side by side (x₀, x₁),
// which a unit complex number (c, s) turns: (x₀c − x₁s, x₀s + x₁c), in f32. Row r of
// `qkv (rows, (H + 2·KV)·D)` (f32 or bf16) holds H query heads, KV key heads and KV value heads;
// its rotated keys and its values go straight into the f32 cache at the row's position, its
// rotated queries into `q (rows, H, D)`. What libtorch ran as a conversion to f32, a complex
// product and two strided copies into the cache, each with a fresh buffer.

template <typename T>
inline __attribute__((always_inline)) void turn_pairs(const T* __restrict x,
                                                      const float* __restrict turn,
                                                      float* __restrict y, int64_t D) {
    using A = Act<T>;
    for (int64_t i = 0; i < D / 2; ++i) {
        const float x0 = A::load(x[2 * i]), x1 = A::load(x[2 * i + 1]);
        const float c = turn[2 * i], s = turn[2 * i + 1];
        y[2 * i] = x0 * c - x1 * s;
        y[2 * i + 1] = x0 * s + x1 * c;
    }
}

struct CacheSlot {
    float* data;
    int64_t s0, s1, s2;  // element strides (row, head, position); the last dimension is dense
};

template <typename T>
inline __attribute__((always_inline)) void qkv_pairs_rows_of(
    const T* __restrict qkv, const float* __restrict turn, float* __restrict q, CacheSlot k,
    CacheSlot v, int64_t t, int64_t start, int64_t H, int64_t KV, int64_t D, int64_t begin,
    int64_t end) {
    using A = Act<T>;
    const int64_t n = (H + 2 * KV) * D;
    for (int64_t r = begin; r < end; ++r) {
        const T* x = qkv + r * n;
        const float* tr = turn + r * D;
        const int64_t b = r / t, pos = start + r % t;
        for (int64_t h = 0; h < H; ++h) turn_pairs(x + h * D, tr, q + (r * H + h) * D, D);
        for (int64_t h = 0; h < KV; ++h) {
            turn_pairs(x + (H + h) * D, tr, k.data + b * k.s0 + h * k.s1 + pos * k.s2, D);
            const T* xv = x + (H + KV + h) * D;
            float* yv = v.data + b * v.s0 + h * v.s1 + pos * v.s2;
            for (int64_t j = 0; j < D; ++j) yv[j] = A::load(xv[j]);
        }
    }
}

SIPT_VECTOR_CLONES
void qkv_pairs_rows(const void* qkv, bool bf16, const float* turn, float* q, CacheSlot k,
                    CacheSlot v, int64_t t, int64_t start, int64_t H, int64_t KV, int64_t D,
                    int64_t begin, int64_t end) {
    if (bf16) {
        qkv_pairs_rows_of(static_cast<const uint16_t*>(qkv), turn, q, k, v, t, start, H, KV, D,
                          begin, end);
    } else {
        qkv_pairs_rows_of(static_cast<const float*>(qkv), turn, q, k, v, t, start, H, KV, D,
                          begin, end);
    }
}

at::Tensor qkv_pairs_into_cache(const at::Tensor& qkv, const at::Tensor& turn, at::Tensor& ck,
                                at::Tensor& cv, int64_t start, int64_t H, int64_t KV) {
    TORCH_CHECK(is_cpu_act(qkv) && qkv.dim() == 3, "paired q, k, v of ", qkv.scalar_type(),
                " and shape ", qkv.sizes(), " (expected (B, T, n) f32 or bf16 on a CPU)");
    const int64_t B = qkv.size(0), T = qkv.size(1);
    TORCH_CHECK(H > 0 && KV > 0 && qkv.size(2) % (H + 2 * KV) == 0,
                "paired q, k, v: ", qkv.size(2), " columns for ", H, " + 2 × ", KV, " heads");
    const int64_t D = qkv.size(2) / (H + 2 * KV);
    TORCH_CHECK(D % 2 == 0, "paired rotation of heads of odd size ", D);
    TORCH_CHECK(turn.scalar_type() == at::kComplexFloat && turn.numel() == B * T * (D / 2),
                "rotation of ", turn.scalar_type(), " and shape ", turn.sizes(), " for ", B,
                " × ", T, " positions of ", D / 2, " pairs (expected complex f32)");
    for (const at::Tensor* c : {&ck, &cv}) {
        TORCH_CHECK(c->device().is_cpu() && c->scalar_type() == at::kFloat && c->dim() == 4 &&
                        c->size(0) == B && c->size(1) == KV &&
                        c->size(3) == D && c->stride(3) == 1 && start >= 0 &&
                        start + T <= c->size(2),
                    "cache of ", c->scalar_type(), " and shape ", c->sizes(), " for ", T,
                    " positions at ", start, " of ", B, " rows, ", KV, " heads of ", D,
                    " (expected f32, dense rows)");
    }
    TORCH_CHECK(no_gradient({&qkv}), "the paired rotation into the cache runs without gradients");
    auto x = qkv.contiguous();
    auto tr = at::view_as_real(turn.contiguous()).contiguous();
    auto q = at::empty({B, T, H, D}, qkv.options().dtype(at::kFloat));
    const bool bf16 = x.scalar_type() == at::kBFloat16;
    const void* xp = x.const_data_ptr();
    const float* tp = tr.const_data_ptr<float>();
    float* qp = q.mutable_data_ptr<float>();
    const CacheSlot k{ck.mutable_data_ptr<float>(), ck.stride(0), ck.stride(1), ck.stride(2)};
    const CacheSlot v{cv.mutable_data_ptr<float>(), cv.stride(0), cv.stride(1), cv.stride(2)};
    at::parallel_for(0, B * T, grain_rows(x.size(2)), [&](int64_t begin, int64_t end) {
        qkv_pairs_rows(xp, bf16, tp, qp, k, v, T, start, H, KV, D, begin, end);
    });
    ck.unsafeGetTensorImpl()->bump_version();
    cv.unsafeGetTensorImpl()->bump_version();
    return q;
}

// ---- Rotary embeddings, rotate-half layout --------------------------------------------------
// x (N, H, D): N positions of H heads (rows of positions may be strided); cos and sin (N, D). With x = (x1, x2) the two halves of
// a head: y1 = x1 · cos1 − x2 · sin1, y2 = x2 · cos2 + x1 · sin2.
// `inverse`: the transpose of the rotation, which is the gradient of the forward one. The two
// directions are separate loops, each vectorised.
SIPT_VECTOR_CLONES
void rope_rows(const float* __restrict x, int64_t x_stride, const float* __restrict cos,
               const float* __restrict sin, float* __restrict y, int64_t heads, int64_t d,
               bool inverse, int64_t begin, int64_t end) {
    const int64_t half = d / 2;
    for (int64_t r = begin; r < end; ++r) {
        const float* c1 = cos + r * d;
        const float* c2 = c1 + half;
        const float* s1 = sin + r * d;
        const float* s2 = s1 + half;
        for (int64_t h = 0; h < heads; ++h) {
            const float* x1 = x + r * x_stride + h * d;
            const float* x2 = x1 + half;
            float* y1 = y + (r * heads + h) * d;
            float* y2 = y1 + half;
            if (inverse) {
                for (int64_t j = 0; j < half; ++j) {
                    y1[j] = x1[j] * c1[j] + x2[j] * s2[j];
                    y2[j] = x2[j] * c2[j] - x1[j] * s1[j];
                }
            } else {
                for (int64_t j = 0; j < half; ++j) {
                    y1[j] = x1[j] * c1[j] - x2[j] * s1[j];
                    y2[j] = x2[j] * c2[j] + x1[j] * s2[j];
                }
            }
        }
    }
}

void rope_apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& y,
                bool inverse) {
    const int64_t n = x.size(0);
    const int64_t heads = x.size(1);
    const int64_t d = x.size(2);
    const int64_t stride = x.stride(0);
    const float* xp = x.const_data_ptr<float>();
    const float* cp = cos.const_data_ptr<float>();
    const float* sp = sin.const_data_ptr<float>();
    float* yp = y.mutable_data_ptr<float>();
    at::parallel_for(0, n, grain_rows(heads * d), [&](int64_t begin, int64_t end) {
        rope_rows(xp, stride, cp, sp, yp, heads, d, inverse, begin, end);
    });
}

struct Rope : public torch::autograd::Function<Rope> {
    static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& cos,
                              const at::Tensor& sin) {
        TORCH_CHECK(input.dim() == 3 && input.size(2) % 2 == 0, "rotary input of shape ",
                    input.sizes(), " (expected positions × heads × an even head size)");
        TORCH_CHECK(cos.dim() == 2 && cos.size(0) == input.size(0) &&
                        cos.size(1) == input.size(2) && sin.sizes() == cos.sizes(),
                    "rotary tables of shapes ", cos.sizes(), " and ", sin.sizes(), " for input ",
                    input.sizes());
        // Positions may be strided (q and k as slices of one q/k/v product); heads and their
        // dimensions must be dense.
        const int64_t heads = input.size(1);
        const int64_t d = input.size(2);
        const bool dense_rows = input.stride(2) == 1 && (heads == 1 || input.stride(1) == d) &&
                                (input.size(0) <= 1 || input.stride(0) >= heads * d);
        auto x = dense_rows ? input : input.contiguous();
        auto c = cos.contiguous();
        auto s = sin.contiguous();
        auto y = at::empty(input.sizes(), input.options());
        rope_apply(x, c, s, y, false);
        ctx->save_for_backward({c, s});
        return y;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        auto saved = ctx->get_saved_variables();
        auto dy = grads[0].contiguous();
        auto dx = at::empty_like(dy);
        rope_apply(dy, saved[0], saved[1], dx, true);
        return {dx, at::Tensor(), at::Tensor()};
    }
};

// ---- Cross-entropy of a chunk of logits (no autograd: the chunked loss calls it) -------------
// Per row of `logits (n, V)`: the NLL at the row's target, lse − logit[target]; and with `grad`,
// the logits overwritten by the loss's gradient for them, (softmax − one-hot) · w with w the
// row's weight (`row_w`, or `scale` for every row). Three passes over a row: its maximum, the
// exponentials and their sum (kept in place when the gradient is wanted), the scaling.

// Σ a[j], in 16 running sums as in `dot3`.
inline float sum_of(const float* __restrict a, int64_t n) {
    constexpr int64_t L = 16;
    float acc[L] = {};
    int64_t j = 0;
    for (; j + L <= n; j += L) {
        for (int64_t k = 0; k < L; ++k) acc[k] += a[j + k];
    }
    float sum = 0.0f;
    for (int64_t k = 0; k < L; ++k) sum += acc[k];
    for (; j < n; ++j) sum += a[j];
    return sum;
}

// 16 floats as one value (GCC's and Clang's vector extension), for a maximum that the
// vectoriser does not find on its own: one AVX-512 register, two AVX2 ones, four SSE ones.
typedef float f32x16 __attribute__((vector_size(64)));

inline float row_max(const float* __restrict x, int64_t n) {
    f32x16 acc;
    for (int k = 0; k < 16; ++k) acc[k] = -INFINITY;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        f32x16 v;
        std::memcpy(&v, x + j, sizeof v);
        acc = v > acc ? v : acc;
    }
    float m = -INFINITY;
    for (int k = 0; k < 16; ++k) m = acc[k] > m ? acc[k] : m;
    for (; j < n; ++j) m = x[j] > m ? x[j] : m;
    return m;
}

SIPT_VECTOR_CLONES
void xent_rows(float* __restrict logits, int64_t V, const int64_t* __restrict targets,
               const float* __restrict row_w, float scale, bool grad, float* __restrict nll,
               int64_t begin, int64_t end) {
    constexpr int64_t L = 16;
    for (int64_t r = begin; r < end; ++r) {
        float* x = logits + r * V;
        const float m = row_max(x, V);
        const int64_t t = targets[r];
        const float picked = x[t];
        float sum;
        if (grad) {
            // A row (32 KB at a vocabulary of 8192) stays in cache between these passes.
            for (int64_t j = 0; j < V; ++j) x[j] = exp_f32(x[j] - m);
            sum = sum_of(x, V);
        } else {
            float acc[L] = {};
            int64_t j = 0;
            for (; j + L <= V; j += L) {
                for (int64_t k = 0; k < L; ++k) acc[k] += exp_f32(x[j + k] - m);
            }
            sum = 0.0f;
            for (int64_t k = 0; k < L; ++k) sum += acc[k];
            for (; j < V; ++j) sum += exp_f32(x[j] - m);
        }
        nll[r] = m + std::log(sum) - picked;
        if (grad) {
            const float w = row_w == nullptr ? scale : row_w[r];
            const float f = w / sum;
            for (int64_t i = 0; i < V; ++i) x[i] *= f;
            x[t] -= w;
        }
    }
}

// ---- Sampling: the next token of each row from its logits ---------------------------------------
//
// What `sample::pick` runs as five passes over the logits with libtorch (log-softmax, exp, a
// cumulative sum, a sorted search, a gather), in three passes over each row while it is in
// cache: its maximum; Σ e^(x − m) (the log-softmax's normaliser) and the sampling weights
// w = e^((x − m) / T) summed per block of `kPickBlock`; then the token, the first whose
// cumulative weight reaches u · Σ w (inverse-CDF sampling, as the libtorch path), found by
// walking the block sums and then the entries of one block. Greedy rows take the first maximum.
// Cumulative sums are kept in double, as libtorch's CPU cumsum does, and compared in f32.

constexpr int64_t kPickBlock = 256;

// Entries [j, j + n) of a row of f32 or bf16 logits as f32: the row itself, or converted into
// `buf`.
inline const float* block_f32(const void* row, bool bf16, int64_t j, int64_t n, float* buf) {
    if (!bf16) return static_cast<const float*>(row) + j;
    const uint16_t* h = static_cast<const uint16_t*>(row) + j;
    for (int64_t i = 0; i < n; ++i) {
        buf[i] = __builtin_bit_cast(float, static_cast<uint32_t>(h[i]) << 16);
    }
    return buf;
}

inline float entry_f32(const void* row, bool bf16, int64_t j) {
    if (!bf16) return static_cast<const float*>(row)[j];
    return __builtin_bit_cast(float, static_cast<uint32_t>(static_cast<const uint16_t*>(row)[j])
                                         << 16);
}

SIPT_VECTOR_CLONES
void pick_rows(const void* logits, bool bf16, int64_t V, const float* __restrict u, float inv_t,
               bool greedy, int64_t* __restrict token, float* __restrict logp, int64_t begin,
               int64_t end) {
    constexpr int64_t L = 16;
    const int64_t nb = (V + kPickBlock - 1) / kPickBlock;
    std::vector<float> block_sum(nb);
    alignas(64) float buf[kPickBlock];
    const bool tempered = inv_t != 1.0f;  // never when greedy (inv_t 1)
    for (int64_t r = begin; r < end; ++r) {
        const void* row = static_cast<const char*>(logits) + r * V * (bf16 ? 2 : 4);
        float m = -INFINITY;
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t j = b * kPickBlock, n = std::min(kPickBlock, V - j);
            const float bm = row_max(block_f32(row, bf16, j, n, buf), n);
            m = bm > m ? bm : m;
        }
        double norm = 0.0;
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t j = b * kPickBlock, n = std::min(kPickBlock, V - j);
            const float* x = block_f32(row, bf16, j, n, buf);
            float acc[L] = {}, acc_t[L] = {};
            int64_t i = 0;
            for (; i + L <= n; i += L) {
                for (int64_t k = 0; k < L; ++k) acc[k] += exp_f32(x[i + k] - m);
                if (tempered) {
                    for (int64_t k = 0; k < L; ++k) acc_t[k] += exp_f32((x[i + k] - m) * inv_t);
                }
            }
            float s = 0.0f, s_t = 0.0f;
            for (int64_t k = 0; k < L; ++k) {
                s += acc[k];
                s_t += acc_t[k];
            }
            for (; i < n; ++i) {
                s += exp_f32(x[i] - m);
                if (tempered) s_t += exp_f32((x[i] - m) * inv_t);
            }
            norm += s;
            block_sum[b] = tempered ? s_t : s;
        }
        const float lse = m + static_cast<float>(std::log(norm));
        int64_t t = V - 1;
        if (greedy) {
            for (int64_t j = 0; j < V; ++j) {
                if (entry_f32(row, bf16, j) == m) {
                    t = j;
                    break;
                }
            }
        } else {
            double total = 0.0;
            for (int64_t b = 0; b < nb; ++b) total += block_sum[b];
            const float target = u[r] * static_cast<float>(total);
            double cum = 0.0;
            int64_t b = 0;
            for (; b < nb && static_cast<float>(cum + block_sum[b]) < target; ++b) {
                cum += block_sum[b];
            }
            // The block sums and the entries round differently: the scan goes on past the
            // block if it must, and a target that no prefix reaches takes the last token with
            // any weight.
            for (int64_t j = b * kPickBlock; j < V; ++j) {
                const float xj = entry_f32(row, bf16, j);
                if (xj == -INFINITY) continue;
                t = j;
                cum += exp_f32((xj - m) * inv_t);
                if (static_cast<float>(cum) >= target) break;
            }
        }
        token[r] = t;
        logp[r] = entry_f32(row, bf16, t) - lse;
    }
}

// ---- Attention of one new position per row over a shared prefix and the row's own keys -------
//
// A decode step of rollouts that continue shared prefixes: row r continues prefix r / per; its
// query heads kv·G .. (kv+1)·G − 1 read key/value head kv (grouped-query attention). Scores over
// the prefix's Lp positions (those its padding mask keeps) then the row's S own positions, one
// softmax over both, the sliding window's band applied to both. (A decode step without a shared
// prefix passes each row's cache as its prefix: per 1, S 0.) libtorch runs this as about
// fifteen small ops per layer (products, permuted copies, a concatenation, masks, a softmax);
// here each (row, KV head) is one task that reads its keys and values once for all G heads.

struct DecodeView {
    const float* data;
    int64_t s0, s1, s2;  // element strides of the first three dimensions; the last is 1
};

typedef int32_t i32x16 __attribute__((vector_size(64)));
#if defined(__clang__)
#define SIPT_SHUFFLE2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#define SIPT_SHUFFLE1(a, ...) __builtin_shufflevector(a, a, __VA_ARGS__)
#else
#define SIPT_SHUFFLE2(a, b, ...) __builtin_shuffle(a, b, i32x16{__VA_ARGS__})
#define SIPT_SHUFFLE1(a, ...) __builtin_shuffle(a, i32x16{__VA_ARGS__})
#endif

// out[l] = the sum of the 16 lanes of a[l], for 16 vectors at once: four rounds of pairwise
// shuffles and adds (15 adds in all) where 16 separate horizontal sums take 16 × 15 scalar adds.
// After the rounds lane 2m holds vector perm(m) and lane 2m + 1 vector 8 + perm(m), with perm
// the 3-bit reversal (its own inverse); the last shuffle puts them in order.
inline f32x16 lane_sums16(const f32x16* a) {
    f32x16 b[8], c[4], d[2];
    for (int i = 0; i < 8; ++i) {
        b[i] = SIPT_SHUFFLE2(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20,
                             21, 22, 23) +
               SIPT_SHUFFLE2(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26,
                             27, 28, 29, 30, 31);
    }
    for (int i = 0; i < 4; ++i) {
        c[i] = SIPT_SHUFFLE2(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24,
                             25, 26, 27) +
               SIPT_SHUFFLE2(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15,
                             28, 29, 30, 31);
    }
    for (int i = 0; i < 2; ++i) {
        d[i] = SIPT_SHUFFLE2(c[2 * i], c[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12,
                             13, 28, 29) +
               SIPT_SHUFFLE2(c[2 * i], c[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27,
                             14, 15, 30, 31);
    }
    const f32x16 e = SIPT_SHUFFLE2(d[0], d[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28,
                                   14, 30) +
                     SIPT_SHUFFLE2(d[0], d[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29,
                                   15, 31);
    return SIPT_SHUFFLE1(e, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}

// Scores of queries `qs[0..nq)` (each D floats) against keys `keys[0..m)` (rows of D floats),
// times `scale`, into `out[i][off + j]`: 16 keys at a time, one running vector per key over the
// head's dimension, their lanes summed together (`lane_sums16`); the rest by `dot3`.
inline __attribute__((always_inline)) void scores_of_rows(const float* const* qs, int64_t nq,
                                                          const float* const* keys, int64_t m,
                                                          int64_t D, float scale,
                                                          float* const* out, int64_t off) {
    int64_t j0 = 0;
    for (; D % 16 == 0 && j0 + 16 <= m; j0 += 16) {
        for (int64_t i = 0; i < nq; ++i) {
            f32x16 a[16] = {};
            for (int64_t c = 0; c < D; c += 16) {
                f32x16 qc;
                std::memcpy(&qc, qs[i] + c, sizeof qc);
                for (int l = 0; l < 16; ++l) {
                    f32x16 kc;
                    std::memcpy(&kc, keys[j0 + l] + c, sizeof kc);
                    a[l] += qc * kc;
                }
            }
            const f32x16 dots = lane_sums16(a) * scale;
            std::memcpy(out[i] + off + j0, &dots, sizeof dots);
        }
    }
    for (int64_t i = 0; i < nq; ++i) {
        for (int64_t j = j0; j < m; ++j) out[i][off + j] = dot3(qs[i], keys[j], nullptr, D) * scale;
    }
}

// The scores of NQ queries against 16·KB keys `j ..` of transposed keys `kt` (D rows `ld`
// apart): a broadcast entry of each query times a vector of keys, no sums across lanes, and
// each vector of keys loaded once for all NQ queries.
template <int NQ, int KB>
inline __attribute__((always_inline)) void scores_transposed_block(const float* const* qs,
                                                                   const float* kt, int64_t ld,
                                                                   int64_t D, float scale,
                                                                   float* const* out, int64_t j) {
    f32x16 a[NQ][KB] = {};
    const float* k = kt + j;
    for (int64_t d = 0; d < D; ++d, k += ld) {
        f32x16 kv[KB];
        for (int b = 0; b < KB; ++b) std::memcpy(&kv[b], k + 16 * b, sizeof kv[b]);
        for (int i = 0; i < NQ; ++i) {
            const float x = qs[i][d];
            for (int b = 0; b < KB; ++b) a[i][b] += x * kv[b];
        }
    }
    for (int i = 0; i < NQ; ++i) {
        for (int b = 0; b < KB; ++b) {
            const f32x16 s = a[i][b] * scale;
            std::memcpy(out[i] + j + 16 * b, &s, sizeof s);
        }
    }
}

// Queries per register block of the kernels below: 6 × 4 running vectors and 4 loaded ones
// fit AVX-512's 32 registers.
constexpr int64_t kQueryBlock = 6;

// Calls `f` with the query block's size as a compile-time constant, 1..kQueryBlock.
template <typename F>
inline __attribute__((always_inline)) void with_query_block(int64_t n, F f) {
    switch (n) {
        case 1: f(std::integral_constant<int, 1>()); break;
        case 2: f(std::integral_constant<int, 2>()); break;
        case 3: f(std::integral_constant<int, 3>()); break;
        case 4: f(std::integral_constant<int, 4>()); break;
        case 5: f(std::integral_constant<int, 5>()); break;
        default: f(std::integral_constant<int, 6>()); break;
    }
}

// Scores of queries `qs[0..nq)` against the `m` keys of `kt`, transposed (D rows `ld` apart,
// zero past m up to a multiple of 16 that `ld` holds), into `out[i][0 .. m rounded up to 16)`.
inline __attribute__((always_inline)) void scores_transposed(const float* const* qs, int64_t nq,
                                                             const float* kt, int64_t ld,
                                                             int64_t m, int64_t D, float scale,
                                                             float* const* out) {
    for (int64_t j = 0; j < m; j += 32) {
        for (int64_t i = 0; i < nq; i += kQueryBlock) {
            const int64_t nb = std::min(kQueryBlock, nq - i);
            with_query_block(nb, [&](auto n) __attribute__((always_inline)) {
                if (j + 16 < m) {
                    scores_transposed_block<decltype(n)::value, 2>(qs + i, kt, ld, D, scale,
                                                                   out + i, j);
                } else {
                    scores_transposed_block<decltype(n)::value, 1>(qs + i, kt, ld, D, scale,
                                                                   out + i, j);
                }
            });
        }
    }
}

// acc[i][c .. c + 16·NV) += Σ_j w[i][off + j] · vals[j][c ..] over keys j0..j1, NQ queries at
// once: each vector of values loaded once for all of them.
template <int NQ, int NV>
inline __attribute__((always_inline)) void values_block(const float* const* w, int64_t off,
                                                        const float* const* vals, int64_t j0,
                                                        int64_t j1, int64_t c,
                                                        float* const* acc) {
    f32x16 a[NQ][NV];
    for (int i = 0; i < NQ; ++i) {
        for (int b = 0; b < NV; ++b) std::memcpy(&a[i][b], acc[i] + c + 16 * b, sizeof a[i][b]);
    }
    for (int64_t j = j0; j < j1; ++j) {
        f32x16 v[NV];
        for (int b = 0; b < NV; ++b) std::memcpy(&v[b], vals[j] + c + 16 * b, sizeof v[b]);
        for (int i = 0; i < NQ; ++i) {
            const float x = w[i][off + j];
            for (int b = 0; b < NV; ++b) a[i][b] += x * v[b];
        }
    }
    for (int i = 0; i < NQ; ++i) {
        for (int b = 0; b < NV; ++b) std::memcpy(acc[i] + c + 16 * b, &a[i][b], sizeof a[i][b]);
    }
}

// acc[i][0..D) += Σ_j w[i][off + j] · vals[j] over the `m` values: 64 keys at a time (they stay
// in L1 for every block of queries), 64 columns at a time, then 16, then one.
inline __attribute__((always_inline)) void values_of_rows(const float* const* w, int64_t off,
                                                          int64_t nq, const float* const* vals,
                                                          int64_t m, int64_t D,
                                                          float* const* acc) {
    for (int64_t j0 = 0; j0 < m; j0 += 64) {
        const int64_t j1 = std::min(m, j0 + 64);
        for (int64_t i = 0; i < nq; i += kQueryBlock) {
            const int64_t nb = std::min(kQueryBlock, nq - i);
            with_query_block(nb, [&](auto n) __attribute__((always_inline)) {
                constexpr int NQ = decltype(n)::value;
                int64_t c = 0;
                for (; c + 64 <= D; c += 64) {
                    values_block<NQ, 4>(w + i, off, vals, j0, j1, c, acc + i);
                }
                for (; c + 16 <= D; c += 16) {
                    values_block<NQ, 1>(w + i, off, vals, j0, j1, c, acc + i);
                }
                for (int q = 0; c < D && q < NQ; ++q) {
                    for (int64_t j = j0; j < j1; ++j) {
                        const float x = w[i + q][off + j];
                        for (int64_t d = c; d < D; ++d) acc[i + q][d] += x * vals[j][d];
                    }
                }
            });
        }
    }
}

// Softmax of scores `s[0..n)` over the keys that are `live`, zero elsewhere. A row that sees
// no key at all (never the case in a decode step, whose own position is always live) gets
// zeros rather than NaN.
inline __attribute__((always_inline)) void softmax_live(float* __restrict s,
                                                        const char* __restrict live, int64_t n) {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) s[j] = live[j] ? s[j] : neg_inf;
    const float m = row_max(s, n);
    for (int64_t j = 0; j < n; ++j) s[j] = exp_f32(s[j] - m);
    const float inv = m == neg_inf ? 0.0f : 1.0f / sum_of(s, n);
    for (int64_t j = 0; j < n; ++j) s[j] = live[j] ? s[j] * inv : 0.0f;
}

// A task's scratch space for up to `nq` queries over `n` keys: their scores (`ws[i]`, n each)
// and outputs (`accs[i]`, D each), the queries themselves (`qs`), and which keys are live.
struct AttentionScratch {
    std::vector<float> scores, acc;
    std::vector<const float*> qs;
    std::vector<float*> ws, accs;
    std::vector<char> live;

    AttentionScratch(int64_t nq, int64_t n, int64_t D)
        : scores(static_cast<size_t>(nq * n)),
          acc(static_cast<size_t>(nq * D)),
          qs(static_cast<size_t>(nq)),
          ws(static_cast<size_t>(nq)),
          accs(static_cast<size_t>(nq)),
          live(static_cast<size_t>(n)) {
        for (int64_t i = 0; i < nq; ++i) {
            ws[i] = scores.data() + i * n;
            accs[i] = acc.data() + i * D;
        }
    }
};

// Tasks (row, KV head): the row's keys, prefix then own, read once for the G heads of the group.
SIPT_VECTOR_CLONES
void decode_attention_tasks(const float* __restrict q, DecodeView pk, DecodeView pv,
                            const bool* pmask, DecodeView ok, DecodeView ov, const bool* band,
                            float* __restrict out, int64_t KV, int64_t G, int64_t D, int64_t Lp,
                            int64_t S, int64_t per, float scale, int64_t begin, int64_t end) {
    const int64_t n = Lp + S;
    AttentionScratch x(G, n, D);
    std::vector<const float*> keys(static_cast<size_t>(n)), values(static_cast<size_t>(n));
    for (int64_t task = begin; task < end; ++task) {
        const int64_t r = task / KV;
        const int64_t kv = task % KV;
        const int64_t p = r / per;
        for (int64_t g = 0; g < G; ++g) x.qs[g] = q + (task * G + g) * D;
        for (int64_t j = 0; j < n; ++j) {
            const bool prefix = j < Lp;
            x.live[j] = (band == nullptr || band[j]) &&
                        (!prefix || pmask == nullptr || pmask[p * Lp + j]);
            keys[j] = prefix ? pk.data + p * pk.s0 + kv * pk.s1 + j * pk.s2
                             : ok.data + r * ok.s0 + kv * ok.s1 + (j - Lp) * ok.s2;
            values[j] = prefix ? pv.data + p * pv.s0 + kv * pv.s1 + j * pv.s2
                               : ov.data + r * ov.s0 + kv * ov.s1 + (j - Lp) * ov.s2;
        }
        scores_of_rows(x.qs.data(), G, keys.data(), n, D, scale, x.ws.data(), 0);
        for (int64_t g = 0; g < G; ++g) softmax_live(x.ws[g], x.live.data(), n);
        std::fill(x.acc.begin(), x.acc.end(), 0.0f);
        values_of_rows(x.ws.data(), 0, G, values.data(), n, D, x.accs.data());
        std::memcpy(out + task * G * D, x.acc.data(), static_cast<size_t>(G * D) * sizeof(float));
    }
}

// Tasks (prefix, KV head, block of the prefix's rows) given the prefix's keys transposed
// (`kt (P, KV, D, Lt)`, Lt ≥ Lp a multiple of 16, zero past Lp): the scores of every head of
// the group in every row of the block against the prefix come from one pass over its keys with
// no sums across lanes, and its values are read once for all of them; each row's own keys and
// values as in `decode_attention_tasks`. A query's scores are `Lt + S` long: the prefix's
// padding (never live), then its own keys.
SIPT_VECTOR_CLONES
void decode_attention_shared_tasks(const float* __restrict q, DecodeView kt, int64_t Lt,
                                   DecodeView pv, const bool* pmask, DecodeView ok,
                                   DecodeView ov, const bool* band, float* __restrict out,
                                   int64_t KV, int64_t G, int64_t D, int64_t Lp, int64_t S,
                                   int64_t per, int64_t rows, float scale, int64_t begin,
                                   int64_t end) {
    const int64_t n = Lt + S;
    const int64_t blocks = (per + rows - 1) / rows;
    AttentionScratch x(rows * G, n, D);
    std::vector<const float*> own_keys(static_cast<size_t>(S)), own_values(static_cast<size_t>(S));
    std::vector<const float*> prefix_values(static_cast<size_t>(Lp));
    for (int64_t task = begin; task < end; ++task) {
        const int64_t p = task / (KV * blocks);
        const int64_t kv = task / blocks % KV;
        const int64_t r0 = p * per + task % blocks * rows;
        const int64_t nr = std::min(rows, (p + 1) * per - r0);
        const int64_t nq = nr * G;
        for (int64_t j = 0; j < n; ++j) {
            const bool prefix = j < Lt;
            const int64_t key = prefix ? j : Lp + j - Lt;  // the key's index in `band`
            x.live[j] = (!prefix || j < Lp) && (band == nullptr || band[key]) &&
                        (!prefix || pmask == nullptr || pmask[p * Lp + j]);
        }
        for (int64_t j = 0; j < Lp; ++j) {
            prefix_values[j] = pv.data + p * pv.s0 + kv * pv.s1 + j * pv.s2;
        }
        for (int64_t i = 0; i < nq; ++i) {
            // Row r0 + i / G, head kv·G + i % G of the (R, KV·G, 1, D) queries.
            x.qs[i] = q + (((r0 + i / G) * KV + kv) * G + i % G) * D;
        }
        scores_transposed(x.qs.data(), nq, kt.data + p * kt.s0 + kv * kt.s1, kt.s2, Lp, D,
                          scale, x.ws.data());
        for (int64_t r = 0; r < nr; ++r) {
            for (int64_t j = 0; j < S; ++j) {
                own_keys[j] = ok.data + (r0 + r) * ok.s0 + kv * ok.s1 + j * ok.s2;
            }
            scores_of_rows(x.qs.data() + r * G, G, own_keys.data(), S, D, scale,
                           x.ws.data() + r * G, Lt);
        }
        for (int64_t i = 0; i < nq; ++i) softmax_live(x.ws[i], x.live.data(), n);
        std::fill(x.acc.begin(), x.acc.begin() + nq * D, 0.0f);
        values_of_rows(x.ws.data(), 0, nq, prefix_values.data(), Lp, D, x.accs.data());
        for (int64_t r = 0; r < nr; ++r) {
            for (int64_t j = 0; j < S; ++j) {
                own_values[j] = ov.data + (r0 + r) * ov.s0 + kv * ov.s1 + j * ov.s2;
            }
            values_of_rows(x.ws.data() + r * G, Lt, G, own_values.data(), S, D,
                           x.accs.data() + r * G);
        }
        for (int64_t i = 0; i < nq; ++i) {
            std::memcpy(out + (((r0 + i / G) * KV + kv) * G + i % G) * D, x.accs[i],
                        static_cast<size_t>(D) * sizeof(float));
        }
    }
}

DecodeView decode_view(const at::Tensor& t) {
    return DecodeView{t.const_data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)};
}

bool is_cpu_f32(const at::Tensor& t) { return t.device().is_cpu() && t.scalar_type() == at::kFloat; }

template <typename F>
at::Tensor* guarded(char* err, size_t len, F f) {
    try {
        return new at::Tensor(f());
    } catch (const std::exception& e) {
        set_error(err, len, e.what());
        return nullptr;
    }
}

}  // namespace

extern "C" {

// RMSNorm of `input (..., d)` by `weight (d,)`: a new tensor, or null with `err`.
at::Tensor* sipt_fused_rms_norm(const at::Tensor* input, const at::Tensor* weight, double eps,
                                char* err, size_t err_len) {
    return guarded(err, err_len, [&] {
        TORCH_CHECK(is_cpu_f32(*input) && is_cpu_f32(*weight), "fused RMSNorm takes f32 on a CPU");
        return RmsNorm::apply(*input, *weight, eps);
    });
}

// Without gradients: `x ← x + residual` in place (when `residual` is not null), then the RMSNorm
// of x by `weight (d,)`, f32 or bf16 (all three of one type): a new tensor, or null with `err`.
at::Tensor* sipt_fused_add_rms_norm(at::Tensor* x, const at::Tensor* residual,
                                    const at::Tensor* weight, double eps, char* err,
                                    size_t err_len) {
    return guarded(err, err_len, [&] { return add_rms_norm_infer(*x, residual, *weight, eps); });
}

// Whether gradients are on (libtorch's grad mode), which decides where the inference kernels
// may run.
int sipt_fused_grad_enabled() { return at::GradMode::is_enabled() ? 1 : 0; }

// silu(gate) · up, both `(..., n)`.
at::Tensor* sipt_fused_swiglu(const at::Tensor* gate, const at::Tensor* up, char* err,
                              size_t err_len) {
    return guarded(err, err_len, [&] {
        // bf16 only without gradients; f32 without them too takes the inference kernel (the
        // same arithmetic as the autograd node's forward, without saving its inputs).
        const bool f32 = is_cpu_f32(*gate) && is_cpu_f32(*up);
        if (no_gradient({gate, up}) && is_cpu_act(*gate) &&
            gate->scalar_type() == up->scalar_type()) {
            return swiglu_infer(*gate, *up);
        }
        TORCH_CHECK(f32, "fused SwiGLU takes f32 on a CPU (or bf16 without gradients)");
        return SwiGlu::apply(*gate, *up);
    });
}

// Without gradients: q, k and v of a cached step from `qkv (B, T, (H + 2·KV)·D)` (f32 or bf16,
// paired layout), `turn` the positions' rotations (complex f32, B · T · D/2 of them): rotated
// keys and the values written into `cache_k`, `cache_v (B, KV, capacity, D)` (f32) at positions
// `start ..`; returns the rotated queries `(B, T, H, D)` in f32, or null with `err`.
at::Tensor* sipt_fused_qkv_pairs_into_cache(const at::Tensor* qkv, const at::Tensor* turn,
                                            at::Tensor* cache_k, at::Tensor* cache_v,
                                            int64_t start, int64_t heads, int64_t kv_heads,
                                            char* err, size_t err_len) {
    return guarded(err, err_len, [&] {
        return qkv_pairs_into_cache(*qkv, *turn, *cache_k, *cache_v, start, heads, kv_heads);
    });
}

// Rotate-half rotary embeddings of `input (N, H, D)` by `cos`, `sin (N, D)`.
at::Tensor* sipt_fused_rope(const at::Tensor* input, const at::Tensor* cos, const at::Tensor* sin,
                            char* err, size_t err_len) {
    return guarded(err, err_len, [&] {
        TORCH_CHECK(is_cpu_f32(*input) && is_cpu_f32(*cos) && is_cpu_f32(*sin),
                    "fused rotary embeddings take f32 on a CPU");
        return Rope::apply(*input, *cos, *sin);
    });
}

// The NLL `(n,)` of each row of `logits (n, V)` (f32, contiguous, on a CPU) at `targets (n,)`
// (int64); with `grad` nonzero, `logits` is overwritten by the gradient of Σ w · NLL, w from
// `row_weights (n,)` (f32) when given, else `scale` for every row.
at::Tensor* sipt_fused_xent_chunk(const at::Tensor* logits, const at::Tensor* targets,
                                  const at::Tensor* row_weights, double scale, int grad,
                                  char* err, size_t err_len) {
    return guarded(err, err_len, [&] {
        const auto& x = *logits;
        TORCH_CHECK(is_cpu_f32(x) && x.dim() == 2 && x.is_contiguous(),
                    "fused cross-entropy takes contiguous f32 logits (rows, vocabulary) on a CPU");
        const int64_t n = x.size(0);
        const int64_t V = x.size(1);
        auto t = targets->to(at::kLong).contiguous().view({-1});
        TORCH_CHECK(t.size(0) == n, "fused cross-entropy: ", t.size(0), " targets for ", n,
                    " rows");
        if (n > 0) {
            const int64_t lo = t.min().item<int64_t>();
            const int64_t hi = t.max().item<int64_t>();
            TORCH_CHECK(lo >= 0 && hi < V, "fused cross-entropy: targets in ", lo, "..", hi,
                        " for a vocabulary of ", V);
        }
        at::Tensor w;
        if (row_weights != nullptr) {
            w = row_weights->to(at::kFloat).contiguous().view({-1});
            TORCH_CHECK(w.size(0) == n, "fused cross-entropy: ", w.size(0), " row weights for ",
                        n, " rows");
        }
        auto nll = at::empty({n}, x.options());
        float* xp = x.mutable_data_ptr<float>();
        const int64_t* tp = t.const_data_ptr<int64_t>();
        const float* wp = w.defined() ? w.const_data_ptr<float>() : nullptr;
        float* np = nll.mutable_data_ptr<float>();
        const float sc = static_cast<float>(scale);
        const bool g = grad != 0;
        at::parallel_for(0, n, grain_rows(V), [&](int64_t begin, int64_t end) {
            xent_rows(xp, V, tp, wp, sc, g, np, begin, end);
        });
        return nll;
    });
}

// Attention of one new position per row (`q (R, H, 1, D)`) over shared prefixes
// (`prefix_k`, `prefix_v (P, KV, Lp, D)`, rows p·per .. (p+1)·per − 1 continue prefix p;
// `prefix_mask (P, 1, 1, Lp)` bool, true at real positions, or null) followed by each row's own
// positions (`own_k`, `own_v (R, KV, S, D)`, e.g. views of a cache); `band (1, Lp + S)` bool, the
// keys a sliding window still sees, or null. `prefix_kt (P, KV, D, Lt)`, or null: the prefix's
// keys transposed, Lt ≥ Lp a multiple of 16 and zero past Lp, with which a task reads them once
// for a block of the prefix's rows. All f32 on a CPU, last dimensions contiguous. Returns
// `(R, H, 1, D)`.
at::Tensor* sipt_fused_decode_attention(const at::Tensor* q, const at::Tensor* prefix_k,
                                        const at::Tensor* prefix_v,
                                        const at::Tensor* prefix_mask, const at::Tensor* own_k,
                                        const at::Tensor* own_v, const at::Tensor* band,
                                        const at::Tensor* prefix_kt, int64_t per, char* err,
                                        size_t err_len) {
    return guarded(err, err_len, [&] {
        for (const at::Tensor* t : {q, prefix_k, prefix_v, own_k, own_v}) {
            TORCH_CHECK(is_cpu_f32(*t) && t->dim() == 4,
                        "fused decode attention takes 4-d f32 tensors on a CPU, not ",
                        t->scalar_type(), " of shape ", t->sizes());
        }
        const int64_t R = q->size(0), H = q->size(1), D = q->size(3);
        const int64_t P = prefix_k->size(0), KV = prefix_k->size(1), Lp = prefix_k->size(2);
        const int64_t S = own_k->size(2);
        TORCH_CHECK(q->size(2) == 1, "fused decode attention takes one query position, not ",
                    q->size(2));
        TORCH_CHECK(KV > 0 && H % KV == 0 && per > 0 && P * per == R,
                    "fused decode attention: ", H, " heads over ", KV, " key/value heads, ", R,
                    " rows for ", P, " prefixes of ", per);
        TORCH_CHECK(prefix_v->sizes() == prefix_k->sizes(), "prefix values of shape ",
                    prefix_v->sizes(), " for keys of ", prefix_k->sizes());
        TORCH_CHECK(own_k->sizes() == at::IntArrayRef({R, KV, S, D}) &&
                        own_v->sizes() == own_k->sizes() && prefix_k->size(3) == D,
                    "fused decode attention: own keys ", own_k->sizes(), ", values ",
                    own_v->sizes(), ", prefix ", prefix_k->sizes(), " for queries ", q->sizes());
        auto last_dense = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
        auto qc = q->contiguous();
        auto pk = last_dense(*prefix_k), pv = last_dense(*prefix_v);
        auto ok = last_dense(*own_k), ov = last_dense(*own_v);
        at::Tensor pm, bd;
        if (prefix_mask != nullptr) {
            TORCH_CHECK(prefix_mask->scalar_type() == at::kBool && prefix_mask->numel() == P * Lp,
                        "prefix mask of ", prefix_mask->scalar_type(), " and shape ",
                        prefix_mask->sizes(), " for ", P, " prefixes of ", Lp,
                        " (expected bool, true where seen)");
            pm = prefix_mask->contiguous();
        }
        if (band != nullptr) {
            TORCH_CHECK(band->scalar_type() == at::kBool && band->numel() == Lp + S,
                        "window band of ", band->scalar_type(), " and shape ", band->sizes(),
                        " for ", Lp + S, " keys (expected bool, true where seen)");
            bd = band->contiguous();
        }
        auto out = at::empty({R, H, 1, D}, qc.options());
        const float* qp = qc.const_data_ptr<float>();
        float* op = out.mutable_data_ptr<float>();
        const bool* pmp = pm.defined() ? pm.const_data_ptr<bool>() : nullptr;
        const bool* bp = bd.defined() ? bd.const_data_ptr<bool>() : nullptr;
        const float scale = 1.0f / std::sqrt(static_cast<float>(D));
        const DecodeView vpk = decode_view(pk), vpv = decode_view(pv);
        const DecodeView vok = decode_view(ok), vov = decode_view(ov);
        if (prefix_kt != nullptr) {
            const at::Tensor& kt = *prefix_kt;
            TORCH_CHECK(is_cpu_f32(kt) && kt.dim() == 4 && kt.size(0) == P && kt.size(1) == KV &&
                            kt.size(2) == D && kt.size(3) >= Lp && kt.size(3) % 16 == 0 &&
                            kt.stride(3) == 1,
                        "fused decode attention: transposed prefix keys of ", kt.scalar_type(),
                        " and shape ", kt.sizes(), " strides ", kt.strides(), " for keys of ",
                        prefix_k->sizes(), " (expected f32 (P, KV, D, a multiple of 16 >= Lp), ",
                        "last dimension contiguous)");
            // Blocks of at most four rows: with three heads a group, 12 queries share each
            // loaded key, and a prefix of 16 rows still makes four tasks a KV head.
            const int64_t blocks = (per + 3) / 4;
            const int64_t rows = (per + blocks - 1) / blocks;
            const DecodeView vkt = decode_view(kt);
            at::parallel_for(0, P * KV * blocks, 1, [&](int64_t begin, int64_t end) {
                decode_attention_shared_tasks(qp, vkt, kt.size(3), vpv, pmp, vok, vov, bp, op, KV,
                                              H / KV, D, Lp, S, per, rows, scale, begin, end);
            });
            return out;
        }
        at::parallel_for(0, R * KV, 1, [&](int64_t begin, int64_t end) {
            decode_attention_tasks(qp, vpk, vpv, pmp, vok, vov, bp, op, KV, H / KV, D, Lp, S, per,
                                   scale, begin, end);
        });
        return out;
    });
}

// The next token of each row of `logits (N, V)` (f32 or bf16, contiguous, on a CPU): written
// into `tokens (N,)` (int64, contiguous); returns each token's log-probability `(N,)` (f32,
// temperature 1). `temperature` ≤ 0 is greedy; else `draws (N,)` (f32 in [0, 1)) are the rows'
// uniform draws for inverse-CDF sampling at that temperature.
at::Tensor* sipt_fused_sample_pick(const at::Tensor* logits, const at::Tensor* draws,
                                   double temperature, at::Tensor* tokens, char* err,
                                   size_t err_len) {
    return guarded(err, err_len, [&] {
        const auto& x = *logits;
        const bool bf16 = x.scalar_type() == at::kBFloat16;
        TORCH_CHECK(x.device().is_cpu() && (bf16 || x.scalar_type() == at::kFloat) &&
                        x.dim() == 2 && x.is_contiguous() && x.size(1) > 0,
                    "fused sampling takes contiguous f32 or bf16 logits (rows, vocabulary) on a "
                    "CPU, not ", x.scalar_type(), " of shape ", x.sizes());
        const int64_t n = x.size(0), V = x.size(1);
        TORCH_CHECK(tokens->device().is_cpu() && tokens->scalar_type() == at::kLong &&
                        tokens->is_contiguous() && tokens->numel() == n,
                    "fused sampling writes ", n, " int64 tokens, not into ",
                    tokens->scalar_type(), " of shape ", tokens->sizes());
        const bool greedy = temperature <= 0.0;
        at::Tensor u;
        if (!greedy) {
            TORCH_CHECK(draws != nullptr && draws->numel() == n, "fused sampling takes ", n,
                        " draws");
            u = draws->to(at::kFloat).contiguous();
        }
        auto logp = at::empty({n}, x.options().dtype(at::kFloat));
        const void* xp = x.const_data_ptr();
        const float* up = greedy ? nullptr : u.const_data_ptr<float>();
        int64_t* tp = tokens->mutable_data_ptr<int64_t>();
        float* lp = logp.mutable_data_ptr<float>();
        const float inv_t = greedy ? 1.0f : static_cast<float>(1.0 / temperature);
        at::parallel_for(0, n, grain_rows(V), [&](int64_t begin, int64_t end) {
            pick_rows(xp, bf16, V, up, inv_t, greedy, tp, lp, begin, end);
        });
        return logp;
    });
}

// How many threads `at::parallel_for` spreads `tasks` tasks over (one per chunk it hands out):
// the check that the shims are compiled with OpenMP, without which every loop below would run
// on the calling thread alone.
int64_t sipt_fused_parallel_threads(int64_t tasks) {
    std::atomic<int64_t> chunks{0};
    at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) { chunks.fetch_add(1); });
    return chunks.load();
}

}  // extern "C"
