//! PostgreSQL startup packets and frames, as a client or server sends them.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| interlock::fuzzing::postgres_frames(data));
