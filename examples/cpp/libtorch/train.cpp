// A C++ trainer on libtorch (the PyTorch C++ API) that updates each parameter inside the
// backward pass with lomo: every trainable parameter gets a post-accumulate-grad hook (the slot
// behind Python's Tensor.register_post_accumulate_grad_hook) that hands its complete gradient to
// the C API through lomo.hpp and drops it, so no gradient outlives its hook.
//
// It checks one LOMO step against the SGD update written out from autograd's gradients, then
// trains a small MLP (16 -> 64 -> 4, tanh) on labels from a random teacher with AdaLomo (global
// norm clipping: a NORM backward, then an UPDATE backward) and with LOMO, printing the falling
// loss and the optimizer's memory next to AdamW's. Exits non-zero if a check fails.
//
// Build: see CMakeLists.txt.
#include <lomo.hpp>

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/torch.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

namespace {

// The hook of one parameter. Outside a phase (a plain backward) it leaves .grad alone.
struct SubmitHook final : torch::autograd::PostAccumulateGradHook {
    SubmitHook(lomo::Optimizer &opt, uint32_t id, const bool &active)
        : opt_(opt), id_(id), active_(active) {}

    void operator()(const torch::autograd::Variable &param) override {
        if (!active_ || !param.grad().defined()) {
            return;
        }
        const torch::Tensor grad = param.grad().contiguous();
        opt_.submit(id_, grad.const_data_ptr<float>());  // updates param in place (CPU: now)
        param.mutable_grad().reset();                    // LOMO keeps no gradient
    }

private:
    lomo::Optimizer &opt_;
    uint32_t id_;
    const bool &active_;
};

// Registers a module's parameters with lomo and installs the hooks; removes them when destroyed.
class FusedOptimizer {
public:
    FusedOptimizer(torch::nn::Module &model, const lomo_config &cfg)
        : opt_(cfg), clip_(cfg.clip_grad_norm > 0) {
        opt_.group_set(1, 1.0, 0.0);  // group 1: biases, no weight decay
        for (const auto &item : model.named_parameters()) {
            torch::Tensor p = item.value();
            if (!p.requires_grad()) {
                continue;
            }
            TORCH_CHECK(p.scalar_type() == torch::kFloat && p.is_contiguous() && p.is_cpu(),
                        item.key(), ": this example registers contiguous f32 CPU parameters");
            const std::string &name = item.key();
            const bool bias = name.size() >= 4 && name.compare(name.size() - 4, 4, "bias") == 0;
            // The library borrows the buffer: it must not move while the optimizer lives.
            const uint32_t id = opt_.register_param(
                name, p.data_ptr<float>(), std::vector<int64_t>(p.sizes().begin(), p.sizes().end()),
                lomo::ParamOptions{bias ? 1u : 0u});
            torch::autograd::impl::set_post_acc_grad_hooks(
                p, std::make_unique<SubmitHook>(opt_, id, active_));
            params_.push_back(p);
        }
    }
    ~FusedOptimizer() {
        for (auto &p : params_) {
            torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
        }
    }
    FusedOptimizer(const FusedOptimizer &) = delete;
    FusedOptimizer &operator=(const FusedOptimizer &) = delete;

    // One step: backward(s) of `loss` with every parameter updated as its gradient completes.
    void fused_backward(const torch::Tensor &loss, float lr) {
        const torch::Tensor scaled = loss * opt_.loss_scale();
        if (clip_) {
            lomo::PhaseScope norm(opt_, LOMO_PHASE_NORM, 0.0f);  // cancels the step on a throw
            backward(scaled, /*retain_graph=*/true);
            norm.end();
        }
        lomo::PhaseScope update(opt_, LOMO_PHASE_UPDATE, lr);
        backward(scaled, /*retain_graph=*/false);
        update.end();
    }

    lomo::Optimizer &native() { return opt_; }

private:
    void backward(const torch::Tensor &loss, bool retain_graph) {
        struct Active {
            bool &flag;
            explicit Active(bool &f) : flag(f) { flag = true; }
            ~Active() { flag = false; }
        } on(active_);
        loss.backward({}, retain_graph);
    }

    lomo::Optimizer opt_;
    bool clip_;
    bool active_ = false;
    std::vector<torch::Tensor> params_;
};

constexpr int64_t IN = 16, HID = 64, OUT = 4, BATCH = 64;

torch::nn::Sequential make_mlp() {
    return torch::nn::Sequential(torch::nn::Linear(IN, HID), torch::nn::Tanh(),
                                 torch::nn::Linear(HID, OUT));
}

torch::Tensor loss_of(torch::nn::Sequential &model, const torch::Tensor &x, const torch::Tensor &y) {
    return torch::nn::functional::cross_entropy(model->forward(x), y);
}

// One LOMO step through the hooks against p - lr * g, g from torch::autograd::grad on a copy.
bool check_one_step() {
    torch::manual_seed(1);
    auto model = make_mlp();
    torch::nn::Sequential reference(
        std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone()));
    const auto x = torch::randn({BATCH, IN});
    const auto y = torch::randint(0, OUT, {BATCH});
    const float lr = 0.1f;
    auto ref_params = reference->parameters();
    const auto grads = torch::autograd::grad({loss_of(reference, x, y)}, ref_params);
    {
        torch::NoGradGuard no_grad;
        for (size_t i = 0; i < ref_params.size(); ++i) {
            ref_params[i].sub_(grads[i], lr);
        }
    }
    lomo_config cfg = lomo::default_config(LOMO_ALGORITHM_LOMO);
    FusedOptimizer opt(*model, cfg);
    opt.fused_backward(loss_of(model, x, y), lr);
    auto params = model->parameters();
    double worst = 0.0;
    for (size_t i = 0; i < params.size(); ++i) {
        worst = std::max(worst, (params[i] - ref_params[i]).abs().max().item<double>());
        if (params[i].grad().defined()) {
            std::printf("FAIL: %zu kept a gradient\n", i);
            return false;
        }
    }
    std::printf("one LOMO step vs p - lr*g from autograd: max |diff| = %.3g\n", worst);
    return worst <= 1e-6;
}

// Trains from the same initial model; returns whether the loss fell to under half.
bool train(lomo_algorithm algorithm, float lr, int steps) {
    torch::manual_seed(0);
    auto teacher = torch::randn({IN, OUT});
    auto model = make_mlp();
    lomo_config cfg = lomo::default_config(algorithm);
    cfg.clip_grad_norm = 1.0;
    cfg.weight_decay = 1e-4;
    FusedOptimizer opt(*model, cfg);
    const char *name = algorithm == LOMO_ALGORITHM_ADALOMO ? "AdaLomo" : "LOMO";
    float first = 0.0f, last = 0.0f;
    for (int step = 0; step < steps; ++step) {
        const auto x = torch::randn({BATCH, IN});
        const auto y = x.matmul(teacher).argmax(1);
        const auto loss = loss_of(model, x, y);
        last = loss.item<float>();
        if (step == 0) {
            first = last;
        }
        opt.fused_backward(loss, lr);
        if (step % 50 == 0 || step == steps - 1) {
            const lomo_step_info info = opt.native().step_info();
            std::printf("%-7s step %3d  loss %.4f  grad norm %.3f\n", name, step, last,
                        info.grad_norm);
        }
    }
    const lomo_memory_stats m = opt.native().memory_stats();
    std::printf("%-7s optimizer state %llu B + workspace %llu B (AdamW: %llu B)\n", name,
                static_cast<unsigned long long>(m.state_bytes),
                static_cast<unsigned long long>(m.workspace_bytes),
                static_cast<unsigned long long>(m.adamw_bytes));
    return last < 0.5f * first;
}

}  // namespace

int main() {
    try {
        torch::set_num_threads(1);
        bool ok = check_one_step();
        ok = train(LOMO_ALGORITHM_ADALOMO, 0.01f, 200) && ok;
        ok = train(LOMO_ALGORITHM_LOMO, 0.5f, 200) && ok;
        std::printf(ok ? "libtorch trainer: OK\n" : "libtorch trainer: FAILED\n");
        return ok ? 0 : 1;
    } catch (const std::exception &e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
