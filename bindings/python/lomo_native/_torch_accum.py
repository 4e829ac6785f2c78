"""Gradient accumulation for the PyTorch drop-ins, in the library (``lomo_accum_enable``).

``Lomo(model, ..., accumulation_steps=k)`` (or ``set_accumulation(k)``): ``fused_backward`` on
the first k - 1 micro-batches of a step adds each gradient, the moment it is complete, to the
parameter's accumulation buffer (an ACCUMULATE phase; the gradient is dropped as on the fused
path, nothing is updated), and on the k-th applies the update with the summed gradient (or the
mean, ``accumulation_reduction="mean"``): equal to one step on the concatenated batch, with
norm clipping (``grad_norm`` is a no-op on the first k - 1 micro-batches; on the last it
computes the norm of the accumulated gradients), loss scaling and overflow skipping of one
step. As with ``.grad`` accumulation in torch, the micro-batches' gradients are *summed*:
divide each micro-batch's loss by k for the mean of per-micro-batch mean losses.

Memory: one buffer per trained parameter, ``accumulation_buffer="f32"`` (4 bytes per element)
or ``"param"`` (the parameter's dtype: 2 bytes for bf16/fp16; every partial sum is rounded to
it), counted in ``memory_stats()["workspace_bytes"]``. That is what the non-fused path
(``backward()`` + ``step()``) costs too (a ``.grad`` per parameter, in its dtype) — but here the
gradients never pile up during the backward, the update keeps the fused path's per-parameter
timing, and the buffer can be f32 for bf16 models. The buffers live on the parameters'
device (CUDA: device memory, every pass on the current stream).

Distributed: with a ``process_group`` (replicas) each micro-batch's gradient is averaged across
the ranks from its hook as it is accumulated (one all-reduce per micro-batch, as DDP without
``no_sync``). With FSDP2 (``fully_shard``) each micro-batch's reduce-scattered shard gradient is
accumulated in the piece's buffer, and on the last micro-batch the library runs the pieces'
passes (and AdaLomo's statistics all-reduces) at the phase's end in parameter order. Either way
the ranks' k micro-batches step as one process on the whole global batch
(``tests/test_torch_dist_accum.py``).
"""

from __future__ import annotations

from typing import Optional

from . import _native as N

_BUFFERS = ("f32", "param")
_REDUCTIONS = ("sum", "mean")


class Accumulation:
    """Mixin of ``_FusedOptimizer``: the accumulation counter and the ACCUMULATE backward."""

    accumulation_steps = 1
    _micro = 0

    def set_accumulation(self, steps: int, buffer: str = "f32", reduction: str = "sum") -> None:
        """Accumulate ``steps`` micro-batches per update in the library (1 turns it off and
        frees the buffers). ``buffer``: ``"f32"`` or ``"param"``; ``reduction``: ``"sum"`` or
        ``"mean"``. Between steps only (no micro-batch pending)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1, got {steps!r}")
        if buffer not in _BUFFERS:
            raise ValueError(f"accumulation_buffer={buffer!r}: expected one of {_BUFFERS}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"accumulation_reduction={reduction!r}: expected one of "
                             f"{_REDUCTIONS}")
        if self._micro or self._phase is not None or self._norm_pending:
            raise RuntimeError("set_accumulation() must be called between steps")
        if steps > 1:
            self._native.accum_enable(buffer, reduction)
        else:
            self._native.accum_disable()
        self.accumulation_steps = steps
        self.accumulation_buffer = buffer
        self.accumulation_reduction = reduction

    def _accumulating(self, accumulate: Optional[bool]) -> bool:
        """Whether this micro-batch only accumulates: ``accumulate`` when given, else the
        counter (the first ``accumulation_steps - 1`` micro-batches of a step)."""
        if accumulate is not None:
            if accumulate and self.accumulation_steps == 1:
                raise RuntimeError("accumulate=True needs accumulation buffers: pass "
                                   "accumulation_steps=k or call set_accumulation(k)")
            return bool(accumulate)
        return self._micro < self.accumulation_steps - 1

    def _accumulate_backward(self, loss) -> None:
        """One ACCUMULATE backward: each gradient is added to its buffer by the hooks."""
        if self._norm_pending:
            self._finish_pending()
        self._sync_model()
        stream = self._stream()
        self._native.begin(N.PHASE_ACCUMULATE, 0.0, stream)
        try:
            self._backward(loss, N.PHASE_ACCUMULATE, retain_graph=False)
        except BaseException:
            self._micro = 0  # _backward cancelled the step: the buffers were emptied
            raise
        self._native.end(stream)
        self._micro += 1
