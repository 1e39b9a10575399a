//! One writer per output directory: `lorakit train` holds `output.dir/.lorakit.lock` (its pid)
//! while it runs. A lock whose process is gone (a kill -9, a power cut) is stale and taken over;
//! the temporary files such a run left behind are cleaned up or, for a half-swapped directory,
//! put back.
use crate::error::{Result, TrainError};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = ".lorakit.lock";

pub struct RunLock {
    path: PathBuf,
}

fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    Path::new("/proc").join(pid.to_string()).exists()
}

/// The pid in a lock file, if the file exists and names a live process.
pub fn holder(dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(dir.join(LOCK_FILE)).ok()?;
    let pid: u32 = text.lines().next()?.trim().parse().ok()?;
    process_alive(pid).then_some(pid)
}

impl RunLock {
    /// Takes the lock of `dir` (which must exist). Returns notes for the user (stale lock taken
    /// over, leftovers cleaned).
    pub fn acquire(dir: &Path) -> Result<(Self, Vec<String>)> {
        let path = dir.join(LOCK_FILE);
        let mut notes = Vec::new();
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    writeln!(f, "{}", std::process::id()).map_err(|e| TrainError::io(&path, e))?;
                    f.sync_all().map_err(|e| TrainError::io(&path, e))?;
                    notes.extend(clean_leftovers(dir));
                    return Ok((RunLock { path }, notes));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if let Some(pid) = holder(dir) {
                        return Err(TrainError::io(dir, format!("in use by another lorakit train (pid {pid}); wait for it to finish or stop it")));
                    }
                    let old = std::fs::read_to_string(&path).unwrap_or_default();
                    std::fs::remove_file(&path).map_err(|e| TrainError::io(&path, e))?;
                    notes.push(format!(
                        "removed a stale lock of a run that ended without cleaning up (pid {})",
                        old.trim()
                    ));
                }
                Err(e) => return Err(TrainError::io(&path, e)),
            }
        }
        Err(TrainError::io(&path, "could not take the lock"))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes `.name.tmp-PID` / `.name.partialN-PID` leftovers of an interrupted write in `dir` and
/// `dir/checkpoints`; a `.name.old-PID` whose `name` is missing (killed between the two renames
/// of a directory swap) is renamed back.
fn clean_leftovers(dir: &Path) -> Vec<String> {
    let mut notes = Vec::new();
    for d in [dir.to_path_buf(), dir.join("checkpoints")] {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix('.') else {
                continue;
            };
            let Some((orig, tag)) = rest.rsplit_once('.') else {
                continue;
            };
            let path = e.path();
            let removed = if tag.starts_with("old-") && !d.join(orig).exists() {
                std::fs::rename(&path, d.join(orig)).is_ok()
            } else if tag.starts_with("tmp-")
                || tag.starts_with("partial")
                || tag.starts_with("old-")
            {
                if path.is_dir() {
                    std::fs::remove_dir_all(&path).is_ok()
                } else {
                    std::fs::remove_file(&path).is_ok()
                }
            } else {
                false
            };
            if removed {
                notes.push(format!(
                    "cleaned up {} left by an interrupted run",
                    path.display()
                ));
            }
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_lock_refuses_and_a_stale_one_is_taken_over() {
        let d = tempfile::tempdir().unwrap();
        let (lock, notes) = RunLock::acquire(d.path()).unwrap();
        assert!(notes.is_empty());
        let e = RunLock::acquire(d.path()).err().unwrap().to_string();
        assert!(e.contains("in use by another lorakit train"), "{e}");
        drop(lock);
        assert!(!d.path().join(LOCK_FILE).exists());
        // a pid that cannot be alive
        std::fs::write(d.path().join(LOCK_FILE), "4294967\n").unwrap();
        let (_lock, notes) = RunLock::acquire(d.path()).unwrap();
        assert!(notes[0].contains("stale lock"), "{notes:?}");
    }

    #[test]
    fn leftovers_are_removed_and_half_swapped_directories_restored() {
        let d = tempfile::tempdir().unwrap();
        let ck = d.path().join("checkpoints");
        std::fs::create_dir_all(ck.join(".step-9.partial-123")).unwrap();
        std::fs::write(d.path().join(".recipe.yaml.tmp-123"), "x").unwrap();
        std::fs::create_dir(d.path().join(".adapter.old-123")).unwrap();
        std::fs::write(d.path().join(".adapter.old-123/adapter_config.json"), "{}").unwrap();
        std::fs::create_dir(d.path().join("last")).unwrap();
        std::fs::create_dir(d.path().join(".last.old-123")).unwrap();
        let (_lock, notes) = RunLock::acquire(d.path()).unwrap();
        assert_eq!(notes.len(), 4, "{notes:?}");
        assert!(!ck.join(".step-9.partial-123").exists());
        assert!(!d.path().join(".recipe.yaml.tmp-123").exists());
        assert!(d.path().join("adapter/adapter_config.json").is_file());
        assert!(!d.path().join(".last.old-123").exists() && d.path().join("last").is_dir());
    }
}
