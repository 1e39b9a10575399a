//! A checkpoint's `state.json` is read back on `--resume`: any text must give a state or an
//! error, and a state that passes the check must be one the training loop can run from (a data
//! position inside the epoch, a step no later than the run's end).
#![no_main]
use libfuzzer_sys::fuzz_target;
use lorakit_train::checkpoint::{check_state, parse_state};
use std::path::Path;

fuzz_target!(|bytes: &[u8]| {
    let Some((&head, rest)) = bytes.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let Ok(state) = parse_state(text, Path::new("state.json")) else {
        return;
    };
    // the first byte picks the run's shape: 1..=16 steps per epoch, 1..=16 epochs
    let steps_per_epoch = (head & 15) as usize + 1;
    let total = steps_per_epoch * ((head >> 4) as usize + 1);
    let dir = Path::new("checkpoints").join(format!("step-{}", state.step));
    if check_state(&state, &dir, steps_per_epoch, total).is_ok() {
        assert!(state.step <= total);
        assert!(state.step_in_epoch < steps_per_epoch);
        assert_eq!(state.epoch * steps_per_epoch + state.step_in_epoch, state.step);
    }
});
