/* Distributed AdaLomo from C: threads as ranks, an in-process all-reduce as the communicator.
 *
 * A linear model y = x W + b (W: [ROWS, COLS], b: [COLS]) learns a fixed target map by least
 * squares. The global batch is split over N ranks (data parallel) and W is split by rows over
 * the same ranks (FSDP-style, LOMO_LAYOUT_ROWS, torch.chunk's rule: with 4 ranks the last piece
 * is empty); b is replicated on every rank (LOMO_LAYOUT_FULL, LOMO_SHARD_NORM_DUPLICATE on all
 * ranks but 0, so its Σg² is counted once). Each step every rank
 *   1. all-gathers W from the pieces (the caller's job, as FSDP's),
 *   2. computes the gradient of its own samples for the whole W and b,
 *   3. reduce-scatters the W gradient to its rows and all-reduces the b gradient (the caller's
 *      job: the pieces are submitted with LOMO_GRAD_REDUCED),
 *   4. runs AdaLomo with global-norm clipping: a NORM phase and an UPDATE phase, submitting the
 *      same gradients in the same order on every rank. Inside, the library calls this program's
 *      all_reduce callback: once per W piece per UPDATE submission (AdaLomo's row and column
 *      statistics) and once per phase end (the step's scalars, lomo_dist_set's norm group).
 * The assembled W and b must equal one optimizer holding the whole model and stepping on the
 * whole batch: within |a - b| <= 1e-5 * max(1, |b|) (f32: the sums run in another order; the
 * largest difference seen is a few ulps), and every rank must report the same gradient norm
 * as the others, bit for bit, and within 1e-5 relative of the single-rank one.
 *
 * Build (after `cargo build --release`; tests/c_smoke.rs builds and runs it the same way):
 *   cc -std=c99 -Wall -Wextra -Wpedantic -Werror -Iinclude examples/c/dist_threads.c \
 *      -Ltarget/release -llomo -lm -pthread -Wl,-rpath,$PWD/target/release -o dist_threads
 *   ./dist_threads            # 1, 2, 3 and 4 ranks
 * Exit status 0 when every run matches. */
#define _POSIX_C_SOURCE 200809L

#include "dist_model.h"
#include "lomo.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_RANKS 4

/* ---- the in-process group: a barrier and one published pointer per rank ------------------- */

typedef struct group {
    int n;
    pthread_barrier_t barrier;
    const void *slot[MAX_RANKS]; /* what each rank publishes for the current collective */
    long slot_a[MAX_RANKS];      /* its first row (all-gather) */
    long slot_b[MAX_RANKS];      /* its end row */
} group;

typedef struct rank_ctx {
    group *g;
    int rank;
} rank_ctx;

/* lomo_comm.all_reduce: sums (or maxes) in rank order into a private copy, so every rank gets
 * the same bits; the second barrier keeps a rank from overwriting its buffer while another
 * still reads it. */
static int32_t all_reduce(void *user, void *buf, size_t count, uint32_t dtype, uint32_t op,
                          void *stream) {
    rank_ctx *ctx = user;
    group *g = ctx->g;
    size_t elem = dtype == LOMO_DTYPE_F64 ? sizeof(double) : sizeof(float);
    (void)stream; /* NULL for CPU parameters */
    if ((dtype != LOMO_DTYPE_F64 && dtype != LOMO_DTYPE_F32) ||
        (op != LOMO_REDUCE_SUM && op != LOMO_REDUCE_MAX))
        return 2; /* the library reports it as LOMO_STATUS_COMM_ERROR */
    void *out = malloc(count * elem + 1);
    if (out == NULL) return 3;
    g->slot[ctx->rank] = buf;
    pthread_barrier_wait(&g->barrier);
    for (size_t k = 0; k < count; k++) {
        double acc = 0;
        for (int r = 0; r < g->n; r++) {
            double v = dtype == LOMO_DTYPE_F64 ? ((const double *)g->slot[r])[k]
                                               : ((const float *)g->slot[r])[k];
            acc = r == 0 ? v : op == LOMO_REDUCE_SUM ? acc + v : fmax(acc, v);
        }
        if (dtype == LOMO_DTYPE_F64)
            ((double *)out)[k] = acc;
        else
            ((float *)out)[k] = (float)acc;
    }
    pthread_barrier_wait(&g->barrier);
    memcpy(buf, out, count * elem);
    free(out);
    return 0;
}

/* The trainer's own collectives (not the library's): all-gather W's rows, reduce-scatter a
 * full-W gradient to this rank's rows. */
static void all_gather_rows(rank_ctx *ctx, const float *piece, long a, long b, float *full) {
    group *g = ctx->g;
    g->slot[ctx->rank] = piece;
    g->slot_a[ctx->rank] = a;
    g->slot_b[ctx->rank] = b;
    pthread_barrier_wait(&g->barrier);
    for (int r = 0; r < g->n; r++)
        if (g->slot_b[r] > g->slot_a[r])
            memcpy(full + g->slot_a[r] * COLS, g->slot[r],
                   (size_t)(g->slot_b[r] - g->slot_a[r]) * COLS * sizeof(float));
    pthread_barrier_wait(&g->barrier);
}

static void reduce_scatter_rows(rank_ctx *ctx, const double *full, long a, long b, float *piece) {
    group *g = ctx->g;
    g->slot[ctx->rank] = full;
    pthread_barrier_wait(&g->barrier);
    for (long k = a * COLS; k < b * COLS; k++) {
        double acc = 0;
        for (int r = 0; r < g->n; r++) acc += ((const double *)g->slot[r])[k];
        piece[k - a * COLS] = (float)acc;
    }
    pthread_barrier_wait(&g->barrier);
}


/* ---- one rank ------------------------------------------------------------------------------ */

typedef struct rank_result {
    float w[ROWS * COLS]; /* this rank writes its rows */
    float b[COLS];
} rank_result;

typedef struct rank_args {
    rank_ctx ctx;
    rank_result *res; /* shared: every rank writes its own rows of res->w */
    float *norms;     /* [STEPS] of this rank */
    double *losses;   /* [STEPS] of this rank's samples */
    int clipped;      /* steps whose clip coefficient was below 1 */
    int *failed;
} rank_args;

#define CHECK(call)                                                                  \
    do {                                                                             \
        lomo_status st_ = (call);                                                    \
        if (st_ != LOMO_STATUS_OK) {                                                 \
            char msg_[256];                                                          \
            lomo_last_error_message(msg_, sizeof msg_);                              \
            fprintf(stderr, "rank %d: %s:%d: %s: %s\n", rank, __FILE__, __LINE__,    \
                    lomo_status_str(st_), msg_);                                     \
            goto fail;                                                               \
        }                                                                            \
    } while (0)


/* n == 0: one optimizer holding everything, the whole batch, no communicator (the reference). */
static void *run_rank(void *arg) {
    rank_args *ra = arg;
    int rank = ra->ctx.rank, n = ra->ctx.g ? ra->ctx.g->n : 0;
    long a = 0, b = ROWS;
    int s0 = 0, s1 = BATCH;
    if (n > 0) {
        long sa, sb;
        split(ROWS, n, rank, &a, &b);
        split(BATCH, n, rank, &sa, &sb);
        s0 = (int)sa;
        s1 = (int)sb;
    }
    float piece[ROWS * COLS + 1], bias[COLS], full_w[ROWS * COLS];
    float gpiece[ROWS * COLS + 1], gbias[COLS];
    double gw[ROWS * COLS], gb[COLS];
    memcpy(piece, W0 + a * COLS, (size_t)(b - a) * COLS * sizeof(float));
    memcpy(bias, B0, sizeof bias);

    lomo_optimizer *opt = new_adalomo();
    lomo_status st = LOMO_STATUS_OK;
    if (opt == NULL) {
        fprintf(stderr, "rank %d: optimizer\n", rank);
        *ra->failed = 1;
        return NULL;
    }
    int64_t wshape[2] = {b - a, COLS}, bshape[1] = {COLS};
    uint32_t wid = register_param(opt, "w", piece, 2, wshape, &st);
    CHECK(st);
    uint32_t bid = register_param(opt, "b", bias, 1, bshape, &st);
    CHECK(st);
    if (n > 0) {
        lomo_comm c;
        memset(&c, 0, sizeof c);
        c.struct_size = sizeof c;
        c.rank = (uint32_t)rank;
        c.size = (uint32_t)n;
        c.user = &ra->ctx; /* outlives the optimizer: no destroy callback */
        c.all_reduce = all_reduce;
        uint32_t comm = 0;
        CHECK(lomo_comm_add(opt, &c, &comm));

        int64_t wglobal[2] = {ROWS, COLS};
        lomo_shard_desc s;
        memset(&s, 0, sizeof s);
        s.struct_size = sizeof s;
        s.layout = LOMO_LAYOUT_ROWS;
        s.global_ndim = 2;
        s.global_shape = wglobal;
        s.offset = a;
        s.piece_comm = comm;
        s.grad_mode = LOMO_GRAD_REDUCED;
        s.grad_comm = LOMO_COMM_NONE;
        CHECK(lomo_param_set_shard(opt, wid, &s));

        s.layout = LOMO_LAYOUT_FULL;
        s.global_ndim = 1;
        s.global_shape = bshape;
        s.offset = 0;
        s.piece_comm = LOMO_COMM_NONE;
        s.flags = rank == 0 ? 0 : LOMO_SHARD_NORM_DUPLICATE;
        CHECK(lomo_param_set_shard(opt, bid, &s));

        CHECK(lomo_dist_set(opt, comm, LOMO_DIST_CHECK));
    }

    for (int step = 0; step < STEPS; step++) {
        memset(gw, 0, sizeof gw);
        memset(gb, 0, sizeof gb);
        if (n > 0) {
            all_gather_rows(&ra->ctx, piece, a, b, full_w);
            ra->losses[step] = grad(full_w, bias, s0, s1, gw, gb);
            reduce_scatter_rows(&ra->ctx, gw, a, b, gpiece);
            for (int c = 0; c < COLS; c++) gbias[c] = (float)gb[c];
            if (all_reduce(&ra->ctx, gbias, COLS, LOMO_DTYPE_F32, LOMO_REDUCE_SUM, NULL) != 0) {
                fprintf(stderr, "rank %d: all_reduce\n", rank);
                goto fail;
            }
        } else {
            ra->losses[step] = grad(piece, bias, 0, BATCH, gw, gb);
            for (int k = 0; k < ROWS * COLS; k++) gpiece[k] = (float)gw[k];
            for (int c = 0; c < COLS; c++) gbias[c] = (float)gb[c];
        }
        /* Every rank submits both parameters, in the same order, in both phases. */
        CHECK(lomo_step_begin(opt, LOMO_PHASE_NORM, LR(step), NULL));
        CHECK(lomo_grad_submit(opt, wid, gpiece, LOMO_DTYPE_F32, NULL));
        CHECK(lomo_grad_submit(opt, bid, gbias, LOMO_DTYPE_F32, NULL));
        CHECK(lomo_step_end(opt, NULL));
        CHECK(lomo_step_begin(opt, LOMO_PHASE_UPDATE, LR(step), NULL));
        CHECK(lomo_grad_submit(opt, wid, gpiece, LOMO_DTYPE_F32, NULL));
        CHECK(lomo_grad_submit(opt, bid, gbias, LOMO_DTYPE_F32, NULL));
        CHECK(lomo_step_end(opt, NULL));
        lomo_step_info info;
        memset(&info, 0, sizeof info);
        info.struct_size = sizeof info;
        CHECK(lomo_step_info_get(opt, &info));
        ra->norms[step] = info.grad_norm;
        ra->clipped += info.clip_coef < 1.0f;
    }
    memcpy(ra->res->w + a * COLS, piece, (size_t)(b - a) * COLS * sizeof(float));
    if (rank == 0) memcpy(ra->res->b, bias, sizeof bias);
    lomo_optimizer_free(opt);
    return NULL;
fail:
    *ra->failed = 1;
    lomo_optimizer_free(opt);
    return NULL;
}

static int close_enough(float got, float want) {
    return fabs((double)got - want) <= TOL * fmax(1.0, fabs((double)want));
}

/* Runs n ranks and compares with the reference; returns 0 when they match. */
static int run_ranks(int n, const rank_result *ref, const float *ref_norms, int ref_clipped) {
    group g;
    pthread_t th[MAX_RANKS];
    rank_args args[MAX_RANKS];
    float norms[MAX_RANKS][STEPS];
    double losses[MAX_RANKS][STEPS];
    int failed = 0;
    rank_result res;
    memset(&res, 0, sizeof res);
    memset(&g, 0, sizeof g);
    g.n = n;
    pthread_barrier_init(&g.barrier, NULL, (unsigned)n);
    for (int r = 0; r < n; r++) {
        args[r].ctx.g = &g;
        args[r].ctx.rank = r;
        args[r].res = &res;
        args[r].norms = norms[r];
        args[r].losses = losses[r];
        args[r].failed = &failed;
        args[r].clipped = 0;
        pthread_create(&th[r], NULL, run_rank, &args[r]);
    }
    for (int r = 0; r < n; r++) pthread_join(th[r], NULL);
    pthread_barrier_destroy(&g.barrier);
    if (failed) return 1;

    double worst = 0;
    int bad = 0;
    for (int k = 0; k < ROWS * COLS + COLS; k++) {
        float got = k < ROWS * COLS ? res.w[k] : res.b[k - ROWS * COLS];
        float want = k < ROWS * COLS ? ref->w[k] : ref->b[k - ROWS * COLS];
        worst = fmax(worst, fabs((double)got - want));
        if (!close_enough(got, want)) {
            fprintf(stderr, "%d ranks: element %d: %.9g, one rank %.9g\n", n, k, got, want);
            bad = 1;
        }
    }
    for (int s = 0; s < STEPS; s++) {
        for (int r = 1; r < n; r++)
            if (memcmp(&norms[r][s], &norms[0][s], sizeof(float)) != 0) {
                fprintf(stderr, "%d ranks: step %d: rank %d norm %.9g, rank 0 %.9g\n", n, s, r,
                        norms[r][s], norms[0][s]);
                bad = 1;
            }
        if (!close_enough(norms[0][s], ref_norms[s])) {
            fprintf(stderr, "%d ranks: step %d: norm %.9g, one rank %.9g\n", n, s, norms[0][s],
                    ref_norms[s]);
            bad = 1;
        }
    }
    for (int r = 0; r < n; r++)
        if (args[r].clipped != ref_clipped) {
            fprintf(stderr, "%d ranks: rank %d clipped %d steps, one rank %d\n", n, r,
                    args[r].clipped, ref_clipped);
            bad = 1;
        }
    double first = 0, last = 0;
    for (int r = 0; r < n; r++) {
        first += losses[r][0];
        last += losses[r][STEPS - 1];
    }
    printf("%d ranks: loss %.4f -> %.4f, max |difference| from one rank %.3g (tolerance %g "
           "relative), grad norms identical on every rank\n",
           n, first / BATCH, last / BATCH, worst, TOL);
    return bad;
}

int main(void) {
    make_data();
    if (lomo_abi_version() != LOMO_ABI_VERSION) {
        fprintf(stderr, "library ABI %u, header %u\n", lomo_abi_version(), LOMO_ABI_VERSION);
        return 1;
    }
    /* The reference: one rank, the whole model, the whole batch. */
    rank_result ref;
    float ref_norms[STEPS];
    double ref_losses[STEPS];
    int failed = 0;
    memset(&ref, 0, sizeof ref);
    rank_args ra = {{NULL, 0}, &ref, ref_norms, ref_losses, 0, &failed};
    run_rank(&ra);
    if (failed) return 1;
    if (!(ref_losses[STEPS - 1] < 0.5 * ref_losses[0])) {
        fprintf(stderr, "the reference did not learn: loss %g -> %g\n", ref_losses[0],
                ref_losses[STEPS - 1]);
        return 1;
    }
    /* Clipping must matter: the first steps clip, the last ones do not. */
    if (ra.clipped == 0 || ra.clipped == STEPS) {
        fprintf(stderr, "the reference clipped %d of %d steps\n", ra.clipped, STEPS);
        return 1;
    }
    printf("one rank: loss %.4f -> %.4f, %d of %d steps clipped\n", ref_losses[0] / BATCH,
           ref_losses[STEPS - 1] / BATCH, ra.clipped, STEPS);
    int bad = 0;
    for (int n = 1; n <= MAX_RANKS; n++) bad |= run_ranks(n, &ref, ref_norms, ra.clipped);
    if (bad) return 1;
    printf("dist_threads ok\n");
    return 0;
}
