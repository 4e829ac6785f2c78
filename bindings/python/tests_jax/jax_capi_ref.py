"""The reference for the JAX tests: the C API of liblomo.so (lomo_step_begin / lomo_grad_submit /
lomo_step_end, through lomo_native's NumPy-level optimizer, which calls each C function directly)
on NumPy buffers. Independent of lomo_native.jax."""

import numpy as np

from lomo_native.core import Optimizer

PHASE_NORM, PHASE_UPDATE = 0, 1


class CApiOptimizer:
    """A C API optimizer over NumPy parameter copies (which it updates in place)."""

    def __init__(self, algorithm, params, *, no_decay=(), group_of=None, groups=None, **options):
        """``no_decay``: indices of parameters put in a group without weight decay;
        ``groups``: {group id: (lr_multiplier, weight_decay)} and ``group_of``: group per index."""
        self._opt = Optimizer(algorithm, **options)
        if no_decay:
            self._opt.group_set(1, 1.0, 0.0)
        for gid, (mult, wd) in (groups or {}).items():
            self._opt.group_set(gid, mult, wd)
        self.params = [np.array(p, copy=True) for p in params]
        for i, p in enumerate(self.params):
            group = group_of[i] if group_of else (1 if i in no_decay else 0)
            assert self._opt.register_array("p%d" % i, p, group) == i
        self.clip = options.get("clip_grad_norm", 0.0) > 0

    def loss_scale(self) -> float:
        return self._opt.loss_scale

    def _phase(self, phase, lr, grads):
        self._opt.begin(phase, lr)
        for i, g in enumerate(grads):
            self._opt.submit_array(i, g)
        self._opt.end()

    def step(self, grads, lr):
        """One step (NORM phase first when clipping); the grads are already loss-scaled."""
        if self.clip:
            self._phase(PHASE_NORM, lr, grads)
        self._phase(PHASE_UPDATE, lr, grads)

    def info(self):
        return self._opt.step_info()
