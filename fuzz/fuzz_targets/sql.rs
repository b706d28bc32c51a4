//! Statement texts through PostgreSQL's parser, the tree walk and name
//! resolution.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| interlock::fuzzing::sql(data));
