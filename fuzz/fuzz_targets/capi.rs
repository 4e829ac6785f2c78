//! libFuzzer entry point of the `capi` target; the harness is fuzz/harness/capi.rs.
#![no_main]

#[path = "../harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::capi::run(data));
