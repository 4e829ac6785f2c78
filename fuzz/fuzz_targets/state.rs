//! libFuzzer entry point of the `state` target; the harness is fuzz/harness/state.rs.
#![no_main]

#[path = "../harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::state::run(data));
