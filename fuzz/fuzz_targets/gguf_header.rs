//! GGUF header parsing: any bytes give a header or an error, with no allocation beyond the input
//! size and no read past its end.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = lorakit_models::gguf::GgufHeader::parse(data) {
        let _ = h.architecture();
        for t in &h.tensors {
            let _ = h.hf_name(&t.name);
            assert!(h.data_start + t.offset + t.bytes <= data.len() as u64);
        }
    }
});
