//! Helpers shared by the end-to-end tests that drive the `lorakit` binary.
#![allow(dead_code)] // each test binary uses its own subset of the helpers
use std::path::{Path, PathBuf};
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

/// A GGUF v3 file: `meta` as (key, type, payload bytes), tensors as (name, dims) in F32.
pub fn gguf(meta: &[(&str, u32, Vec<u8>)], tensors: &[(&str, [u64; 2])]) -> Vec<u8> {
    let mut b = Vec::new();
    let s = |b: &mut Vec<u8>, t: &str| {
        b.extend((t.len() as u64).to_le_bytes());
        b.extend(t.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, ty, payload) in meta {
        s(&mut b, k);
        b.extend(ty.to_le_bytes());
        b.extend(payload);
    }
    let mut offset = 0u64;
    for (name, dims) in tensors {
        s(&mut b, name);
        b.extend(2u32.to_le_bytes());
        b.extend(dims[0].to_le_bytes());
        b.extend(dims[1].to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b.extend(offset.to_le_bytes());
        offset += (dims[0] * dims[1] * 4).div_ceil(32) * 32;
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend(vec![0u8; offset as usize]);
    b
}

pub fn gguf_str(v: &str) -> Vec<u8> {
    let mut b = (v.len() as u64).to_le_bytes().to_vec();
    b.extend(v.as_bytes());
    b
}

/// Copies the directory tree `from` to `to` (the twin of a run, to resume from one of its
/// checkpoints).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}
