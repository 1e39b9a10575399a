//! Recipe parsing: any text must give a recipe or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        // overrides too: the first line, if it looks like one, is a --set
        let (set, body) = match text.split_once('\n') {
            Some((first, rest)) if first.contains('=') && !first.contains(':') => {
                (vec![first.to_string()], rest)
            }
            _ => (vec![], text),
        };
        let _ = lorakit_train::Recipe::parse(body, "fuzz.yaml", &set);
    }
});
