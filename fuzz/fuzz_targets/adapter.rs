//! Adapter loading: `adapter_config.json` bytes + `adapter_model.safetensors` bytes. Input
//! layout: 2 bytes (LE) of config length, the config, then the weights file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (config, weights) = data[2..].split_at(n);
    if let Ok(a) =
        lorakit_adapter::PeftAdapter::from_bytes(Path::new("fuzz"), config, weights.to_vec())
    {
        let modules: Vec<String> = a.modules().map(String::from).collect();
        for m in modules {
            // shape checks against a base layer, then the merged update
            if let Ok(Some(l)) = a.low_rank(&m, 4, 4, &candle_core::Device::Cpu) {
                let _ = l.delta_weight();
            }
            let _ = a.config.for_module(&m);
        }
    }
});
