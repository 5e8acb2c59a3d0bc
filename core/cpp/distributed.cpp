// Process groups of PyTorch's own distributed engine (c10d), for data-parallel training.
//
// The tch bindings cover none of c10d, so sipt reaches it here: a TCPStore for the rendezvous
// and a ProcessGroupGloo (CPU tensors) or ProcessGroupNCCL (CUDA tensors) over it, with the
// few collectives the training loops need. Every wait has the group's deadline. Tensors cross
// the boundary as the same `at::Tensor*` handles tch uses; errors come back as text, never as
// C++ exceptions.
//
// Gloo's headers are not in the PyTorch wheel (its library is, inside libtorch_cpu); the build
// finds them in Debian's libgloo-dev and defines SIPT_GLOO. Without them the functions exist
// and say what is missing.

#include <ATen/ATen.h>

#include <chrono>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#ifdef SIPT_GLOO
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#endif
#ifdef SIPT_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace {

void set_error(char* err, size_t len, const std::string& message) {
    if (err == nullptr || len == 0) return;
    std::strncpy(err, message.c_str(), len - 1);
    err[len - 1] = '\0';
}

}  // namespace

#ifdef SIPT_GLOO

struct SiptGroup {
    c10::intrusive_ptr<c10d::Store> store;
    c10::intrusive_ptr<c10d::Backend> backend;
    std::chrono::milliseconds timeout;
};

namespace {

// Run `f`, turning any C++ exception into an error message; 0 on success, -1 on failure.
template <typename F>
int guarded(char* err, size_t len, F&& f) {
    try {
        f();
        return 0;
    } catch (const std::exception& e) {
        set_error(err, len, e.what());
    } catch (...) {
        set_error(err, len, "unknown C++ exception");
    }
    return -1;
}

void wait(SiptGroup* g, const c10::intrusive_ptr<c10d::Work>& work) {
    if (!work->wait(g->timeout)) {
        throw std::runtime_error("collective did not complete within the deadline");
    }
}

}  // namespace

extern "C" {

int sipt_dist_available() { return 1; }

#ifdef SIPT_NCCL
int sipt_dist_has_nccl() { return 1; }
#else
int sipt_dist_has_nccl() { return 0; }
#endif

// Join the group: rank 0 serves the store on `port` of `host` (unless `serve` is 0: another
// process, such as torchrun's agent, serves it), every rank connects to it. Keys live under
// "sipt/". `backend` is "gloo" or "nccl". Null on error, with the reason in `err`.
SiptGroup* sipt_dist_init(const char* host, int port, int rank, int size, int64_t timeout_ms,
                          const char* backend, int serve, char* err, size_t err_len) {
    SiptGroup* out = nullptr;
    guarded(err, err_len, [&] {
        auto timeout = std::chrono::milliseconds(timeout_ms);
        c10d::TCPStoreOptions opts;
        opts.port = static_cast<std::uint16_t>(port);
        opts.isServer = serve != 0 && rank == 0;
        opts.numWorkers = size;
        opts.waitWorkers = serve != 0;
        opts.timeout = timeout;
        auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
        c10::intrusive_ptr<c10d::Store> store =
            c10::make_intrusive<c10d::PrefixStore>("sipt", tcp);
        std::string name(backend);
        c10::intrusive_ptr<c10d::Backend> group;
        if (name == "gloo") {
            auto options = c10d::ProcessGroupGloo::Options::create(timeout);
            // Bind where the store's host resolves (loopback for one machine).
            options->devices.push_back(
                c10d::ProcessGroupGloo::createDeviceForHostname(std::string(host)));
            options->threads = 1;
            group = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, options);
        } else if (name == "nccl") {
#ifdef SIPT_NCCL
            auto options = c10d::ProcessGroupNCCL::Options::create();
            options->timeout = timeout;
            group = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, options);
#else
            throw std::runtime_error(
                "this build of sipt has no NCCL backend (built without CUDA headers)");
#endif
        } else {
            throw std::runtime_error("unknown backend " + name);
        }
        out = new SiptGroup{store, group, timeout};
    });
    return out;
}

void sipt_dist_free(SiptGroup* g) { delete g; }

// Close the process group's connections and keep the store: peers blocked in a collective
// with this rank wake up, and can still read what this rank posted in the store. No
// collective may follow.
void sipt_dist_close_backend(SiptGroup* g) { g->backend.reset(); }

// Sum `tensor` over the group, in place.
int sipt_dist_all_reduce_sum(SiptGroup* g, at::Tensor* tensor, char* err, size_t err_len) {
    return guarded(err, err_len, [&] {
        std::vector<at::Tensor> tensors{*tensor};
        c10d::AllreduceOptions opts;
        opts.reduceOp = c10d::ReduceOp::SUM;
        opts.timeout = g->timeout;
        wait(g, g->backend->allreduce(tensors, opts));
    });
}

// Every rank's `input` (same shape everywhere) into `output`, shape (size, *input.shape).
int sipt_dist_all_gather(SiptGroup* g, const at::Tensor* input, at::Tensor* output, char* err,
                         size_t err_len) {
    return guarded(err, err_len, [&] {
        std::vector<at::Tensor> inputs{*input};
        std::vector<std::vector<at::Tensor>> outputs(1);
        for (auto& row : output->unbind(0)) outputs[0].push_back(row);
        c10d::AllgatherOptions opts;
        opts.timeout = g->timeout;
        wait(g, g->backend->allgather(outputs, inputs, opts));
    });
}

// `tensor` from rank `root` to every rank, in place.
int sipt_dist_broadcast(SiptGroup* g, at::Tensor* tensor, int root, char* err, size_t err_len) {
    return guarded(err, err_len, [&] {
        std::vector<at::Tensor> tensors{*tensor};
        c10d::BroadcastOptions opts;
        opts.rootRank = root;
        opts.timeout = g->timeout;
        wait(g, g->backend->broadcast(tensors, opts));
    });
}

// A value in the rendezvous store, for messages outside the collectives (a rank's fatal error).
int sipt_dist_store_set(SiptGroup* g, const char* key, const uint8_t* value, size_t len,
                        char* err, size_t err_len) {
    return guarded(err, err_len, [&] {
        g->store->set(std::string(key), std::vector<uint8_t>(value, value + len));
    });
}

// Whether `key` is in the store now (1), not (0), or the store cannot be reached (-1).
int sipt_dist_store_check(SiptGroup* g, const char* key, char* err, size_t err_len) {
    int found = 0;
    int rc = guarded(err, err_len, [&] { found = g->store->check({std::string(key)}) ? 1 : 0; });
    return rc < 0 ? -1 : found;
}

// The value of `key` (waiting at most the group's deadline) into `out` (at most `cap` bytes);
// its full length, or -1 on error.
int64_t sipt_dist_store_get(SiptGroup* g, const char* key, uint8_t* out, size_t cap, char* err,
                            size_t err_len) {
    int64_t n = -1;
    guarded(err, err_len, [&] {
        auto v = g->store->get(std::string(key));
        std::memcpy(out, v.data(), std::min(cap, v.size()));
        n = static_cast<int64_t>(v.size());
    });
    return n;
}

}  // extern "C"

#else  // no Gloo headers at build time

struct SiptGroup {};

extern "C" {

int sipt_dist_available() { return 0; }

int sipt_dist_has_nccl() { return 0; }

SiptGroup* sipt_dist_init(const char*, int, int, int, int64_t, const char*, int, char* err,
                          size_t err_len) {
    set_error(err, err_len,
              "this build of sipt has no c10d process groups: Gloo's headers were missing when "
              "it was built (install Debian's libgloo-dev, or run scripts/setup.sh, and rebuild)");
    return nullptr;
}

void sipt_dist_free(SiptGroup*) {}

void sipt_dist_close_backend(SiptGroup*) {}

int sipt_dist_all_reduce_sum(SiptGroup*, at::Tensor*, char* err, size_t err_len) {
    set_error(err, err_len, "no process groups in this build");
    return -1;
}

int sipt_dist_all_gather(SiptGroup*, const at::Tensor*, at::Tensor*, char* err, size_t err_len) {
    set_error(err, err_len, "no process groups in this build");
    return -1;
}

int sipt_dist_broadcast(SiptGroup*, at::Tensor*, int, char* err, size_t err_len) {
    set_error(err, err_len, "no process groups in this build");
    return -1;
}

int sipt_dist_store_set(SiptGroup*, const char*, const uint8_t*, size_t, char* err,
                        size_t err_len) {
    set_error(err, err_len, "no process groups in this build");
    return -1;
}

int sipt_dist_store_check(SiptGroup*, const char*, char* err, size_t err_len) {
    set_error(err, err_len, "no process groups in this build");
    return -1;
}

int64_t sipt_dist_store_get(SiptGroup*, const char*, uint8_t*, size_t, char* err,
                            size_t err_len) {
    set_error(err, err_len, "no process groups in this build");
    return -1;
}

}  // extern "C"

#endif
