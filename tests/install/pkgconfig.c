/* Built by scripts/test.sh against an installed lomo with `pkg-config --cflags --libs lomo`
 * (C99, -Wall -Wextra -Werror): one AdaLomo step, a state round trip through memory, and the
 * memory statistics. Exits non-zero on any failure. */
#include <lomo.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(call)                                                                  \
    do {                                                                             \
        lomo_status st_ = (call);                                                    \
        if (st_ != LOMO_STATUS_OK) {                                                 \
            char msg_[256];                                                          \
            lomo_last_error_message(msg_, sizeof msg_);                              \
            fprintf(stderr, "%s failed: %s: %s\n", #call, lomo_status_str(st_), msg_); \
            return 1;                                                                \
        }                                                                            \
    } while (0)

int main(void) {
    lomo_config cfg;
    lomo_optimizer *opt = NULL, *other = NULL;
    float w[6] = {0.5f, -0.5f, 0.25f, 1.0f, -1.0f, 2.0f}, g[6] = {1, 2, 3, 4, 5, 6};
    const int64_t shape[2] = {2, 3};
    lomo_param_desc d;
    lomo_memory_stats ms;
    uint32_t id = 0;
    size_t size = 0, written = 0;
    uint8_t *buf;
    int i;

    if (strcmp(lomo_version(), LOMO_VERSION_STRING) != 0 || lomo_abi_version() != LOMO_ABI_VERSION) {
        fprintf(stderr, "header and library versions differ\n");
        return 1;
    }
    CHECK(lomo_config_init(&cfg, LOMO_ALGORITHM_ADALOMO));
    CHECK(lomo_optimizer_new(&cfg, &opt));
    memset(&d, 0, sizeof d);
    d.struct_size = sizeof d;
    d.name = "w";
    d.data = w;
    d.dtype = LOMO_DTYPE_F32;
    d.ndim = 2;
    d.shape = shape;
    d.device = LOMO_DEVICE_CPU;
    CHECK(lomo_param_register(opt, &d, &id));
    for (i = 0; i < 6; ++i) g[i] *= 1024.0f; /* AdaLomo's default static loss scale */
    CHECK(lomo_step_begin(opt, LOMO_PHASE_UPDATE, 0.01f, NULL));
    CHECK(lomo_grad_submit(opt, id, g, LOMO_DTYPE_F32, NULL));
    CHECK(lomo_step_end(opt, NULL));

    CHECK(lomo_state_size(opt, &size));
    buf = (uint8_t *)malloc(size);
    CHECK(lomo_state_serialize(opt, buf, size, &written));
    CHECK(lomo_optimizer_new(&cfg, &other));
    CHECK(lomo_param_register(other, &d, &id));
    CHECK(lomo_state_deserialize(other, buf, written));

    ms.struct_size = sizeof ms;
    CHECK(lomo_memory_stats_get(other, &ms));
    printf("pkg-config build: lomo %s, state %zu bytes, optimizer state %llu B (AdamW: %llu B)\n",
           lomo_version(), written, (unsigned long long)ms.state_bytes,
           (unsigned long long)ms.adamw_bytes);
    free(buf);
    lomo_optimizer_free(other);
    lomo_optimizer_free(opt);
    return ms.state_bytes == 4 * (2 + 3) ? 0 : 1;
}
