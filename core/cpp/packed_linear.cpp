// Linear layers over weights repacked once into oneDNN's blocked layout, for decoding on a CPU.
//
// libtorch registers these kernels under the `mkldnn` operator namespace, which the tch bindings
// do not cover, so sipt reaches them through the dispatcher. Tensors cross the boundary as the
// same `at::Tensor*` handles tch uses; errors come back as text, never as C++ exceptions.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <cstring>
#include <exception>
#include <string>

namespace {

void set_error(char* err, size_t len, const char* message) {
    if (err == nullptr || len == 0) return;
    std::strncpy(err, message, len - 1);
    err[len - 1] = '\0';
}

const c10::OperatorHandle& reorder_op() {
    static const c10::OperatorHandle op =
        c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_reorder_linear_weight", "");
    return op;
}

const c10::OperatorHandle& linear_op() {
    static const c10::OperatorHandle op =
        c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    return op;
}

}  // namespace

extern "C" {

// `weight (out, in)` in oneDNN's blocked layout for about `batch` rows of input; null on error.
at::Tensor* sipt_reorder_linear_weight(const at::Tensor* weight, int64_t batch, char* err,
                                       size_t err_len) {
    try {
        if (!at::hasMKLDNN()) {
            set_error(err, err_len, "this libtorch was built without oneDNN (MKLDNN)");
            return nullptr;
        }
        torch::jit::Stack stack;
        stack.emplace_back(*weight);
        stack.emplace_back(batch);
        reorder_op().callBoxed(&stack);
        return new at::Tensor(stack.at(0).toTensor());
    } catch (const std::exception& e) {
        set_error(err, err_len, e.what());
        return nullptr;
    }
}

// `input (..., in)` times a weight from `sipt_reorder_linear_weight`, transposed: `(..., out)`.
at::Tensor* sipt_linear_packed(const at::Tensor* input, const at::Tensor* packed, char* err,
                               size_t err_len) {
    try {
        torch::jit::Stack stack;
        stack.reserve(6);
        stack.emplace_back(*input);
        stack.emplace_back(*packed);
        stack.emplace_back(c10::IValue());
        stack.emplace_back(std::string("none"));
        stack.emplace_back(c10::List<std::optional<at::Scalar>>());
        stack.emplace_back(c10::IValue());
        linear_op().callBoxed(&stack);
        return new at::Tensor(stack.at(0).toTensor());
    } catch (const std::exception& e) {
        set_error(err, err_len, e.what());
        return nullptr;
    }
}

}  // extern "C"
