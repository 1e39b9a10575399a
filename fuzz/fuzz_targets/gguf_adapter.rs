//! GGUF LoRA adapters (llama.cpp's format, read for `--adapter FILE.gguf`): any bytes give an
//! adapter whose pairs fit the base (the committed tiny Llama) or an error naming the file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lorakit_export::adapter_gguf::{import_bytes, Base};
use std::path::Path;
use std::sync::OnceLock;

fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-llama");
        Base::open(&dir).expect("the committed tiny Llama")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(a) = import_bytes(data, Path::new("fuzz.gguf"), base()) {
        for (m, (la, lb)) in a.pairs() {
            assert_eq!(la.dim(0).unwrap(), lb.dim(1).unwrap(), "{m}");
            assert!(a.delta(m).unwrap().is_some());
        }
    }
});
