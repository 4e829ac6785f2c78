//! Core layer: a parameter's memory layout (`lomo_param_set_strides`), between steps. The copies
//! in and out of logical order are `crate::strided`; the step uses them in `step.rs`.

use super::{Optimizer, StepState};
use crate::config::Algorithm;
use crate::error::{bail, Result};
use crate::param::Device;
use crate::strided::{check_dense, Strided};

impl Optimizer {
    /// Declares the element strides of parameter `id`'s buffer (and of the gradients submitted
    /// for it), one per dimension of its registered (logical) shape. They must describe a dense
    /// non-overlapping layout. LOMO updates such a buffer in memory order (elementwise, nothing
    /// kept); AdaLomo, whose statistics follow the logical order, gets scratch buffers for a
    /// non-contiguous layout (CPU parameters only: `Unsupported` on CUDA and for pieces of
    /// distributed tensors). Contiguous strides drop a layout set before. A failed call leaves
    /// the parameter as it was.
    pub fn param_set_strides(&mut self, id: u32, strides: &[i64]) -> Result<()> {
        if self.state != StepState::Idle {
            bail!(
                PhaseError,
                "lomo_param_set_strides is only possible between steps"
            );
        }
        let algorithm = self.config.algorithm;
        let Some(param) = self.params.get_mut(id as usize) else {
            bail!(UnknownParam, "no parameter with id {id}");
        };
        let (strides, contiguous) = check_dense(&param.name, &param.shape, strides)?;
        if contiguous || algorithm == Algorithm::Lomo {
            param.inner.get_mut().strided = None;
            return Ok(());
        }
        if param.device != Device::Cpu {
            bail!(
                Unsupported,
                "parameter '{}': AdaLomo on a non-contiguous layout (strides {strides:?} of \
                 shape {:?}) runs on the CPU backend only so far; make the CUDA tensor \
                 contiguous, or use LOMO",
                param.name,
                param.shape
            );
        }
        if param.shard.is_some() {
            bail!(
                Unsupported,
                "parameter '{}' is a piece of a distributed tensor (lomo_param_set_shard): \
                 AdaLomo pieces must be contiguous",
                param.name
            );
        }
        let what = format!("the logical-order scratch of '{}'", param.name);
        let s = Strided::new(&param.shape, strides, param.buf.dtype, &what)?;
        param.inner.get_mut().strided = Some(s);
        Ok(())
    }
}
