//! CUDA backend: the kernel sources (compiled into the library) and typed kernel names.
//!
//! Kernel symbols are `<algo>_<phase>_<param dtype>_<grad dtype>` for the passes that touch a
//! parameter and a gradient (9 instantiations each), `norm_sumsq_<grad dtype>`, and plain names
//! for dtype-independent kernels (`adalomo_finalize`, `step_*`, `xla_*`).

use crate::dtype::DType;

/// The shared header, passed to NVRTC by name (`#include "common.cuh"`).
pub const COMMON_HEADER: &str =
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/common.cuh"));

/// One source file = one NVRTC program = one module per device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Module {
    Norm,
    Lomo,
    Adalomo,
    Step,
    /// The XLA handlers' records from operand scalars, and their results.
    Xla,
    /// Gradient accumulation buffers (`lomo_accum_enable`).
    Accum,
}

impl Module {
    pub const ALL: [Module; 6] = [
        Module::Norm,
        Module::Lomo,
        Module::Adalomo,
        Module::Step,
        Module::Xla,
        Module::Accum,
    ];

    pub fn file_name(self) -> &'static str {
        match self {
            Module::Norm => "norm.cu",
            Module::Lomo => "lomo.cu",
            Module::Adalomo => "adalomo.cu",
            Module::Step => "step.cu",
            Module::Xla => "xla.cu",
            Module::Accum => "accum.cu",
        }
    }

    pub fn source(self) -> &'static str {
        match self {
            Module::Norm => include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/norm.cu")),
            Module::Lomo => include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/lomo.cu")),
            // One program from two files: the statistics and apply, then finalize.
            Module::Adalomo => concat!(
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/adalomo.cu")),
                include_str!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/kernels/adalomo_finalize.cu"
                ))
            ),
            Module::Step => include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/step.cu")),
            Module::Xla => include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/xla.cu")),
            Module::Accum => {
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/accum.cu"))
            }
        }
    }

    /// Every kernel symbol the module defines.
    pub fn kernels(self) -> Vec<String> {
        let pairs = |prefix: &str| -> Vec<String> {
            let mut v = Vec::new();
            for p in DType::all() {
                for g in DType::all() {
                    v.push(pair_name(prefix, p, g));
                }
            }
            v
        };
        match self {
            Module::Norm => DType::all()
                .iter()
                .flat_map(|g| {
                    [
                        format!("norm_sumsq_{}", g.as_str()),
                        format!("norm_multi_{}", g.as_str()),
                    ]
                })
                .collect(),
            Module::Lomo => {
                let mut v = pairs("lomo_update");
                v.extend(pairs("lomo_multi"));
                v
            }
            Module::Adalomo => {
                let mut v = vec![
                    "adalomo_finalize".to_owned(),
                    "adalomo_piece_gather".to_owned(),
                    "adalomo_vfinalize".to_owned(),
                    "adalomo_cols_finish".to_owned(),
                ];
                for k in [
                    "adalomo_stats",
                    "adalomo_apply",
                    "adalomo_vstats",
                    "adalomo_vapply",
                ] {
                    v.extend(pairs(k));
                }
                v
            }
            Module::Step => vec![
                "step_begin".into(),
                "step_norm_end".into(),
                "step_update_end".into(),
                "step_gather".into(),
            ],
            Module::Xla => vec![
                "xla_prepare".into(),
                "xla_norm_finish".into(),
                "xla_update_finish".into(),
            ],
            Module::Accum => pairs("accum_add"),
        }
    }
}

/// `<prefix>_<param dtype>_<grad dtype>`.
pub fn pair_name(prefix: &str, p: DType, g: DType) -> String {
    format!("{prefix}_{}_{}", p.as_str(), g.as_str())
}

/// A kernel to launch: its module and symbol.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Kernel {
    pub module: Module,
    pub name: String,
}

impl Kernel {
    pub fn new(module: Module, name: impl Into<String>) -> Kernel {
        Kernel {
            module,
            name: name.into(),
        }
    }
}
