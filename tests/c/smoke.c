/* C99 program using the C API as a C trainer would; built with -Wall -Wextra -Wpedantic -Werror
 * by tests/c_smoke.rs. The header is included twice on purpose. */
#include "lomo.h"
#include "lomo.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define CHECK(call)                                                                  \
    do {                                                                             \
        lomo_status st_ = (call);                                                    \
        if (st_ != LOMO_STATUS_OK) {                                                 \
            char msg_[256];                                                          \
            lomo_last_error_message(msg_, sizeof msg_);                              \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__,                   \
                    lomo_status_str(st_), msg_);                                     \
            return 1;                                                                \
        }                                                                            \
    } while (0)

#define EXPECT(cond)                                                                 \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: expectation failed: %s\n", __FILE__, __LINE__, #cond); \
            return 1;                                                                \
        }                                                                            \
    } while (0)

int main(void) {
    EXPECT(lomo_abi_version() == LOMO_ABI_VERSION);
    EXPECT(strcmp(lomo_version(), LOMO_VERSION_STRING) == 0);

    /* Errors: a status, a message, nothing written. */
    lomo_optimizer *opt = NULL;
    EXPECT(lomo_optimizer_new(NULL, &opt) == LOMO_STATUS_NULL_ARGUMENT);
    EXPECT(opt == NULL);
    char msg[128];
    size_t n = lomo_last_error_message(msg, sizeof msg);
    EXPECT(n > 0 && strstr(msg, "cfg") != NULL);
    EXPECT(lomo_last_error_message(NULL, 0) == n);
    EXPECT(strcmp(lomo_status_str(LOMO_STATUS_OK), "ok") == 0);
    EXPECT(strcmp(lomo_status_str(9999), "unknown status") == 0);

    /* LOMO with weight decay on a 2x3 weight and a 3-vector bias in group 1 (no decay). */
    lomo_config cfg;
    CHECK(lomo_config_init(&cfg, LOMO_ALGORITHM_LOMO));
    EXPECT(cfg.loss_scale_mode == LOMO_LOSS_SCALE_NONE);
    cfg.weight_decay = 0.5;
    CHECK(lomo_optimizer_new(&cfg, &opt));
    CHECK(lomo_group_set(opt, 1, 1.0, 0.0));

    float w[6] = {1, 2, 3, 4, 5, 6};
    float b[3] = {1, 1, 1};
    int64_t wshape[2] = {2, 3};
    int64_t bshape[1] = {3};
    lomo_param_desc d;
    memset(&d, 0, sizeof d);
    d.struct_size = sizeof d;
    d.name = "w";
    d.data = w;
    d.dtype = LOMO_DTYPE_F32;
    d.ndim = 2;
    d.shape = wshape;
    d.device = LOMO_DEVICE_CPU;
    uint32_t wid = 99, bid = 99;
    CHECK(lomo_param_register(opt, &d, &wid));
    d.name = "b";
    d.data = b;
    d.ndim = 1;
    d.shape = bshape;
    d.group = 1;
    CHECK(lomo_param_register(opt, &d, &bid));
    EXPECT(wid == 0 && bid == 1);

    float gw[6] = {1, 1, 1, 1, 1, 1};
    float gb[3] = {2, 2, 2};
    CHECK(lomo_step_begin(opt, LOMO_PHASE_UPDATE, 0.1f, NULL));
    CHECK(lomo_grad_submit(opt, bid, gb, LOMO_DTYPE_F32, NULL));
    EXPECT(lomo_grad_submit(opt, bid, gb, LOMO_DTYPE_F32, NULL) == LOMO_STATUS_DUPLICATE_GRADIENT);
    /* The checked form refuses a gradient whose element count is not the parameter's. */
    EXPECT(lomo_grad_submit_checked(opt, wid, gw, LOMO_DTYPE_F32, 3, NULL) ==
           LOMO_STATUS_INVALID_ARGUMENT);
    EXPECT(w[0] == 1.0f);
    CHECK(lomo_grad_submit_checked(opt, wid, gw, LOMO_DTYPE_F32, 6, NULL));
    CHECK(lomo_step_end(opt, NULL));

    /* w <- w * (1 - 0.1 * 0.5) - 0.1 * 1 ; b <- b - 0.1 * 2 */
    for (int i = 0; i < 6; i++) EXPECT(fabsf(w[i] - ((float)(i + 1) * 0.95f - 0.1f)) < 1e-6f);
    for (int i = 0; i < 3; i++) EXPECT(fabsf(b[i] - 0.8f) < 1e-6f);

    lomo_step_info info;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    CHECK(lomo_step_info_get(opt, &info));
    EXPECT(info.step == 1 && info.overflow == 0 && info.grads_submitted == 2);
    float scale = 0;
    CHECK(lomo_loss_scale(opt, &scale));
    EXPECT(scale == 1.0f);

    /* One optimizer holds parameters of one device; CUDA parameters need a CUDA device. */
    d.name = "cuda";
    d.device = 0;
    d.group = 0;
    uint32_t id;
    EXPECT(lomo_param_register(opt, &d, &id) == LOMO_STATUS_DEVICE_MISMATCH);
    lomo_optimizer_free(opt);
    if (!lomo_cuda_available()) {
        CHECK(lomo_optimizer_new(&cfg, &opt));
        lomo_status st = lomo_param_register(opt, &d, &id);
        if (st != LOMO_STATUS_NO_CUDA) {
            lomo_last_error_message(msg, sizeof msg);
            fprintf(stderr, "status %u: %s\n", (unsigned)st, msg);
        }
        EXPECT(st == LOMO_STATUS_NO_CUDA);
        lomo_optimizer_free(opt);
    }
    lomo_optimizer_free(NULL);
    printf("c smoke ok\n");
    return 0;
}
