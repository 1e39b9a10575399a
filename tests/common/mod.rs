//! Helpers shared by the end-to-end tests that drive the `lorakit` binary.
#![allow(dead_code)] // each test binary uses its own subset of the helpers
use std::path::PathBuf;
use std::process::Command;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `lorakit args...`, asserts it succeeded (showing stderr if not), returns stdout.
pub fn lorakit_ok(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_lorakit"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}
