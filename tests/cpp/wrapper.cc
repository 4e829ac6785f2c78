// The C++17 wrapper include/lomo.hpp: RAII, exceptions with the library's message, typed
// registration and submission, phase scopes, checkpoints and memory stats. Built with
// -Wall -Wextra -Werror -Wpedantic -Wshadow -Wconversion by tests/cpp_wrapper.rs.
#include "lomo.hpp"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

static_assert(!std::is_copy_constructible_v<lomo::Optimizer>, "move-only");
static_assert(std::is_nothrow_move_constructible_v<lomo::Optimizer>, "movable");
static_assert(std::is_base_of_v<std::runtime_error, lomo::Error>, "an std exception");

namespace {

int failures = 0;

void expect(bool ok, const char *what) {
    if (!ok) {
        std::fprintf(stderr, "FAILED: %s\n", what);
        ++failures;
    }
}

uint16_t to_bf16(float v) {  // round to nearest even (finite inputs)
    uint32_t b;
    std::memcpy(&b, &v, 4);
    b += 0x7FFFu + ((b >> 16) & 1u);
    return static_cast<uint16_t>(b >> 16);
}

float from_bf16(uint16_t h) {
    uint32_t b = static_cast<uint32_t>(h) << 16;
    float v;
    std::memcpy(&v, &b, 4);
    return v;
}

template <class F>
lomo_status status_of(F &&f) {
    try {
        f();
    } catch (const lomo::Error &e) {
        return e.status();
    }
    return LOMO_STATUS_OK;
}

void lomo_sgd_step() {
    lomo::Optimizer opt(LOMO_ALGORITHM_LOMO);
    std::vector<float> w{0.5f, -1.0f, 2.0f, 0.25f, 1.5f, -0.75f};
    std::vector<uint16_t> b{to_bf16(1.0f), to_bf16(-2.0f)};
    const std::vector<float> w0 = w;
    opt.group_set(1, 1.0, 0.0);  // group 1: no weight decay (biases)
    uint32_t iw = opt.register_param("w", w.data(), {2, 3});
    uint32_t ib = opt.register_param("b", b.data(), LOMO_DTYPE_BF16, std::vector<int64_t>{2},
                                     lomo::ParamOptions{1, 0, LOMO_DEVICE_CPU});
    expect(opt.param_count() == 2, "two parameters");
    const lomo::Optimizer::Group g1 = opt.group_get(1);
    expect(g1.lr_multiplier == 1.0 && g1.weight_decay == 0.0, "group_get reads group_set");
    expect(status_of([&] { opt.group_get(9); }) == LOMO_STATUS_INVALID_ARGUMENT,
           "group_get of a missing group");
    expect(status_of([&] { opt.cuda_loss_scale_ptr(); }) == LOMO_STATUS_UNSUPPORTED,
           "no device loss scale without CUDA parameters");
    const std::vector<float> gw{0.1f, 0.2f, -0.3f, 0.4f, 0.5f, -0.6f};
    const std::vector<uint16_t> gb{to_bf16(0.5f), to_bf16(-0.5f)};
    const float lr = 0.125f;
    {
        lomo::PhaseScope update(opt, LOMO_PHASE_UPDATE, lr);
        // A gradient of the wrong extent is refused before it is read, nothing changed, and
        // the parameter still expects its gradient in this phase.
        const std::vector<float> short_grad{0.1f, 0.2f, -0.3f};
        expect(status_of([&] { opt.submit(iw, short_grad); }) == LOMO_STATUS_INVALID_ARGUMENT,
               "a 3-element gradient for a 6-element parameter");
        expect(w == w0, "a refused gradient changes nothing");
        opt.submit(ib, gb.data(), LOMO_DTYPE_BF16, gb.size());
        opt.submit(iw, gw);
        update.end();
    }
    for (size_t i = 0; i < w.size(); ++i) {
        // Plain SGD (no decay, scale 1): p - lr * g, lr a power of two, so exact.
        expect(w[i] == w0[i] - lr * gw[i], "LOMO f32 update is p - lr g");
    }
    expect(from_bf16(b[0]) == 1.0f - 0.0625f && from_bf16(b[1]) == -2.0f + 0.0625f,
           "LOMO bf16 update");
    expect(opt.step_info().step == 1, "one step counted");
    {
        // A batch: both gradients in one call, the same update again (exact: lr a power of 2).
        const std::vector<float> w1 = w;
        lomo::PhaseScope update(opt, LOMO_PHASE_UPDATE, lr);
        const uint32_t ids[2] = {iw, ib};
        const void *grads[2] = {gw.data(), gb.data()};
        const uint32_t dtypes[2] = {LOMO_DTYPE_F32, LOMO_DTYPE_BF16};
        const uint64_t bad_counts[2] = {6, 3};
        expect(status_of([&] { opt.submit_batch(2, ids, grads, dtypes, bad_counts); }) ==
                   LOMO_STATUS_INVALID_ARGUMENT,
               "a batch with a bad count");
        expect(w == w1, "a refused batch changes nothing");
        const uint64_t counts[2] = {6, 2};
        opt.submit_batch(2, ids, grads, dtypes, counts);
        update.end();
        for (size_t i = 0; i < w.size(); ++i) {
            expect(w[i] == w1[i] - lr * gw[i], "a batch updates as single submits");
        }
    }
    expect(status_of([&] { opt.cuda_launch_count(); }) == LOMO_STATUS_UNSUPPORTED,
           "no launch count without CUDA parameters");

    // Errors carry the status and the library's message.
    try {
        lomo::PhaseScope update(opt, LOMO_PHASE_UPDATE, lr);
        opt.submit(7, gw.data());
        expect(false, "unknown id throws");
    } catch (const lomo::Error &e) {
        expect(e.status() == LOMO_STATUS_UNKNOWN_PARAM, "UNKNOWN_PARAM status");
        expect(std::string(e.what()).find("no parameter with id 7") != std::string::npos,
               "message from the library");
    }
    // The scope cancelled the step during unwinding, so a new phase may begin.
    expect(status_of([&] { lomo::PhaseScope s(opt, LOMO_PHASE_UPDATE, lr); s.end(); }) ==
               LOMO_STATUS_OK,
           "cancelled step leaves the optimizer between steps");
    expect(status_of([&] { opt.register_param("w", w.data(), {6}); }) ==
               LOMO_STATUS_INVALID_ARGUMENT,
           "duplicate name");
    expect(opt.step_info().step == 3, "steps counted");

    lomo::Optimizer moved = std::move(opt);
    expect(opt.get() == nullptr && moved.get() != nullptr, "move transfers ownership");
    expect(moved.param_count() == 2, "moved optimizer works");
}

void adalomo_state_and_memory() {
    lomo_config cfg = lomo::default_config(LOMO_ALGORITHM_ADALOMO);
    expect(cfg.loss_scale == 1024.0 && cfg.decay_rate == -0.8, "AdaLomo defaults");
    std::vector<float> w(12, 0.5f), v(5, -0.5f);
    lomo::Optimizer opt(cfg);
    uint32_t iw = opt.register_param("w", w.data(), {3, 4});
    uint32_t iv = opt.register_param("v", v.data(), {5});
    for (int step = 0; step < 3; ++step) {
        std::vector<float> gw(12), gv(5);
        for (size_t i = 0; i < gw.size(); ++i) gw[i] = opt.loss_scale() * 0.01f * float(i + 1);
        for (size_t i = 0; i < gv.size(); ++i) gv[i] = -opt.loss_scale() * 0.02f * float(i + 1);
        lomo::PhaseScope update(opt, LOMO_PHASE_UPDATE, 0.01f);
        opt.submit(iv, gv);
        opt.submit(iw, gw.data(), gw.size());
        update.end();
    }
    const lomo_memory_stats st = opt.memory_stats();
    expect(st.param_count == 2 && st.device_count == 1, "memory stats counts");
    expect(st.state_bytes == 4 * (3 + 4 + 5), "state: rows + cols + vector, f32");
    expect(st.adamw_bytes == 17 * 12, "AdamW: m + v + f32 gradient for f32 parameters");
    expect(st.devices[0].device == LOMO_DEVICE_CPU, "CPU entry");

    const std::vector<uint8_t> bytes = opt.state();
    expect(bytes.size() > 8, "state bytes");
    std::vector<float> w2 = w, v2 = v;
    lomo::Optimizer other(cfg);
    other.register_param("v", v2.data(), {5});  // another order: matched by name
    other.register_param("w", w2.data(), {3, 4});
    other.load_state(bytes);
    expect(other.step_info().step == 3, "step counter restored");

    const std::string path = "lomo_cpp_wrapper_test.safetensors";
    opt.save(path);
    lomo::Optimizer third(cfg);
    third.register_param("w", w2.data(), {3, 4});
    third.register_param("v", v2.data(), {5});
    third.load(path);
    expect(third.state() == bytes, "save/load round trip is byte-identical");
    std::remove(path.c_str());

    lomo::Optimizer wrong(cfg);
    wrong.register_param("w", w2.data(), {4, 3});
    wrong.register_param("v", v2.data(), {5});
    try {
        wrong.load_state(bytes);
        expect(false, "shape mismatch throws");
    } catch (const lomo::Error &e) {
        expect(e.status() == LOMO_STATUS_STATE_MISMATCH, "STATE_MISMATCH status");
        expect(std::string(e.what()).find("shape") != std::string::npos, "says which shape");
    }
    expect(status_of([&] { wrong.load("/nonexistent/dir/x.safetensors"); }) ==
               LOMO_STATUS_IO_ERROR,
           "missing file is an I/O error");
}

// A channels_last (O, I, kH, kW) = (2, 3, 2, 4) weight with AdaLomo, strides given with
// set_strides: bit for bit the same weight registered contiguous; a layout with a gap is refused.
void adalomo_channels_last() {
    const int64_t O = 2, I = 3, H = 2, W = 4;
    const size_t n = static_cast<size_t>(O * I * H * W);
    const std::vector<int64_t> strides{H * W * I, 1, W * I, I};
    auto mem = [&](size_t k) {  // logical index -> memory offset under `strides`
        const int64_t kk = static_cast<int64_t>(k);
        const int64_t w = kk % W, h = (kk / W) % H, i = (kk / (W * H)) % I, o = kk / (W * H * I);
        return static_cast<size_t>(o * strides[0] + i * strides[1] + h * strides[2] +
                                   w * strides[3]);
    };
    std::vector<float> contiguous(n), cl(n);
    for (size_t k = 0; k < n; ++k) contiguous[k] = cl[mem(k)] = 0.1f * float(k % 7) - 0.3f;
    lomo::Optimizer a(LOMO_ALGORITHM_ADALOMO), b(LOMO_ALGORITHM_ADALOMO);
    const uint32_t ia = a.register_param("w", contiguous.data(), {O, I, H, W});
    const uint32_t ib = b.register_param("w", cl.data(), {O, I, H, W});
    expect(status_of([&] { b.set_strides(ib, {H * W * I * 2, 1, W * I, I}); }) ==
               LOMO_STATUS_INVALID_ARGUMENT,
           "a layout with a gap is refused");
    b.set_strides(ib, strides);
    for (int step = 0; step < 3; ++step) {
        std::vector<float> ga(n), gb(n);
        for (size_t k = 0; k < n; ++k) {
            ga[k] = gb[mem(k)] = a.loss_scale() * 0.01f * float((k * 5 + size_t(step)) % 11);
        }
        for (auto *o : {&a, &b}) {
            lomo::PhaseScope update(*o, LOMO_PHASE_UPDATE, 0.01f);
            o->submit(o == &a ? ia : ib, (o == &a ? ga : gb).data(), n);
            update.end();
        }
    }
    bool same = true;
    for (size_t k = 0; k < n; ++k) same = same && std::memcmp(&contiguous[k], &cl[mem(k)], 4) == 0;
    expect(same, "channels_last AdaLomo equals the contiguous run bit for bit");
    expect(a.state() == b.state(), "and so does its state");
}

void gradient_accumulation() {
    // Two micro-batches accumulated in the library equal one step on their sum.
    std::vector<float> a{0.5f, -1.0f, 2.0f}, b = a;
    lomo::Optimizer acc(LOMO_ALGORITHM_LOMO), plain(LOMO_ALGORITHM_LOMO);
    uint32_t ia = acc.register_param("w", a.data(), {3});
    uint32_t ib = plain.register_param("w", b.data(), {3});
    acc.accum_enable(LOMO_ACCUM_F32, LOMO_ACCUM_SUM);
    expect(acc.accum_bytes() == 12, "one f32 buffer of 3 elements");
    const std::vector<float> g1{1.0f, 2.0f, -3.0f}, g2{0.5f, -0.25f, 4.0f};
    {
        lomo::PhaseScope micro(acc, LOMO_PHASE_ACCUMULATE, 0.0f);
        acc.submit(ia, g1);
        micro.end();
    }
    expect(acc.accum_pending() == 1 && a[0] == 0.5f, "accumulated, nothing updated");
    {
        lomo::PhaseScope last(acc, LOMO_PHASE_UPDATE, 0.1f);
        acc.submit(ia, g2);
        last.end();
    }
    std::vector<float> sum(3);
    for (size_t i = 0; i < 3; ++i) sum[i] = g1[i] + g2[i];
    {
        lomo::PhaseScope step(plain, LOMO_PHASE_UPDATE, 0.1f);
        plain.submit(ib, sum);
        step.end();
    }
    expect(a == b && acc.accum_pending() == 0, "equal to one step on the summed gradient");
    acc.accum_disable();
    expect(acc.accum_bytes() == 0, "buffers freed");
}

}  // namespace

// The wrapper methods of accumulation, strides and batches throw lomo::Error (a
// std::runtime_error) with the library's status and message on every misuse, and a refused
// call changes nothing: the step after them is the hand-computed one.
void new_entry_points_throw() {
    std::vector<float> w{1.0f, -2.0f, 0.5f, 4.0f}, v{0.25f, 8.0f};
    lomo::Optimizer opt(LOMO_ALGORITHM_LOMO);
    const uint32_t iw = opt.register_param("w", w.data(), {4});
    const uint32_t iv = opt.register_param("v", v.data(), {2});
    auto message_of = [](auto &&f) {
        try {
            f();
        } catch (const std::runtime_error &e) {
            return std::string(e.what());
        }
        return std::string();
    };
    expect(status_of([&] { opt.accum_enable(7, LOMO_ACCUM_SUM); }) == LOMO_STATUS_INVALID_ARGUMENT,
           "accum_enable: unknown buffer");
    expect(message_of([&] { opt.accum_enable(LOMO_ACCUM_F32, 9); }).find("reduction") !=
               std::string::npos,
           "accum_enable: the message names the reduction");
    expect(status_of([&] { opt.set_strides(99, {1}); }) == LOMO_STATUS_UNKNOWN_PARAM,
           "set_strides: unknown id");
    expect(status_of([&] { opt.set_strides(iw, {}); }) == LOMO_STATUS_INVALID_ARGUMENT,
           "set_strides: rank mismatch");
    expect(status_of([&] { opt.set_strides(iw, {2}); }) == LOMO_STATUS_INVALID_ARGUMENT,
           "set_strides: a gap");
    expect(status_of([&] { (void)opt.cuda_launch_count(); }) == LOMO_STATUS_UNSUPPORTED,
           "cuda_launch_count without CUDA parameters");
    opt.accum_enable(LOMO_ACCUM_F32, LOMO_ACCUM_SUM);
    expect(opt.accum_bytes() == 24 && opt.accum_pending() == 0, "buffers of 4 + 2 floats");
    const std::vector<float> g1{1.0f, 2.0f, -1.0f, 0.5f}, h1{4.0f, -2.0f};
    const std::vector<float> g2{0.5f, -1.0f, 1.0f, 2.0f}, h2{-1.0f, 1.0f};
    const uint32_t ids[2] = {iw, iv}, dup[2] = {iw, iw};
    const uint32_t dtypes[2] = {LOMO_DTYPE_F32, LOMO_DTYPE_F32};
    const uint64_t counts[2] = {4, 2}, dup_counts[2] = {4, 4};
    const void *grads[2] = {g1.data(), h1.data()}, *dup_grads[2] = {g1.data(), g2.data()};
    opt.step_begin(LOMO_PHASE_ACCUMULATE, 0.5f);
    expect(status_of([&] { opt.accum_disable(); }) == LOMO_STATUS_PHASE_ERROR,
           "accum_disable inside a step");
    expect(status_of([&] { opt.accum_enable(); }) == LOMO_STATUS_PHASE_ERROR,
           "accum_enable inside a step");
    expect(status_of([&] { opt.set_strides(iw, {1}); }) == LOMO_STATUS_PHASE_ERROR,
           "set_strides inside a step");
    expect(status_of([&] { opt.submit_batch(2, dup, dup_grads, dtypes, dup_counts); }) ==
               LOMO_STATUS_DUPLICATE_GRADIENT,
           "a batch naming a parameter twice");
    expect(status_of([&] { opt.submit_batch(2, nullptr, grads, dtypes, counts); }) ==
               LOMO_STATUS_NULL_ARGUMENT,
           "a batch with NULL ids");
    opt.submit_batch(2, ids, grads, dtypes, counts);
    expect(status_of([&] { opt.submit_batch(1, ids, grads, dtypes, counts); }) ==
               LOMO_STATUS_DUPLICATE_GRADIENT,
           "a batch of a parameter already submitted");
    opt.step_end();
    expect(opt.accum_pending() == 1, "one micro-batch pending");
    expect(status_of([&] { opt.save("lomo_pending.safetensors"); }) == LOMO_STATUS_PHASE_ERROR,
           "save while accumulated gradients are pending");
    expect(status_of([&] { opt.accum_disable(); }) == LOMO_STATUS_PHASE_ERROR,
           "accum_disable while accumulated gradients are pending");
    grads[0] = g2.data();
    grads[1] = h2.data();
    opt.step_begin(LOMO_PHASE_UPDATE, 0.5f);
    opt.submit_batch(2, ids, grads, dtypes, counts);
    opt.step_end();
    // By hand: p - 0.5 (g1 + g2), exact.
    const std::vector<float> want_w{1.0f - 0.75f, -2.0f - 0.5f, 0.5f, 4.0f - 1.25f},
        want_v{0.25f - 1.5f, 8.0f + 0.5f};
    expect(w == want_w && v == want_v, "the refused calls changed nothing: a - 0.5 (g1 + g2)");
    expect(opt.accum_pending() == 0, "the UPDATE phase empties the buffers");
    opt.accum_disable();
    expect(opt.accum_bytes() == 0, "accum_disable frees the buffers");
}

int main() {
    try {
        expect(!lomo::version().empty(), "version");
        expect(lomo::abi_version() == LOMO_ABI_VERSION, "ABI version of the header");
        (void)lomo::cuda_available();  // a probe: true or false, never throws
        lomo_sgd_step();
        adalomo_state_and_memory();
        adalomo_channels_last();
        gradient_accumulation();
        new_entry_points_throw();
    } catch (const std::exception &e) {
        std::fprintf(stderr, "unexpected exception: %s\n", e.what());
        return 2;
    }
    if (failures == 0) std::printf("lomo.hpp: all checks passed\n");
    return failures == 0 ? 0 : 1;
}
