#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| uccl_tcpx_fuzz::control(data));
