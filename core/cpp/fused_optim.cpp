// libtorch's multi-tensor optimizer kernels: the fused AdamW step (`at::_fused_adamw_`, one pass
// over each parameter, its gradient and both moments) and the global gradient norm
// (`at::_foreach_norm`) with the clipping scale (`at::_foreach_mul_`). tch binds neither, so
// sipt calls them here. Tensors cross the boundary as the `at::Tensor*` handles tch uses; errors
// come back as text, never as C++ exceptions.

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cstring>
#include <exception>
#include <vector>

namespace {

void set_error(char* err, size_t len, const char* message) {
    if (err == nullptr || len == 0) return;
    std::strncpy(err, message, len - 1);
    err[len - 1] = '\0';
}

std::vector<at::Tensor> list(const at::Tensor* const* tensors, size_t n) {
    std::vector<at::Tensor> out;
    out.reserve(n);
    for (size_t i = 0; i < n; ++i) out.push_back(*tensors[i]);
    return out;
}

}  // namespace

extern "C" {

// One AdamW step, in place, over `n` parameters with their gradients, first and second moments
// and step counts (f32 scalar tensors, already counting this step). Returns 0, or 1 with `err`.
int sipt_fused_adamw(const at::Tensor* const* params, const at::Tensor* const* grads,
                     const at::Tensor* const* exp_avgs, const at::Tensor* const* exp_avg_sqs,
                     const at::Tensor* const* steps, size_t n, double lr, double beta1,
                     double beta2, double weight_decay, double eps, char* err, size_t err_len) {
    try {
        c10::NoGradGuard no_grad;
        auto p = list(params, n);
        auto g = list(grads, n);
        auto m = list(exp_avgs, n);
        auto v = list(exp_avg_sqs, n);
        auto s = list(steps, n);
        std::vector<at::Tensor> none;
        at::_fused_adamw_(p, g, m, v, none, s, lr, beta1, beta2, weight_decay, eps,
                          /*amsgrad=*/false, /*maximize=*/false);
        return 0;
    } catch (const std::exception& e) {
        set_error(err, err_len, e.what());
        return 1;
    }
}

// The global L2 norm of `n` gradients (in f32); when `max_norm` > 0 and the norm exceeds it,
// every gradient is scaled by `max_norm / (norm + 1e-6)` in place. The norm before clipping goes
// to `*norm`. Returns 0, or 1 with `err`.
int sipt_clip_grad_norm(const at::Tensor* const* grads, size_t n, double max_norm, double* norm,
                        char* err, size_t err_len) {
    try {
        c10::NoGradGuard no_grad;
        auto g = list(grads, n);
        auto norms = at::_foreach_norm(g, 2, at::kFloat);
        double total = at::linalg_vector_norm(at::stack(norms), 2).item<double>();
        *norm = total;
        if (max_norm > 0 && total > max_norm) {
            at::_foreach_mul_(g, at::Scalar(max_norm / (total + 1e-6)));
        }
        return 0;
    } catch (const std::exception& e) {
        set_error(err, err_len, e.what());
        return 1;
    }
}

}  // extern "C"
