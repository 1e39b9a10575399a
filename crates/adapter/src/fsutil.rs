//! Writes that never leave a half-written file or directory behind: data goes to a temporary
//! name in the destination's directory, is synced, then renamed over the destination.
use crate::error::{AdapterError, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A sibling path `.<name>.<tag>-<pid>` of `path`, on the same filesystem so rename is atomic.
pub fn sibling_temp(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// Atomically replaces `path` with `bytes`.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = sibling_temp(path, "tmp");
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(path.parent());
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(AdapterError::io(path, e));
    }
    Ok(())
}

/// Best-effort fsync of a directory so a rename inside it survives a crash.
pub fn sync_dir(dir: Option<&Path>) {
    if let Some(d) = dir {
        let d = if d.as_os_str().is_empty() {
            Path::new(".")
        } else {
            d
        };
        if let Ok(f) = std::fs::File::open(d) {
            let _ = f.sync_all();
        }
    }
}

/// True when `dir` exists and holds at least one entry.
pub fn is_non_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|mut it| it.next().is_some())
        .unwrap_or(false)
}

/// A directory built under a temporary sibling name and moved into place by [`commit`]
/// (`AtomicDir::commit`); dropped without commit, it is removed.
pub struct AtomicDir {
    tmp: PathBuf,
    dest: PathBuf,
    overwrite: bool,
    committed: bool,
}

impl AtomicDir {
    /// Starts building `dest`. Fails if `dest` is a non-empty directory (or a file) and
    /// `overwrite` is false.
    pub fn create(dest: &Path, overwrite: bool) -> Result<Self> {
        if dest.exists() && !overwrite && (is_non_empty_dir(dest) || !dest.is_dir()) {
            return Err(AdapterError::io(
                dest,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "already exists and is not empty (pass --force to replace it)",
                ),
            ));
        }
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| AdapterError::io(parent, e))?;
        }
        // a counter too, so two outputs of one process never share a temporary directory
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = sibling_temp(dest, &format!("partial{n}"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| AdapterError::io(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| AdapterError::io(&tmp, e))?;
        Ok(AtomicDir {
            tmp,
            dest: dest.to_path_buf(),
            overwrite,
            committed: false,
        })
    }

    /// Where to write the directory's files meanwhile.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Moves the finished directory into place, replacing an old one if allowed at creation.
    /// Without that permission the rename itself refuses a destination that became a non-empty
    /// directory meanwhile (another lorakit writing the same output), so of two racing writers
    /// one fails instead of replacing the other's result.
    pub fn commit(mut self) -> Result<PathBuf> {
        if !self.overwrite {
            if let Err(e) = std::fs::rename(&self.tmp, &self.dest) {
                let why = if self.dest.exists() {
                    std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "was written by another process meanwhile and is not empty (pass --force to replace it)",
                    )
                } else {
                    e
                };
                return Err(AdapterError::io(&self.dest, why));
            }
            self.committed = true;
            sync_dir(self.dest.parent());
            return Ok(self.dest.clone());
        }
        let old = sibling_temp(&self.dest, "old");
        let had_old = self.dest.exists();
        if had_old {
            std::fs::rename(&self.dest, &old).map_err(|e| AdapterError::io(&self.dest, e))?;
        }
        if let Err(e) = std::fs::rename(&self.tmp, &self.dest) {
            if had_old {
                let _ = std::fs::rename(&old, &self.dest);
            }
            return Err(AdapterError::io(&self.dest, e));
        }
        self.committed = true;
        sync_dir(self.dest.parent());
        if had_old {
            let _ = if old.is_dir() {
                std::fs::remove_dir_all(&old)
            } else {
                std::fs::remove_file(&old)
            };
        }
        Ok(self.dest.clone())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_dir_is_all_or_nothing() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("out");
        {
            let a = AtomicDir::create(&dest, false).unwrap();
            std::fs::write(a.path().join("x"), b"1").unwrap();
            // dropped without commit
        }
        assert!(!dest.exists());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        let a = AtomicDir::create(&dest, false).unwrap();
        std::fs::write(a.path().join("x"), b"1").unwrap();
        a.commit().unwrap();
        assert!(AtomicDir::create(&dest, false).is_err());
        let a = AtomicDir::create(&dest, true).unwrap();
        std::fs::write(a.path().join("y"), b"2").unwrap();
        a.commit().unwrap();
        assert!(dest.join("y").exists() && !dest.join("x").exists());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn of_two_racing_writers_without_overwrite_one_fails() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("out");
        let first = AtomicDir::create(&dest, false).unwrap();
        let second = AtomicDir::create(&dest, false).unwrap();
        std::fs::write(first.path().join("first"), b"1").unwrap();
        std::fs::write(second.path().join("second"), b"2").unwrap();
        first.commit().unwrap();
        let e = second.commit().unwrap_err().to_string();
        assert!(e.contains("meanwhile"), "{e}");
        assert!(dest.join("first").is_file() && !dest.join("second").exists());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn atomic_write_reports_unwritable_path() {
        let err = atomic_write(Path::new("/nonexistent-dir/f"), b"x").unwrap_err();
        assert!(err.to_string().contains("/nonexistent-dir/f"));
    }
}
