// A C++ trainer that fine-tunes with lomo: a two-layer MLP (32 -> 64 -> 8, tanh, softmax
// cross-entropy) learns labels from a random teacher. The backward pass is written by hand and
// hands each parameter's gradient to the optimizer the moment it is complete, so only one
// layer's gradient exists at a time. It trains with LOMO (global-norm clipping: a NORM backward,
// then an UPDATE backward) and with AdaLomo, prints the falling loss and the optimizer's memory
// next to AdamW's, and resumes AdaLomo from a checkpoint.
//
// Build: see CMakeLists.txt (find_package(lomo) after scripts/install.sh).
#include <lomo.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>

namespace {

constexpr int64_t IN = 32, HID = 64, OUT = 8, BATCH = 64;

struct Mlp {
    std::vector<float> w1, b1, w2, b2;  // w1 [HID, IN], w2 [OUT, HID]
    uint32_t id_w1 = 0, id_b1 = 0, id_w2 = 0, id_b2 = 0;

    explicit Mlp(std::mt19937 &rng) : w1(HID * IN), b1(HID, 0.0f), w2(OUT * HID), b2(OUT, 0.0f) {
        std::normal_distribution<float> n(0.0f, 1.0f);
        for (auto &v : w1) v = n(rng) / std::sqrt(float(IN));
        for (auto &v : w2) v = n(rng) / std::sqrt(float(HID));
    }

    void register_with(lomo::Optimizer &opt) {
        opt.group_set(1, 1.0, 0.0);  // biases: no weight decay
        const lomo::ParamOptions bias{1, 0, LOMO_DEVICE_CPU};
        // The optimizer updates these buffers in place (it borrows them; they must not move).
        id_w1 = opt.register_param("fc1.weight", w1.data(), {HID, IN});
        id_b1 = opt.register_param("fc1.bias", b1.data(), {HID}, bias);
        id_w2 = opt.register_param("fc2.weight", w2.data(), {OUT, HID});
        id_b2 = opt.register_param("fc2.bias", b2.data(), {OUT}, bias);
    }
};

struct Batch {
    std::vector<float> x;
    std::vector<int> label;
};

Batch make_batch(std::mt19937 &rng, const std::vector<float> &teacher) {
    std::normal_distribution<float> n(0.0f, 1.0f);
    Batch b{std::vector<float>(BATCH * IN), std::vector<int>(BATCH)};
    for (auto &v : b.x) v = n(rng);
    for (int64_t i = 0; i < BATCH; ++i) {
        float best = -1e30f;
        for (int64_t k = 0; k < OUT; ++k) {
            float s = 0.0f;
            for (int64_t j = 0; j < IN; ++j) s += teacher[k * IN + j] * b.x[i * IN + j];
            if (s > best) best = s, b.label[i] = int(k);
        }
    }
    return b;
}

/// Forward pass, loss, and the hand-written backward pass that submits each gradient as soon as
/// it is complete. `scale` is the optimizer's loss scale: the gradients are those of scale·loss.
float forward_backward(const Mlp &m, const Batch &b, lomo::Optimizer &opt, float scale) {
    std::vector<float> h(BATCH * HID), z(BATCH * OUT), dz(BATCH * OUT);
    float loss = 0.0f;
    for (int64_t i = 0; i < BATCH; ++i) {
        for (int64_t o = 0; o < HID; ++o) {
            float s = m.b1[o];
            for (int64_t j = 0; j < IN; ++j) s += m.w1[o * IN + j] * b.x[i * IN + j];
            h[i * HID + o] = std::tanh(s);
        }
        float zmax = -1e30f;
        for (int64_t k = 0; k < OUT; ++k) {
            float s = m.b2[k];
            for (int64_t o = 0; o < HID; ++o) s += m.w2[k * HID + o] * h[i * HID + o];
            z[i * OUT + k] = s;
            zmax = std::max(zmax, s);
        }
        float sum = 0.0f;
        for (int64_t k = 0; k < OUT; ++k) sum += std::exp(z[i * OUT + k] - zmax);
        loss += (std::log(sum) + zmax - z[i * OUT + b.label[i]]) / float(BATCH);
        for (int64_t k = 0; k < OUT; ++k) {
            float p = std::exp(z[i * OUT + k] - zmax) / sum;
            dz[i * OUT + k] = scale * (p - (k == b.label[i] ? 1.0f : 0.0f)) / float(BATCH);
        }
    }
    // Layer 2: its gradients are complete first; hand them over, then continue backward.
    std::vector<float> gw2(OUT * HID, 0.0f), gb2(OUT, 0.0f), dh(BATCH * HID, 0.0f);
    for (int64_t i = 0; i < BATCH; ++i)
        for (int64_t k = 0; k < OUT; ++k) {
            const float d = dz[i * OUT + k];
            gb2[k] += d;
            for (int64_t o = 0; o < HID; ++o) {
                gw2[k * HID + o] += d * h[i * HID + o];
                dh[i * HID + o] += d * m.w2[k * HID + o];  // uses w2 before its update
            }
        }
    opt.submit(m.id_b2, gb2);  // the vector overloads pass the size, which the library checks
    opt.submit(m.id_w2, gw2);
    // Layer 1.
    std::vector<float> gw1(HID * IN, 0.0f), gb1(HID, 0.0f);
    for (int64_t i = 0; i < BATCH; ++i)
        for (int64_t o = 0; o < HID; ++o) {
            const float d = dh[i * HID + o] * (1.0f - h[i * HID + o] * h[i * HID + o]);
            gb1[o] += d;
            for (int64_t j = 0; j < IN; ++j) gw1[o * IN + j] += d * b.x[i * IN + j];
        }
    opt.submit(m.id_b1, gb1);
    opt.submit(m.id_w1, gw1);
    return loss;
}

void print_memory(const lomo::Optimizer &opt) {
    const lomo_memory_stats st = opt.memory_stats();
    std::printf("memory: %llu parameters (%llu elements, %llu bytes)\n",
                (unsigned long long)st.param_count, (unsigned long long)st.param_elements,
                (unsigned long long)st.param_bytes);
    std::printf("        optimizer state %llu B + workspace %llu B; AdamW would need %llu B\n",
                (unsigned long long)st.state_bytes, (unsigned long long)st.workspace_bytes,
                (unsigned long long)st.adamw_bytes);
}

/// Trains steps [first, first + steps); returns the mean loss of the first and of the last 20.
std::pair<float, float> train(lomo::Optimizer &opt, const Mlp &m, std::mt19937 &rng,
                              const std::vector<float> &teacher, int first, int steps, float lr,
                              bool clip) {
    float head = 0.0f, tail = 0.0f;
    for (int step = first; step < first + steps; ++step) {
        const Batch b = make_batch(rng, teacher);
        const float lr_t = lr * (1.0f - 0.5f * float(step) / 600.0f);
        if (clip) {  // first backward: the optimizer only accumulates the global gradient norm
            lomo::PhaseScope norm(opt, LOMO_PHASE_NORM, lr_t);
            forward_backward(m, b, opt, opt.loss_scale());
            norm.end();
        }
        lomo::PhaseScope update(opt, LOMO_PHASE_UPDATE, lr_t);
        const float loss = forward_backward(m, b, opt, opt.loss_scale());
        update.end();
        if (step % 50 == 0) {
            const lomo_step_info info = opt.step_info();
            char coef[16] = "-";  // without clipping there is no coefficient to show
            if (clip) std::snprintf(coef, sizeof coef, "%.3f", double(info.clip_coef));
            std::printf("step %4d  loss %.4f  clip %5s  loss-scale %g\n", step, double(loss), coef,
                        double(info.loss_scale));
        }
        if (step < first + 20) head += loss / 20.0f;
        if (step >= first + steps - 20) tail += loss / 20.0f;
    }
    return {head, tail};
}

bool falls(std::pair<float, float> r) {
    std::printf("mean loss: first 20 steps %.4f, last 20 steps %.4f\n", double(r.first),
                double(r.second));
    return r.second < 0.8f * r.first;
}

}  // namespace

int main() {
    try {
        std::printf("lomo %s\n", lomo::version().c_str());
        std::mt19937 rng(7);
        std::vector<float> teacher(OUT * IN);
        std::normal_distribution<float> n(0.0f, 1.0f);
        for (auto &v : teacher) v = n(rng);
        bool ok = true;

        std::printf("\n== LOMO, global-norm clipping (two backward passes per step)\n");
        {
            lomo_config cfg = lomo::default_config(LOMO_ALGORITHM_LOMO);
            cfg.clip_grad_norm = 1.0;
            cfg.weight_decay = 1e-4;
            lomo::Optimizer opt(cfg);
            Mlp m(rng);
            m.register_with(opt);
            ok &= falls(train(opt, m, rng, teacher, 0, 300, 0.3f, true));
            print_memory(opt);
        }

        std::printf("\n== AdaLomo (one backward pass per step), checkpointed half-way\n");
        {
            const lomo_config cfg = lomo::default_config(LOMO_ALGORITHM_ADALOMO);
            Mlp m(rng);
            float head = 0.0f;
            {
                lomo::Optimizer opt(cfg);
                m.register_with(opt);
                head = train(opt, m, rng, teacher, 0, 150, 0.01f, false).first;
                opt.save("adalomo_optimizer.safetensors");  // the model itself is saved apart
            }
            // A new process would reload the model weights, register them, and load the state.
            lomo::Optimizer opt(cfg);
            m.register_with(opt);
            opt.load("adalomo_optimizer.safetensors");
            std::printf("resumed at step %llu\n", (unsigned long long)opt.step_info().step);
            const float tail = train(opt, m, rng, teacher, 150, 150, 0.01f, false).second;
            ok &= falls({head, tail});
            print_memory(opt);
            std::remove("adalomo_optimizer.safetensors");
        }
        if (!ok) {
            std::fprintf(stderr, "the loss did not fall\n");
            return 1;
        }
    } catch (const lomo::Error &e) {
        std::fprintf(stderr, "lomo error %u: %s\n", unsigned(e.status()), e.what());
        return 1;
    }
    return 0;
}
