//! Helpers shared by the end-to-end tests that drive the `lorakit` binary.
#![allow(dead_code)] // each test binary uses its own subset of the helpers
use std::path::PathBuf;
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `lorakit args...` in the repository root.
pub fn lorakit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lorakit"))
        .current_dir(root())
        .args(args)
        .output()
        .expect("run lorakit")
}

/// stdout and stderr of a finished command, as text.
pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
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

/// Says why a test cannot run here and returns, so it passes; with `CI=true` it fails instead:
/// CI installs everything the tests need, so a skip there is a broken setup.
pub fn skipped(why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true, but {why}");
    }
    eprintln!("SKIPPED: {why}");
}

/// The real models and data (`bash scripts/fetch-real.sh`), if fetched: `$LORAKIT_CACHE` or
/// `.cache/lorakit`.
pub fn real_cache_dir() -> PathBuf {
    std::env::var_os("LORAKIT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache/lorakit"))
}
