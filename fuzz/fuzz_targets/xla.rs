//! libFuzzer entry point of the `xla` target; the harness is fuzz/harness/xla.rs.
#![no_main]

#[path = "../harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::xla::run(data));
