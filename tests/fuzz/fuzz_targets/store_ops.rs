#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| hybridgen_fuzz::store_ops(data));
