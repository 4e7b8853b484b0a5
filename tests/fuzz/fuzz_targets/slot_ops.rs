#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| hybridgen_fuzz::slot_ops(data));
