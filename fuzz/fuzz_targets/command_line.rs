//! SSH command lines through the shell parser and rule patterns.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| interlock::fuzzing::command_line(data));
