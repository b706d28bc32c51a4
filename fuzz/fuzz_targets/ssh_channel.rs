//! SFTP packets both ways and command output through the masks, cut anywhere.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| interlock::fuzzing::ssh_channel(data));
