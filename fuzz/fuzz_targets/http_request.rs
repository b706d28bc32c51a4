//! An HTTP request's method, path and host as policy reads them.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| interlock::fuzzing::http_request(data));
