//! What `--force` may replace. A command's output directory may be deleted or swapped for a new
//! one only when lorakit made it (it holds the [`MARKER`] file lorakit writes into every output
//! directory), it neither is, contains nor lies inside any input of the same command, and it is
//! not the current directory, the home directory or a filesystem root (nor holds one of them).
use crate::error::{AdapterError, Result};
use crate::fsutil::atomic_write;
use std::path::{Path, PathBuf};

/// The file lorakit writes into each directory it makes as a command's output (a training run,
/// a merged or converted model). A dot file, so loaders and `merge`'s side-file copy skip it.
pub const MARKER: &str = ".lorakit-output.json";

/// The largest marker lorakit reads (its own are well under 200 bytes).
const MARKER_MAX_BYTES: u64 = 4096;

/// One input of the command, named as the user would name it ("the base model", "the data").
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    pub what: &'a str,
    pub path: &'a Path,
}

impl<'a> Input<'a> {
    pub fn new(what: &'a str, path: &'a Path) -> Self {
        Input { what, path }
    }
}

/// True when writing `out` would replace something: a non-empty directory, or a file (or
/// anything else that is not an empty directory). An empty directory is filled, not replaced.
pub fn occupied(out: &Path) -> bool {
    match std::fs::read_dir(out) {
        Ok(mut entries) => entries.next().is_some(),
        Err(_) => out.exists(),
    }
}

/// Marks `dir` as the output of lorakit command `command` (`train`, `merge`, `convert`).
pub fn write_marker(dir: &Path, command: &str) -> Result<()> {
    let text = serde_json::json!({
        "lorakit": command,
        "version": env!("CARGO_PKG_VERSION"),
        "note": "written by lorakit: `--force` may replace this directory",
    });
    let bytes = serde_json::to_vec_pretty(&text).unwrap_or_default();
    atomic_write(&dir.join(MARKER), &bytes)
}

/// True when `dir` holds a marker lorakit wrote: a regular file (not a link) holding a JSON
/// object whose `lorakit` field names a command.
pub fn is_lorakit_output(dir: &Path) -> bool {
    let path = dir.join(MARKER);
    let Ok(meta) = std::fs::symlink_metadata(&path) else {
        return false;
    };
    if !meta.is_file() || meta.len() > MARKER_MAX_BYTES {
        return false;
    }
    std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("lorakit").and_then(|c| c.as_str()).map(|_| ()))
        .is_some()
}

/// Refuses unless `out` (an [`occupied`] path) may be replaced by a command with
/// these `inputs`. Each refusal is one sentence naming `out` and what it would destroy.
pub fn check_replaceable(out: &Path, inputs: &[Input]) -> Result<()> {
    let refuse = |why: String| {
        Err(AdapterError::RefusedOutput(format!(
            "--force: lorakit will not replace {}: {why}",
            out.display()
        )))
    };
    let out_real = match out.canonicalize() {
        Ok(p) => p,
        Err(e) => return refuse(format!("its real path cannot be resolved ({e})")),
    };
    for input in inputs {
        // an input that is no local path (a hub id) cannot be hurt by a local delete
        let Ok(real) = input.path.canonicalize() else {
            continue;
        };
        let shown = input.path.display();
        if real == out_real {
            return refuse(format!("it is {} {shown}", input.what));
        }
        if real.starts_with(&out_real) {
            return refuse(format!("it contains {} {shown}", input.what));
        }
        if out_real.starts_with(&real) {
            return refuse(format!("it lies inside {} {shown}", input.what));
        }
    }
    if let Ok(cwd) = std::env::current_dir().and_then(|d| d.canonicalize()) {
        if cwd.starts_with(&out_real) {
            return refuse(format!(
                "it is or contains the current directory {}",
                cwd.display()
            ));
        }
    }
    if let Some(home) = std::env::var_os("HOME").map(PathBuf::from) {
        if let Ok(home) = home.canonicalize() {
            if home.starts_with(&out_real) {
                return refuse(format!(
                    "it is or contains the home directory {}",
                    home.display()
                ));
            }
        }
    }
    if is_filesystem_root(&out_real) {
        return refuse("it is the root of a filesystem".into());
    }
    if !is_lorakit_output(&out_real) {
        return refuse(format!(
            "it holds no {MARKER}, so lorakit did not make it (move or delete it yourself, or choose another output)"
        ));
    }
    Ok(())
}

/// `/`, or a mount point (a directory on another device than its parent).
fn is_filesystem_root(dir: &Path) -> bool {
    let Some(parent) = dir.parent() else {
        return true;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(a), Ok(b)) = (std::fs::metadata(dir), std::fs::metadata(parent)) {
            return a.dev() != b.dev();
        }
    }
    let _ = parent;
    false
}

/// Moves `dir` aside (a sibling `.name.old-PID`, removed next) so that a failed delete never
/// leaves a half-deleted directory under the output's name.
pub fn remove_replaced(dir: &Path) -> Result<()> {
    let aside = crate::fsutil::sibling_temp(dir, "old");
    std::fs::rename(dir, &aside).map_err(|e| AdapterError::io(dir, e))?;
    crate::fsutil::sync_dir(dir.parent());
    std::fs::remove_dir_all(&aside).map_err(|e| AdapterError::io(&aside, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marked(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        write_marker(dir, "merge").unwrap();
    }

    fn refusal(out: &Path, inputs: &[Input]) -> String {
        check_replaceable(out, inputs).unwrap_err().to_string()
    }

    #[test]
    fn only_marked_directories_are_replaceable() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("recipe.yaml"), "hello: world").unwrap();
        let e = refusal(&out, &[]);
        assert!(e.contains(MARKER) && e.contains("out"), "{e}");
        // a marker of the wrong shape, or a link to a real one, does not count
        std::fs::write(out.join(MARKER), "{\"other\": 1}").unwrap();
        assert!(check_replaceable(&out, &[]).is_err());
        std::fs::remove_file(out.join(MARKER)).unwrap();
        let real = d.path().join("real");
        marked(&real);
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(real.join(MARKER), out.join(MARKER)).unwrap();
            assert!(check_replaceable(&out, &[]).is_err());
            std::fs::remove_file(out.join(MARKER)).unwrap();
        }
        marked(&out);
        check_replaceable(&out, &[]).unwrap();
    }

    #[test]
    fn inputs_are_never_replaceable() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        marked(&out);
        let data = out.join("data/train.jsonl");
        std::fs::create_dir_all(data.parent().unwrap()).unwrap();
        std::fs::write(&data, "{}").unwrap();
        let e = refusal(&out, &[Input::new("the training data", &data)]);
        assert!(
            e.contains("contains the training data") && e.contains("train.jsonl"),
            "{e}"
        );
        let e = refusal(&out, &[Input::new("the adapter", &out)]);
        assert!(e.contains("it is the adapter"), "{e}");
        let inner = out.join("inner");
        marked(&inner);
        let e = refusal(&inner, &[Input::new("the base model", &out)]);
        assert!(e.contains("lies inside the base model"), "{e}");
        // the same directory reached through `..` and through a link
        let e = refusal(
            &out.join("data/.."),
            &[Input::new("the training data", &data)],
        );
        assert!(e.contains("contains the training data"), "{e}");
        #[cfg(unix)]
        {
            let link = d.path().join("link");
            std::os::unix::fs::symlink(&out, &link).unwrap();
            let e = refusal(&link, &[Input::new("the training data", &data)]);
            assert!(e.contains("contains the training data"), "{e}");
        }
        // an input that is no local path is no obstacle
        check_replaceable(
            &inner,
            &[Input::new("the base model", Path::new("org/model"))],
        )
        .unwrap();
    }

    #[test]
    fn roots_are_never_replaceable() {
        let e = refusal(Path::new("/"), &[]);
        assert!(e.contains("current directory") || e.contains("root"), "{e}");
        assert!(is_filesystem_root(Path::new("/")));
        let d = tempfile::tempdir().unwrap();
        assert!(!is_filesystem_root(d.path()));
    }

    #[test]
    fn files_and_non_empty_directories_are_occupied() {
        let d = tempfile::tempdir().unwrap();
        assert!(!occupied(&d.path().join("nothing")));
        assert!(!occupied(d.path()));
        std::fs::write(d.path().join("f"), "x").unwrap();
        assert!(occupied(d.path()) && occupied(&d.path().join("f")));
        // a file is never a lorakit output directory
        let e = refusal(&d.path().join("f"), &[]);
        assert!(e.contains(MARKER), "{e}");
    }

    #[test]
    fn a_replaced_directory_goes_whole() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        marked(&out);
        std::fs::create_dir_all(out.join("a/b")).unwrap();
        remove_replaced(&out).unwrap();
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
