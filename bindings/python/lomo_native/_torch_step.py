"""The non-fused path of ``lomo_native.torch``: ``step()`` applies the gradients that a plain
``loss.backward()`` left in ``.grad``.

This is what lets any trainer that calls ``backward()`` then ``optimizer.step()`` (the stock
``transformers.Trainer``, ``accelerate``, a hand-written PyTorch loop, gradient accumulation over
several backwards) use the library. The update is the fused path's, through the same C API
protocol: with ``clip_grad_norm`` set (or ``two_pass``) a NORM phase submits every ``.grad`` first,
then an UPDATE phase submits them again; so clipping, the overflow skip and the dynamic loss
scaler behave exactly as in ``fused_backward``.

Loss scale. The library divides what it receives by its loss scale S. ``.grad`` holds gradients of
the loss multiplied by ``opt.scale_loss``'s factor if the loop used it (then they are submitted as
they are: the fused path's numerics bit for bit, as the fused backward computes the same scaled
gradients), else of the plain loss (what stock trainers leave, after torch's GradScaler unscaled
them): each tensor is then multiplied by S into a temporary of the gradient's dtype before it is
submitted (exact for power-of-two scales, which the library's scalers use; an fp16 gradient that
overflows once multiplied is an overflow, as it would have been in the fused backward).

Memory. Unlike ``fused_backward``, the gradients exist together: one buffer per trainable
parameter in the parameter's dtype, from the backward until ``zero_grad`` (as with any torch
optimizer), plus one temporary of the largest gradient while unscaled gradients are submitted.
"""

from __future__ import annotations

import torch

from . import _native as N
from . import _torch_dist as TD
from . import _torch_params as TP

_DTYPES = TP._DTYPES


def pending_grads(opt) -> list:
    """(registration, gradient as the library reads it) of every registered parameter whose
    ``.grad`` is set, in registration order. Every gradient is checked (shape, dtype, device;
    sparse ones densified, non-contiguous parameters' put in their memory order) before any
    phase begins, so a bad one raises with nothing changed."""
    items = []
    for e in opt._entries.values():
        p = e.param()
        if p is None or p.grad is None:
            continue
        items.append((e, TP.prepared_grad(e, p.grad)))
    return items


def apply_grads(opt, lr: float) -> bool:
    """One whole step (NORM phase if needed, then UPDATE) from ``.grad``; False (nothing done)
    when no registered parameter has a gradient. The gradients are left in ``.grad``."""
    if opt._phase is not None or opt._norm_pending:
        raise RuntimeError("step() was called inside a fused step (between grad_norm and "
                           "fused_backward, or from a hook)")
    items = pending_grads(opt)
    if not items:
        return False
    if opt._pg_size is not None:
        # Data parallel (process_group): .grad is left averaged, as DDP leaves it.
        items = [(e, TD.average(g, opt.process_group, opt._pg_size)) for e, g in items]
    native = opt._native
    factor = native.loss_scale / opt._grad_scale
    norm_pass = opt.clip_grad_norm is not None or opt.two_pass
    stream = opt._stream()
    phases = ((N.PHASE_NORM, 0.0),) if norm_pass else ()
    for phase, phase_lr in phases + ((N.PHASE_UPDATE, float(lr)),):
        native.begin(phase, phase_lr, stream)
        try:
            for e, g in items:
                _submit(native, e, g, factor)
        except BaseException:
            native.cancel()
            raise
        native.end(stream)
    return True


def _submit(native, e, g, factor):
    if factor != 1.0:
        g = TP.in_layout(e, g * factor)  # a temporary in the gradient's dtype, freed after the submit
    stream = None
    if g.is_cuda:
        stream = torch.cuda.current_stream(g.device).cuda_stream
    native.submit_pointer(e.pid, g.data_ptr(), _DTYPES[g.dtype], stream, numel=g.numel())
