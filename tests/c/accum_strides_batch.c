/* C99 program: gradient accumulation (lomo_accum_enable, LOMO_PHASE_ACCUMULATE), strided layouts
 * (lomo_param_set_strides) and batched submission (lomo_grad_submit_batch) as a C trainer uses
 * them, checked against values computed here by hand (LOMO: exact, with dyadic values and a
 * power-of-2 lr) and by an independent double-precision implementation of AdaLomo's update
 * (shared/reference/semantics.md §3.3) on a matrix stored transposed; and every misuse of these
 * entry points is a status with nothing changed. Built with -Wall -Wextra -Wpedantic -Werror by
 * tests/c_smoke.rs; scripts/valgrind.sh runs it under memcheck. */
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

/* A call that must fail with `want` and leave a message. */
#define EXPECT_STATUS(call, want)                                                    \
    do {                                                                             \
        lomo_status st_ = (call);                                                    \
        if (st_ != (want)) {                                                         \
            fprintf(stderr, "%s:%d: %s gave %s, expected %s\n", __FILE__, __LINE__,  \
                    #call, lomo_status_str(st_), lomo_status_str(want));             \
            return 1;                                                                \
        }                                                                            \
        EXPECT(lomo_last_error_message(NULL, 0) > 0);                                \
    } while (0)

static lomo_optimizer *make(uint32_t algorithm) {
    lomo_config cfg;
    lomo_optimizer *opt = NULL;
    if (lomo_config_init(&cfg, algorithm) != LOMO_STATUS_OK) return NULL;
    cfg.loss_scale_mode = LOMO_LOSS_SCALE_NONE;
    if (lomo_optimizer_new(&cfg, &opt) != LOMO_STATUS_OK) return NULL;
    return opt;
}

static lomo_status reg(lomo_optimizer *opt, const char *name, float *data, uint32_t ndim,
                       const int64_t *shape, uint32_t *id) {
    lomo_param_desc d;
    memset(&d, 0, sizeof d);
    d.struct_size = sizeof d;
    d.name = name;
    d.data = data;
    d.dtype = LOMO_DTYPE_F32;
    d.ndim = ndim;
    d.shape = shape;
    d.device = LOMO_DEVICE_CPU;
    return lomo_param_register(opt, &d, id);
}

static int same(const float *a, const float *b, size_t n) {
    return memcmp(a, b, n * sizeof *a) == 0;
}

/* LOMO (lr 0.5, no decay, no scaling: p <- p - 0.5 g, exact for these dyadic values) on a
 * 4-vector and a 3-vector submitted as one batch. */
static int lomo_accumulation_and_batch(void) {
    lomo_optimizer *opt = make(LOMO_ALGORITHM_LOMO);
    EXPECT(opt != NULL);
    float a[4] = {1.0f, -2.0f, 0.5f, 4.0f}, b[3] = {0.25f, 8.0f, -1.0f};
    const int64_t sa[1] = {4}, sb[1] = {3};
    uint32_t ids[2];
    CHECK(reg(opt, "a", a, 1, sa, &ids[0]));
    CHECK(reg(opt, "b", b, 1, sb, &ids[1]));
    float ga[3][4] = {{0.5f, 1.0f, -0.25f, 2.0f}, {1.5f, -1.0f, 0.75f, 0.0f}, {-1.0f, 2.0f, 0.5f, -4.0f}};
    float gb[3][3] = {{1.0f, 0.5f, 2.0f}, {-0.5f, 0.25f, 4.0f}, {0.0f, -1.5f, -2.0f}};
    const uint32_t dtypes[2] = {LOMO_DTYPE_F32, LOMO_DTYPE_F32};
    const uint64_t counts[2] = {4, 3};
    const void *grads[2];
    uint32_t pending = 99;
    uint64_t bytes = 99;
    float ea[4], eb[3];
    int m, i;

    /* Refusals before accumulation is on. */
    EXPECT_STATUS(lomo_accum_enable(opt, 7, LOMO_ACCUM_SUM), LOMO_STATUS_INVALID_ARGUMENT);
    EXPECT_STATUS(lomo_accum_enable(opt, LOMO_ACCUM_F32, 9), LOMO_STATUS_INVALID_ARGUMENT);
    EXPECT_STATUS(lomo_accum_enable(NULL, LOMO_ACCUM_F32, LOMO_ACCUM_SUM), LOMO_STATUS_NULL_ARGUMENT);
    EXPECT_STATUS(lomo_accum_get(opt, NULL, &bytes), LOMO_STATUS_NULL_ARGUMENT);
    CHECK(lomo_accum_get(opt, &pending, &bytes));
    EXPECT(pending == 0 && bytes == 0);
    EXPECT_STATUS(lomo_step_begin(opt, LOMO_PHASE_ACCUMULATE, 0.5f, NULL), LOMO_STATUS_PHASE_ERROR);
    {
        uint64_t launches = 7;
        EXPECT_STATUS(lomo_cuda_launch_count(opt, &launches), LOMO_STATUS_UNSUPPORTED);
        EXPECT(launches == 7);
    }

    /* Step 1: SUM over three micro-batches (two ACCUMULATE phases, then the UPDATE). */
    CHECK(lomo_accum_enable(opt, LOMO_ACCUM_F32, LOMO_ACCUM_SUM));
    CHECK(lomo_accum_get(opt, &pending, &bytes));
    EXPECT(pending == 0 && bytes == 4 * (4 + 3));
    for (m = 0; m < 3; m++) {
        grads[0] = ga[m];
        grads[1] = gb[m];
        CHECK(lomo_step_begin(opt, m < 2 ? LOMO_PHASE_ACCUMULATE : LOMO_PHASE_UPDATE, 0.5f, NULL));
        if (m == 0) {
            /* Misuse inside a step: statuses, nothing changes. */
            const uint32_t dup[2] = {ids[0], ids[0]};
            const uint32_t unknown[2] = {ids[0], 42};
            const uint64_t bad[2] = {4, 4};
            const uint32_t baddt[2] = {LOMO_DTYPE_F32, 77};
            const void *nullg[2] = {ga[0], NULL};
            const void *dupg[2] = {ga[0], ga[1]};
            EXPECT_STATUS(lomo_grad_submit_batch(opt, 2, dup, dupg, dtypes, bad, NULL),
                          LOMO_STATUS_DUPLICATE_GRADIENT);
            EXPECT_STATUS(lomo_grad_submit_batch(opt, 2, unknown, grads, dtypes, counts, NULL),
                          LOMO_STATUS_UNKNOWN_PARAM);
            EXPECT_STATUS(lomo_grad_submit_batch(opt, 2, ids, grads, dtypes, bad, NULL),
                          LOMO_STATUS_INVALID_ARGUMENT);
            EXPECT_STATUS(lomo_grad_submit_batch(opt, 2, ids, grads, baddt, counts, NULL),
                          LOMO_STATUS_INVALID_ARGUMENT);
            EXPECT_STATUS(lomo_grad_submit_batch(opt, 2, ids, nullg, dtypes, counts, NULL),
                          LOMO_STATUS_NULL_ARGUMENT);
            EXPECT_STATUS(lomo_grad_submit_batch(opt, 2, NULL, grads, dtypes, counts, NULL),
                          LOMO_STATUS_NULL_ARGUMENT);
            CHECK(lomo_grad_submit_batch(opt, 0, NULL, NULL, NULL, NULL, NULL));
            EXPECT_STATUS(lomo_accum_enable(opt, LOMO_ACCUM_F32, LOMO_ACCUM_MEAN), LOMO_STATUS_PHASE_ERROR);
            EXPECT_STATUS(lomo_accum_disable(opt), LOMO_STATUS_PHASE_ERROR);
            {
                const int64_t st[1] = {1};
                EXPECT_STATUS(lomo_param_set_strides(opt, ids[0], 1, st), LOMO_STATUS_PHASE_ERROR);
            }
        }
        CHECK(lomo_grad_submit_batch(opt, 2, ids, grads, dtypes, counts, NULL));
        /* The whole batch again: already submitted in this phase. */
        EXPECT_STATUS(lomo_grad_submit_batch(opt, 2, ids, grads, dtypes, counts, NULL),
                      LOMO_STATUS_DUPLICATE_GRADIENT);
        if (m < 2) {
            /* ACCUMULATE phases write nothing. */
            const float a0[4] = {1.0f, -2.0f, 0.5f, 4.0f};
            EXPECT(same(a, a0, 4));
        }
        CHECK(lomo_step_end(opt, NULL));
        CHECK(lomo_accum_get(opt, &pending, &bytes));
        EXPECT(pending == (uint32_t)(m < 2 ? m + 1 : 0));
        if (m == 1) {
            EXPECT_STATUS(lomo_state_save(opt, "/tmp/lomo_accum_pending.safetensors"), LOMO_STATUS_PHASE_ERROR);
            EXPECT_STATUS(lomo_accum_disable(opt), LOMO_STATUS_PHASE_ERROR);
        }
    }
    {
        /* By hand: a - 0.5 (g1 + g2 + g3). */
        const float wa[4] = {1.0f - 0.5f * 1.0f, -2.0f - 0.5f * 2.0f, 0.5f - 0.5f * 1.0f, 4.0f - 0.5f * -2.0f};
        const float wb[3] = {0.25f - 0.5f * 0.5f, 8.0f - 0.5f * -0.75f, -1.0f - 0.5f * 4.0f};
        EXPECT(same(a, wa, 4) && same(b, wb, 3));
    }

    /* Step 2: MEAN over two micro-batches; a cancelled step before it leaves nothing behind. */
    CHECK(lomo_accum_enable(opt, LOMO_ACCUM_F32, LOMO_ACCUM_MEAN));
    grads[0] = ga[2];
    grads[1] = gb[2];
    CHECK(lomo_step_begin(opt, LOMO_PHASE_ACCUMULATE, 0.5f, NULL));
    CHECK(lomo_grad_submit_batch(opt, 2, ids, grads, dtypes, counts, NULL));
    CHECK(lomo_step_end(opt, NULL));
    CHECK(lomo_step_cancel(opt));
    CHECK(lomo_accum_get(opt, &pending, &bytes));
    EXPECT(pending == 0);
    memcpy(ea, a, sizeof ea);
    memcpy(eb, b, sizeof eb);
    for (m = 0; m < 2; m++) {
        grads[0] = ga[m];
        grads[1] = gb[m];
        CHECK(lomo_step_begin(opt, m == 0 ? LOMO_PHASE_ACCUMULATE : LOMO_PHASE_UPDATE, 0.5f, NULL));
        /* One parameter by batch, the other by a single submit. */
        CHECK(lomo_grad_submit_batch(opt, 1, &ids[m], &grads[m], dtypes, &counts[m], NULL));
        CHECK(lomo_grad_submit(opt, ids[1 - m], grads[1 - m], LOMO_DTYPE_F32, NULL));
        CHECK(lomo_step_end(opt, NULL));
    }
    for (i = 0; i < 4; i++) ea[i] -= 0.5f * ((ga[0][i] + ga[1][i]) / 2.0f);
    for (i = 0; i < 3; i++) eb[i] -= 0.5f * ((gb[0][i] + gb[1][i]) / 2.0f);
    EXPECT(same(a, ea, 4) && same(b, eb, 3));

    /* Accumulation off: a plain step again. */
    CHECK(lomo_accum_disable(opt));
    CHECK(lomo_accum_get(opt, &pending, &bytes));
    EXPECT(pending == 0 && bytes == 0);
    EXPECT_STATUS(lomo_step_begin(opt, LOMO_PHASE_ACCUMULATE, 0.5f, NULL), LOMO_STATUS_PHASE_ERROR);
    lomo_optimizer_free(opt);
    return 0;
}

/* AdaLomo's first two steps on a [R, C] matrix in double precision, from the formula: the
 * reference. `p`, `g` in logical (row-major) order; `row`, `col` the state. */
enum { R = 2, C = 4 };
static void adalomo_ref(double *p, const double *g, double *row, double *col, int t,
                        const lomo_config *cfg, double lr) {
    double beta = 1.0 - pow((double)t, cfg->decay_rate), mr = 0.0, su = 0.0, sp = 0.0, rms, s;
    double u[R * C];
    int i, j;
    for (i = 0; i < R; i++) {
        double m = 0.0;
        for (j = 0; j < C; j++) m += g[i * C + j] * g[i * C + j] + cfg->eps1;
        row[i] = beta * row[i] + (1.0 - beta) * m / C;
    }
    for (j = 0; j < C; j++) {
        double m = 0.0;
        for (i = 0; i < R; i++) m += g[i * C + j] * g[i * C + j] + cfg->eps1;
        col[j] = beta * col[j] + (1.0 - beta) * m / R;
    }
    for (i = 0; i < R; i++) mr += row[i] / R;
    for (i = 0; i < R * C; i++) {
        u[i] = g[i] / sqrt(row[i / C] * col[i % C] / mr);
        su += u[i] * u[i];
        sp += p[i] * p[i];
    }
    rms = sqrt(su / (R * C));
    s = lr * fmax(cfg->eps2, sqrt(sp / (R * C)));
    for (i = 0; i < R * C; i++) p[i] -= s * u[i] / fmax(1.0, rms / cfg->clip_threshold);
}

/* The matrix stored transposed (memory offset of logical (i, j) = i + R j: strides {1, R}),
 * gradients in the same layout, submitted by batch next to a contiguous vector. */
static int adalomo_transposed(void) {
    lomo_config cfg;
    lomo_optimizer *opt = make(LOMO_ALGORITHM_ADALOMO);
    const int64_t shape[2] = {R, C}, strides[2] = {1, R}, gap[2] = {1, R + 1}, vshape[1] = {3};
    const double g0[2][R * C] = {{0.5, -1.0, 0.25, 2.0, 1.5, 0.75, -3.0, 0.125},
                                 {-0.25, 2.0, 1.0, -0.5, 0.5, -1.5, 0.75, 1.0}};
    double p[R * C], row[R] = {0}, col[C] = {0}, swapped = 0.0;
    float mem[R * C], gmem[R * C], v[3] = {1.0f, -1.0f, 0.5f}, gv[3] = {0.5f, 0.5f, -0.5f};
    uint32_t ids[2];
    const uint32_t dtypes[2] = {LOMO_DTYPE_F32, LOMO_DTYPE_F32};
    const uint64_t counts[2] = {R * C, 3};
    const void *grads[2] = {gmem, gv};
    int t, i, j;
    EXPECT(opt != NULL);
    CHECK(lomo_config_init(&cfg, LOMO_ALGORITHM_ADALOMO));
    for (i = 0; i < R * C; i++) p[i] = (double)((i * 5) % 7 - 3) / 4.0;
    for (i = 0; i < R; i++)
        for (j = 0; j < C; j++) mem[i + R * j] = (float)p[i * C + j];
    CHECK(reg(opt, "w", mem, 2, shape, &ids[0]));
    CHECK(reg(opt, "v", v, 1, vshape, &ids[1]));
    {
        /* Refused layouts change nothing (the parameter stays contiguous until set). */
        const int64_t neg[2] = {-1, R};
        EXPECT_STATUS(lomo_param_set_strides(opt, ids[0], 2, gap), LOMO_STATUS_INVALID_ARGUMENT);
        EXPECT_STATUS(lomo_param_set_strides(opt, ids[0], 2, neg), LOMO_STATUS_INVALID_ARGUMENT);
        EXPECT_STATUS(lomo_param_set_strides(opt, ids[0], 1, strides), LOMO_STATUS_INVALID_ARGUMENT);
        EXPECT_STATUS(lomo_param_set_strides(opt, ids[0], 2, NULL), LOMO_STATUS_NULL_ARGUMENT);
        EXPECT_STATUS(lomo_param_set_strides(opt, 99, 2, strides), LOMO_STATUS_UNKNOWN_PARAM);
        EXPECT_STATUS(lomo_param_set_strides(NULL, ids[0], 2, strides), LOMO_STATUS_NULL_ARGUMENT);
    }
    CHECK(lomo_param_set_strides(opt, ids[0], 2, strides));
    {
        lomo_memory_stats ms;
        memset(&ms, 0, sizeof ms);
        ms.struct_size = sizeof ms;
        CHECK(lomo_memory_stats_get(opt, &ms));
        /* The logical-order scratch: numel * (4 + 4) bytes. */
        EXPECT(ms.workspace_bytes >= R * C * 8);
    }
    for (t = 1; t <= 2; t++) {
        for (i = 0; i < R; i++)
            for (j = 0; j < C; j++) gmem[i + R * j] = (float)g0[t - 1][i * C + j];
        CHECK(lomo_step_begin(opt, LOMO_PHASE_UPDATE, 0.25f, NULL));
        CHECK(lomo_grad_submit_batch(opt, 2, ids, grads, dtypes, counts, NULL));
        CHECK(lomo_step_end(opt, NULL));
        adalomo_ref(p, g0[t - 1], row, col, t, &cfg, 0.25);
    }
    for (i = 0; i < R; i++)
        for (j = 0; j < C; j++) {
            double want = p[i * C + j], got = mem[i + R * j];
            if (fabs(got - want) > 1e-6 * fmax(1.0, fabs(want))) {
                fprintf(stderr, "AdaLomo transposed (%d, %d): %.9g, reference %.9g\n", i, j, got, want);
                return 1;
            }
            /* The test can tell layouts apart: the row-major reading differs. */
            swapped = fmax(swapped, fabs(mem[i * C + j] - want));
        }
    EXPECT(swapped > 1e-3);
    lomo_optimizer_free(opt);
    return 0;
}

int main(void) {
    if (lomo_accumulation_and_batch() != 0) return 1;
    if (adalomo_transposed() != 0) return 1;
    printf("accum_strides_batch ok\n");
    return 0;
}
