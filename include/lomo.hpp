/* lomo: header-only C++17 wrapper over the C API in lomo.h.
 *
 * Hand-written, no logic of its own: RAII ownership of the optimizer handle, exceptions instead
 * of status codes (lomo::Error carries the status and the library's last-error message), and
 * typed overloads for registration and submission. Every call maps to one C function with the
 * same name; read lomo.h for semantics, ownership, stream ordering and thread safety.
 *
 *   lomo::Optimizer opt(lomo::default_config(LOMO_ALGORITHM_ADALOMO));
 *   uint32_t w = opt.register_param("w", weights.data(), {out_features, in_features});
 *   {
 *       lomo::PhaseScope update(opt, LOMO_PHASE_UPDATE, lr);   // cancels the step on exception
 *       ... backward: opt.submit(w, grad_w.data(), grad_w.size()); ...  // count checked
 *       update.end();
 *   }
 *   opt.save("optimizer.safetensors");
 */
#ifndef LOMO_HPP
#define LOMO_HPP

#include "lomo.h"

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace lomo {

/// A failed lomo call: the status (`lomo_status`) and the library's message for it.
class Error : public std::runtime_error {
public:
    Error(lomo_status status, const std::string &message)
        : std::runtime_error(message), status_(status) {}
    lomo_status status() const noexcept { return status_; }

private:
    lomo_status status_;
};

/// The calling thread's last error message (`lomo_last_error_message`).
inline std::string last_error_message() {
    std::vector<char> buf(lomo_last_error_message(nullptr, 0) + 1, '\0');
    size_t n = lomo_last_error_message(buf.data(), buf.size());
    return std::string(buf.data(), n < buf.size() ? n : buf.size() - 1);
}

/// Throws lomo::Error unless `status` is LOMO_STATUS_OK.
inline void check(lomo_status status) {
    if (status != LOMO_STATUS_OK) {
        throw Error(status, std::string(lomo_status_str(static_cast<uint32_t>(status))) + ": " +
                                last_error_message());
    }
}

/// The library version string (`lomo_version`).
inline std::string version() { return lomo_version(); }

/// The ABI version of the loaded library (`lomo_abi_version`).
inline uint32_t abi_version() { return lomo_abi_version(); }

/// Whether CUDA parameters can be registered (`lomo_cuda_available`; probes once, never throws).
inline bool cuda_available() { return lomo_cuda_available(); }

/// lomo-optim's defaults for `algorithm` (`lomo_config_init`).
inline lomo_config default_config(lomo_algorithm algorithm) {
    lomo_config cfg{};
    check(lomo_config_init(&cfg, static_cast<uint32_t>(algorithm)));
    return cfg;
}

/// A parameter's dimensions: `{rows, cols}` or a std::vector<int64_t>.
class Shape {
public:
    Shape(std::initializer_list<int64_t> dims) : dims_(dims) {}
    Shape(std::vector<int64_t> dims) : dims_(std::move(dims)) {}
    const int64_t *data() const noexcept { return dims_.empty() ? nullptr : dims_.data(); }
    uint32_t rank() const noexcept { return static_cast<uint32_t>(dims_.size()); }

private:
    std::vector<int64_t> dims_;
};

/// Registration options besides name, data, dtype and shape.
struct ParamOptions {
    uint32_t group = 0;
    uint32_t flags = 0;
    int32_t device = LOMO_DEVICE_CPU;
};

/// Owns a `lomo_optimizer` (move-only; freed with `lomo_optimizer_free`).
class Optimizer {
public:
    explicit Optimizer(const lomo_config &cfg) {
        lomo_optimizer *raw = nullptr;
        check(lomo_optimizer_new(&cfg, &raw));
        handle_.reset(raw);
    }
    explicit Optimizer(lomo_algorithm algorithm) : Optimizer(default_config(algorithm)) {}

    /// The C handle, still owned by this object.
    lomo_optimizer *get() const noexcept { return handle_.get(); }
    /// Gives up ownership: the caller frees the handle with `lomo_optimizer_free`.
    lomo_optimizer *release() noexcept { return handle_.release(); }

    void group_set(uint32_t group, double lr_multiplier, double weight_decay) {
        check(lomo_group_set(get(), group, lr_multiplier, weight_decay));
    }

    /// A group's settings (`lomo_group_get`).
    struct Group {
        double lr_multiplier;
        double weight_decay;
    };
    Group group_get(uint32_t group) const {
        Group g{};
        check(lomo_group_get(get(), group, &g.lr_multiplier, &g.weight_decay));
        return g;
    }

    /// `lomo_param_register` with a filled descriptor; returns the parameter id.
    uint32_t register_param(const lomo_param_desc &desc) {
        uint32_t id = 0;
        check(lomo_param_register(get(), &desc, &id));
        return id;
    }
    /// An f32 parameter buffer (borrowed until the optimizer is destroyed).
    uint32_t register_param(const std::string &name, float *data, const Shape &shape,
                            const ParamOptions &opts = {}) {
        return register_raw(name, data, LOMO_DTYPE_F32, shape, opts);
    }
    /// A 16-bit parameter buffer; `dtype` is LOMO_DTYPE_F16 or LOMO_DTYPE_BF16.
    uint32_t register_param(const std::string &name, uint16_t *data, lomo_dtype dtype,
                            const Shape &shape, const ParamOptions &opts = {}) {
        if (dtype == LOMO_DTYPE_F32) {
            throw std::invalid_argument("lomo: a uint16_t buffer needs LOMO_DTYPE_F16 or _BF16");
        }
        return register_raw(name, data, dtype, shape, opts);
    }
    /// Any buffer with an explicit dtype (host or device memory, see lomo_param_desc).
    uint32_t register_raw(const std::string &name, void *data, lomo_dtype dtype,
                          const Shape &shape, const ParamOptions &opts = {}) {
        lomo_param_desc d{};
        d.struct_size = sizeof d;
        d.name = name.c_str();
        d.data = data;
        d.dtype = static_cast<uint32_t>(dtype);
        d.ndim = shape.rank();
        d.shape = shape.data();
        d.device = opts.device;
        d.group = opts.group;
        d.flags = opts.flags;
        return register_param(d);
    }

    /// `lomo_param_set_strides`: the element strides of parameter `id`'s buffer and of its
    /// gradients (dense non-overlapping: channels_last, a transposed matrix), one per dimension
    /// of its shape; call after registering, between steps. AdaLomo then steps on logical-order
    /// copies (CPU), bit for bit the contiguous result.
    void set_strides(uint32_t id, const std::vector<int64_t> &strides) {
        check(lomo_param_set_strides(get(), id, static_cast<uint32_t>(strides.size()),
                                     strides.empty() ? nullptr : strides.data()));
    }

    uint32_t param_count() const {
        uint32_t n = 0;
        check(lomo_param_count(get(), &n));
        return n;
    }

    void step_begin(lomo_phase phase, float lr, void *stream = nullptr) {
        check(lomo_step_begin(get(), static_cast<uint32_t>(phase), lr, stream));
    }
    /// An f32 gradient of `count` elements: the library checks `count` against the
    /// parameter's element count before reading (`lomo_grad_submit_checked`).
    void submit(uint32_t id, const float *grad, uint64_t count, void *stream = nullptr) {
        submit_raw(id, grad, LOMO_DTYPE_F32, count, stream);
    }
    /// A whole std::vector<float> as the gradient (its size is checked).
    void submit(uint32_t id, const std::vector<float> &grad, void *stream = nullptr) {
        submit_raw(id, grad.data(), LOMO_DTYPE_F32, grad.size(), stream);
    }
    /// A 16-bit gradient of `count` elements; `dtype` is LOMO_DTYPE_F16 or LOMO_DTYPE_BF16.
    void submit(uint32_t id, const uint16_t *grad, lomo_dtype dtype, uint64_t count,
                void *stream = nullptr) {
        if (dtype == LOMO_DTYPE_F32) {
            throw std::invalid_argument("lomo: a uint16_t gradient needs LOMO_DTYPE_F16 or _BF16");
        }
        submit_raw(id, grad, dtype, count, stream);
    }
    /// Any gradient buffer of `count` elements of `dtype` (`lomo_grad_submit_checked`).
    void submit_raw(uint32_t id, const void *grad, lomo_dtype dtype, uint64_t count,
                    void *stream) {
        check(lomo_grad_submit_checked(get(), id, grad, static_cast<uint32_t>(dtype), count,
                                       stream));
    }
    /// Unchecked: `grad` must hold the parameter's element count. Prefer the overloads with a
    /// count, which the library checks.
    void submit(uint32_t id, const float *grad, void *stream = nullptr) {
        submit_raw(id, grad, LOMO_DTYPE_F32, stream);
    }
    /// A 16-bit gradient; `dtype` is LOMO_DTYPE_F16 or LOMO_DTYPE_BF16.
    /// Unchecked 16-bit gradient (see above); prefer the overload with a count.
    void submit(uint32_t id, const uint16_t *grad, lomo_dtype dtype, void *stream = nullptr) {
        if (dtype == LOMO_DTYPE_F32) {
            throw std::invalid_argument("lomo: a uint16_t gradient needs LOMO_DTYPE_F16 or _BF16");
        }
        submit_raw(id, grad, dtype, stream);
    }
    /// Unchecked raw gradient (`lomo_grad_submit`).
    void submit_raw(uint32_t id, const void *grad, lomo_dtype dtype, void *stream = nullptr) {
        check(lomo_grad_submit(get(), id, grad, static_cast<uint32_t>(dtype), stream));
    }
    /// Several gradients at once (`lomo_grad_submit_batch`): arrays of `n` ids, buffers, dtypes
    /// and element counts; the same as `submit_raw` on each in order, every entry checked first.
    /// On CUDA small tensors share launches.
    void submit_batch(size_t n, const uint32_t *ids, const void *const *grads,
                      const uint32_t *dtypes, const uint64_t *counts, void *stream = nullptr) {
        check(lomo_grad_submit_batch(get(), n, ids, grads, dtypes, counts, stream));
    }
    void step_end(void *stream = nullptr) { check(lomo_step_end(get(), stream)); }
    void step_cancel() { check(lomo_step_cancel(get())); }

    float loss_scale() const {
        float s = 0.0f;
        check(lomo_loss_scale(get(), &s));
        return s;
    }
    /// Device address of the f32 loss scale for the next backward (`lomo_cuda_loss_scale_ptr`;
    /// CUDA parameters only, else lomo::Error with LOMO_STATUS_UNSUPPORTED). Read it on the
    /// device only.
    const float *cuda_loss_scale_ptr() const {
        const float *p = nullptr;
        check(lomo_cuda_loss_scale_ptr(get(), &p));
        return p;
    }
    /// Kernels launched on the CUDA device so far (`lomo_cuda_launch_count`; CUDA parameters
    /// only, else lomo::Error with LOMO_STATUS_UNSUPPORTED).
    uint64_t cuda_launch_count() const {
        uint64_t n = 0;
        check(lomo_cuda_launch_count(get(), &n));
        return n;
    }
    lomo_step_info step_info() const {
        lomo_step_info info{};
        info.struct_size = sizeof info;
        check(lomo_step_info_get(get(), &info));
        return info;
    }
    lomo_memory_stats memory_stats() const {
        lomo_memory_stats st{};
        st.struct_size = sizeof st;
        check(lomo_memory_stats_get(get(), &st));
        return st;
    }

    /// Gradient accumulation (`lomo_accum_enable`): `buffer` is `LOMO_ACCUM_F32` or
    /// `LOMO_ACCUM_PARAM_DTYPE`, `reduction` `LOMO_ACCUM_SUM` or `LOMO_ACCUM_MEAN`. A step of k
    /// micro-batches is then k - 1 `LOMO_PHASE_ACCUMULATE` phases and the step's own phases.
    void accum_enable(uint32_t buffer = LOMO_ACCUM_F32, uint32_t reduction = LOMO_ACCUM_SUM) {
        check(lomo_accum_enable(get(), buffer, reduction));
    }
    /// `lomo_accum_disable`.
    void accum_disable() { check(lomo_accum_disable(get())); }
    /// Micro-batches pending in this step (`lomo_accum_get`).
    uint32_t accum_pending() const {
        uint32_t pending = 0;
        uint64_t bytes = 0;
        check(lomo_accum_get(get(), &pending, &bytes));
        return pending;
    }
    /// Bytes of the accumulation buffers (`lomo_accum_get`).
    uint64_t accum_bytes() const {
        uint32_t pending = 0;
        uint64_t bytes = 0;
        check(lomo_accum_get(get(), &pending, &bytes));
        return bytes;
    }

    /// `lomo_state_save` / `lomo_state_load`.
    void save(const std::string &path) const { check(lomo_state_save(get(), path.c_str())); }
    void load(const std::string &path) { check(lomo_state_load(get(), path.c_str())); }
    /// The state as the bytes of a safetensors file (`lomo_state_size` + `lomo_state_serialize`).
    std::vector<uint8_t> state() const {
        size_t size = 0;
        check(lomo_state_size(get(), &size));
        std::vector<uint8_t> buf(size);
        size_t written = 0;
        check(lomo_state_serialize(get(), buf.data(), buf.size(), &written));
        buf.resize(written);
        return buf;
    }
    /// `lomo_state_deserialize`.
    void load_state(const uint8_t *data, size_t len) {
        check(lomo_state_deserialize(get(), data, len));
    }
    void load_state(const std::vector<uint8_t> &bytes) { load_state(bytes.data(), bytes.size()); }

private:
    struct Free {
        void operator()(lomo_optimizer *o) const noexcept { lomo_optimizer_free(o); }
    };
    std::unique_ptr<lomo_optimizer, Free> handle_;
};

/// One phase of a step: begins it on construction; `end()` ends it; destroyed without `end()`
/// (an exception in backward) it cancels the step with `lomo_step_cancel`.
class PhaseScope {
public:
    PhaseScope(Optimizer &opt, lomo_phase phase, float lr, void *stream = nullptr)
        : opt_(&opt), stream_(stream) {
        opt.step_begin(phase, lr, stream);
    }
    PhaseScope(const PhaseScope &) = delete;
    PhaseScope &operator=(const PhaseScope &) = delete;
    ~PhaseScope() {
        if (opt_ != nullptr) {
            lomo_step_cancel(opt_->get());
        }
    }
    void end() {
        if (opt_ == nullptr) {
            throw std::logic_error("lomo: PhaseScope::end called twice");
        }
        opt_->step_end(stream_);
        opt_ = nullptr;
    }

private:
    Optimizer *opt_;
    void *stream_;
};

}  // namespace lomo

#endif  // LOMO_HPP
