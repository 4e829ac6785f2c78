// C++17 program using the C header (included twice) with RAII; built with -Wall -Wextra -Werror
// by tests/c_smoke.rs.
#include "lomo.h"
#include "lomo.h"

#include <cmath>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

void check(lomo_status st) {
    if (st != LOMO_STATUS_OK) {
        std::string msg(lomo_last_error_message(nullptr, 0) + 1, '\0');
        lomo_last_error_message(msg.data(), msg.size());
        throw std::runtime_error(std::string(lomo_status_str(st)) + ": " + msg);
    }
}

struct Free {
    void operator()(lomo_optimizer *o) const { lomo_optimizer_free(o); }
};

}  // namespace

int main() {
    try {
        lomo_config cfg{};
        check(lomo_config_init(&cfg, LOMO_ALGORITHM_ADALOMO));
        if (cfg.loss_scale != 1024.0 || cfg.decay_rate != -0.8) return 1;
        lomo_optimizer *raw = nullptr;
        check(lomo_optimizer_new(&cfg, &raw));
        std::unique_ptr<lomo_optimizer, Free> opt(raw);

        std::vector<float> p(12, 0.5f);
        const int64_t shape[] = {3, 4};
        lomo_param_desc d{};
        d.struct_size = sizeof d;
        d.name = "p";
        d.data = p.data();
        d.dtype = LOMO_DTYPE_F32;
        d.ndim = 2;
        d.shape = shape;
        d.device = LOMO_DEVICE_CPU;
        uint32_t id = 0;
        check(lomo_param_register(opt.get(), &d, &id));

        // AdaLomo's first step moves every element by about lr * RMS(p) in the gradient's
        // opposite direction: here all gradients are equal, so p <- 0.5 - 0.01 * 0.5.
        float scale = 0;
        check(lomo_loss_scale(opt.get(), &scale));
        std::vector<float> g(12, 3.0f * scale);
        check(lomo_step_begin(opt.get(), LOMO_PHASE_UPDATE, 0.01f, nullptr));
        check(lomo_grad_submit(opt.get(), id, g.data(), LOMO_DTYPE_F32, nullptr));
        check(lomo_step_end(opt.get(), nullptr));
        for (float v : p) {
            if (std::fabs(v - (0.5f - 0.01f * 0.5f)) > 1e-6f) {
                std::fprintf(stderr, "unexpected value %g\n", static_cast<double>(v));
                return 1;
            }
        }
        // Misuse throws with a message.
        try {
            check(lomo_step_end(opt.get(), nullptr));
            return 1;
        } catch (const std::runtime_error &e) {
            if (std::string(e.what()).find("no phase is active") == std::string::npos) return 1;
        }
    } catch (const std::exception &e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    std::printf("c++ smoke ok\n");
    return 0;
}
