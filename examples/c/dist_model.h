/* The toy problem of examples/c/dist_threads.c and dist_mpi.c: a linear model y = x W + b
 * (W: [ROWS, COLS], b: [COLS]) fitting fixed random targets by least squares, the data, the
 * split of rows and samples over ranks, and the AdaLomo optimizer both examples use. */
#ifndef LOMO_EXAMPLE_DIST_MODEL_H
#define LOMO_EXAMPLE_DIST_MODEL_H

#include "lomo.h"

#include <string.h>

#define ROWS 9
#define COLS 5
#define BATCH 12
#define STEPS 30
#define TOL 1e-5

/* ---- the model and the data ---------------------------------------------------------------- */

static float W0[ROWS * COLS], B0[COLS], X[BATCH * ROWS], T[BATCH * COLS];

static void make_data(void) {
    unsigned s = 12345;
#define RND() ((s = s * 1103515245u + 12345u), ((float)((s >> 8) & 0xffff) / 32768.0f - 1.0f))
    for (int k = 0; k < ROWS * COLS; k++) W0[k] = 0.3f * RND();
    for (int k = 0; k < COLS; k++) B0[k] = 0.1f * RND();
    for (int k = 0; k < BATCH * ROWS; k++) X[k] = RND();
    for (int k = 0; k < BATCH * COLS; k++) T[k] = RND();
#undef RND
}

/* Adds the gradient of 0.5 * mean over the whole batch of |x W + b - t|² for samples [s0, s1)
 * to gw ([ROWS*COLS]) and gb ([COLS]) (both zeroed by the caller); returns their loss sum. */
static double grad(const float *w, const float *b, int s0, int s1, double *gw, double *gb) {
    double loss = 0;
    for (int i = s0; i < s1; i++) {
        for (int c = 0; c < COLS; c++) {
            double y = b[c];
            for (int r = 0; r < ROWS; r++) y += (double)X[i * ROWS + r] * w[r * COLS + c];
            double e = y - T[i * COLS + c];
            loss += 0.5 * e * e;
            gb[c] += e / BATCH;
            for (int r = 0; r < ROWS; r++) gw[r * COLS + c] += X[i * ROWS + r] * e / BATCH;
        }
    }
    return loss;
}

/* torch.chunk's split of `units` over `n` ranks. */
static void split(long units, int n, int r, long *a, long *b) {
    long per = (units + n - 1) / n;
    *a = r * per < units ? r * per : units;
    *b = (r + 1) * per < units ? (r + 1) * per : units;
}

static float LR(int step) { return step < 20 ? 0.1f : 0.05f; }

static lomo_optimizer *new_adalomo(void) {
    lomo_config cfg;
    lomo_optimizer *opt = NULL;
    if (lomo_config_init(&cfg, LOMO_ALGORITHM_ADALOMO) != LOMO_STATUS_OK) return NULL;
    cfg.loss_scale_mode = LOMO_LOSS_SCALE_NONE; /* f32 gradients: no scaling (default 1024) */
    cfg.clip_grad_norm = 0.5; /* global: the ranks agree on Σg² at the NORM phase's end */
    cfg.weight_decay = 0.01;
    if (lomo_optimizer_new(&cfg, &opt) != LOMO_STATUS_OK) return NULL;
    return opt;
}

static uint32_t register_param(lomo_optimizer *opt, const char *name, float *data, uint32_t ndim,
                               const int64_t *shape, lomo_status *st) {
    lomo_param_desc d;
    uint32_t id = 0;
    memset(&d, 0, sizeof d);
    d.struct_size = sizeof d;
    d.name = name;
    d.data = data;
    d.dtype = LOMO_DTYPE_F32;
    d.ndim = ndim;
    d.shape = shape;
    d.device = LOMO_DEVICE_CPU;
    *st = lomo_param_register(opt, &d, &id);
    return id;
}

#endif
