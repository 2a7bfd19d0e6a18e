#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nvdriver_agent::fuzzing::config(data));
