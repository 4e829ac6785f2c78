/* Distributed AdaLomo from C with MPI: the toy problem of dist_threads.c (dist_model.h), one
 * process per rank, MPI as the communicator behind the lomo_comm callbacks.
 *
 * W is split by rows over the ranks (LOMO_LAYOUT_ROWS, torch.chunk's rule), b is replicated
 * (LOMO_LAYOUT_FULL, LOMO_SHARD_NORM_DUPLICATE on all ranks but 0), the batch is split over the
 * ranks. Each step every rank all-gathers W (MPI_Allgatherv), computes the gradient of its
 * samples, reduce-scatters it to its rows (MPI_Reduce_scatter) and all-reduces b's, then runs a
 * NORM and an UPDATE phase (global-norm clipping) on its pieces; the library calls all_reduce()
 * below for AdaLomo's statistics and the phase-end records. Rank 0 then gathers W and compares
 * with one optimizer stepping on the whole batch: |a - b| <= 1e-5 * max(1, |b|), gradient norms
 * equal on every rank.
 *
 * The callback reduces to rank 0 and broadcasts (MPI_Reduce + MPI_Bcast) instead of calling
 * MPI_Allreduce: the library needs the same bits on every rank (its replicated statistics must
 * not drift apart), and MPI_Allreduce only recommends it (MPI 4.0, §6.9.1, advice to
 * implementors); a rooted reduction guarantees it.
 *
 * Build and run (Debian: apt-get install mpich libmpich-dev; after cargo build --release):
 *   mpicc -std=c99 -Wall -Wextra -Wpedantic -Werror -Iinclude examples/c/dist_mpi.c \
 *         -Ltarget/release -llomo -lm -Wl,-rpath,$PWD/target/release -o dist_mpi
 *   mpiexec -n 3 ./dist_mpi
 * tests/c_smoke.rs does this with 1 to 4 processes when mpicc and mpiexec are installed. */
#include "dist_model.h"
#include "lomo.h"

#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int32_t all_reduce(void *user, void *buf, size_t count, uint32_t dtype, uint32_t op,
                          void *stream) {
    MPI_Comm comm = *(MPI_Comm *)user;
    MPI_Datatype t = dtype == LOMO_DTYPE_F64 ? MPI_DOUBLE : MPI_FLOAT;
    int rank;
    (void)stream; /* NULL for CPU parameters */
    if ((dtype != LOMO_DTYPE_F64 && dtype != LOMO_DTYPE_F32) ||
        (op != LOMO_REDUCE_SUM && op != LOMO_REDUCE_MAX) || count > (size_t)0x7fffffff)
        return 2; /* the library reports it as LOMO_STATUS_COMM_ERROR */
    MPI_Comm_rank(comm, &rank);
    int rc = MPI_Reduce(rank == 0 ? MPI_IN_PLACE : buf, buf, (int)count, t,
                        op == LOMO_REDUCE_SUM ? MPI_SUM : MPI_MAX, 0, comm);
    if (rc == MPI_SUCCESS) rc = MPI_Bcast(buf, (int)count, t, 0, comm);
    return rc == MPI_SUCCESS ? 0 : rc;
}

#define CHECK(call)                                                                  \
    do {                                                                             \
        lomo_status st_ = (call);                                                    \
        if (st_ != LOMO_STATUS_OK) {                                                 \
            char msg_[256];                                                          \
            lomo_last_error_message(msg_, sizeof msg_);                              \
            fprintf(stderr, "rank %d: %s:%d: %s: %s\n", rank, __FILE__, __LINE__,    \
                    lomo_status_str(st_), msg_);                                     \
            MPI_Abort(MPI_COMM_WORLD, 1);                                            \
        }                                                                            \
    } while (0)

/* Trains W rows [a, b) and b on samples [s0, s1); n == 0: alone (the reference). Writes the
 * gradient norm of every step to norms. */
static void train(int rank, int n, MPI_Comm *comm, float *piece, float *bias, float *norms) {
    long a = 0, b = ROWS, s0 = 0, s1 = BATCH;
    int counts[64], displs[64];
    if (n > 0) {
        split(ROWS, n, rank, &a, &b);
        split(BATCH, n, rank, &s0, &s1);
        for (int r = 0; r < n; r++) {
            long ra, rb;
            split(ROWS, n, r, &ra, &rb);
            counts[r] = (int)((rb - ra) * COLS);
            displs[r] = (int)(ra * COLS);
        }
    }
    float full_w[ROWS * COLS], gpiece[ROWS * COLS + 1], gbias[COLS];
    double gw[ROWS * COLS], gb[COLS], gpiece64[ROWS * COLS + 1];
    memcpy(piece, W0 + a * COLS, (size_t)(b - a) * COLS * sizeof(float));
    memcpy(bias, B0, COLS * sizeof(float));
    lomo_optimizer *opt = new_adalomo();
    lomo_status st = LOMO_STATUS_OK;
    if (opt == NULL) MPI_Abort(MPI_COMM_WORLD, 1);
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
        c.user = comm;
        c.all_reduce = all_reduce;
        uint32_t cid = 0;
        CHECK(lomo_comm_add(opt, &c, &cid));
        int64_t wglobal[2] = {ROWS, COLS};
        lomo_shard_desc s;
        memset(&s, 0, sizeof s);
        s.struct_size = sizeof s;
        s.layout = LOMO_LAYOUT_ROWS;
        s.global_ndim = 2;
        s.global_shape = wglobal;
        s.offset = a;
        s.piece_comm = cid;
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
        CHECK(lomo_dist_set(opt, cid, LOMO_DIST_CHECK));
    }
    for (int step = 0; step < STEPS; step++) {
        memset(gw, 0, sizeof gw);
        memset(gb, 0, sizeof gb);
        if (n > 0) {
            MPI_Allgatherv(piece, counts[rank], MPI_FLOAT, full_w, counts, displs, MPI_FLOAT,
                           *comm);
            grad(full_w, bias, (int)s0, (int)s1, gw, gb);
            MPI_Reduce_scatter(gw, gpiece64, counts, MPI_DOUBLE, MPI_SUM, *comm);
            for (long k = 0; k < (b - a) * COLS; k++) gpiece[k] = (float)gpiece64[k];
            for (int c = 0; c < COLS; c++) gbias[c] = (float)gb[c];
            if (all_reduce(comm, gbias, COLS, LOMO_DTYPE_F32, LOMO_REDUCE_SUM, NULL) != 0)
                MPI_Abort(MPI_COMM_WORLD, 1);
        } else {
            grad(piece, bias, 0, BATCH, gw, gb);
            for (int k = 0; k < ROWS * COLS; k++) gpiece[k] = (float)gw[k];
            for (int c = 0; c < COLS; c++) gbias[c] = (float)gb[c];
        }
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
        norms[step] = info.grad_norm;
    }
    if (n > 0) /* assemble W on rank 0 (its own rows are already in place) */
        MPI_Gatherv(rank == 0 ? MPI_IN_PLACE : piece, counts[rank], MPI_FLOAT,
                    rank == 0 ? piece : NULL, counts, displs, MPI_FLOAT, 0, *comm);
    lomo_optimizer_free(opt);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm comm = MPI_COMM_WORLD;
    int rank, n;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &n);
    if (n > 64) {
        if (rank == 0) fprintf(stderr, "at most 64 ranks\n");
        MPI_Abort(comm, 1);
    }
    make_data();
    float w[ROWS * COLS], b[COLS], norms[STEPS];
    train(rank, n, &comm, w, b, norms);

    /* every rank reports the same norms: compare each with rank 0's */
    float norms0[STEPS];
    memcpy(norms0, norms, sizeof norms);
    MPI_Bcast(norms0, STEPS, MPI_FLOAT, 0, comm);
    int bad = memcmp(norms0, norms, sizeof norms) != 0;
    if (bad) fprintf(stderr, "rank %d: gradient norms differ from rank 0's\n", rank);
    if (rank == 0) {
        float rw[ROWS * COLS], rb[COLS], rnorms[STEPS];
        double worst = 0;
        train(0, 0, NULL, rw, rb, rnorms);
        for (int k = 0; k < ROWS * COLS + COLS; k++) {
            float got = k < ROWS * COLS ? w[k] : b[k - ROWS * COLS];
            float want = k < ROWS * COLS ? rw[k] : rb[k - ROWS * COLS];
            worst = fmax(worst, fabs((double)got - want));
            if (fabs((double)got - want) > TOL * fmax(1.0, fabs((double)want))) {
                fprintf(stderr, "element %d: %.9g, one rank %.9g\n", k, got, want);
                bad = 1;
            }
        }
        for (int s = 0; s < STEPS; s++)
            if (fabs((double)norms[s] - rnorms[s]) > TOL * fabs((double)rnorms[s])) {
                fprintf(stderr, "step %d: norm %.9g, one rank %.9g\n", s, norms[s], rnorms[s]);
                bad = 1;
            }
        printf("%d MPI ranks: max |difference| from one rank %.3g (tolerance %g relative)\n", n,
               worst, TOL);
    }
    int any = 0;
    MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, comm);
    if (rank == 0 && !any) printf("dist_mpi ok\n");
    MPI_Finalize();
    return any;
}
