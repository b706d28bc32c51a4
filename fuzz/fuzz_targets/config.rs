//! Configuration files through the loader: errors with a place, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| interlock::fuzzing::config(data));
