//! `--adapter` as every command takes it: a PEFT directory or a llama.cpp GGUF adapter, given
//! once, or several times with weights (`--adapter A --adapter B:0.5`) for the weighted sum of
//! their updates (combined exactly, as `lorakit combine --method cat` does).
use anyhow::{Context, Result};
use lorakit_adapter::combine::{combine, Method};
use lorakit_adapter::{Adapters, PeftAdapter};
use lorakit_export::adapter_gguf::{import, is_gguf_adapter, Base};
use std::path::{Path, PathBuf};

/// One `--adapter PATH[:WEIGHT]` (weight 1 when absent).
#[derive(Clone, Debug)]
pub struct AdapterArg {
    pub path: PathBuf,
    pub weight: f64,
}

impl AdapterArg {
    /// `PATH:WEIGHT` when the part after the last `:` is a number and `PATH` is not itself an
    /// existing file or directory with that name; else the whole text is the path.
    pub fn parse(s: &str) -> Result<AdapterArg> {
        if let Some((p, w)) = s.rsplit_once(':') {
            if !Path::new(s).exists() && !p.is_empty() {
                if let Ok(weight) = w.trim().parse::<f64>() {
                    if !weight.is_finite() {
                        anyhow::bail!("--adapter {s}: the weight {w} is not a finite number");
                    }
                    return Ok(AdapterArg {
                        path: p.into(),
                        weight,
                    });
                }
            }
        }
        Ok(AdapterArg {
            path: s.into(),
            weight: 1.0,
        })
    }
}

/// One adapter: a PEFT directory, or a GGUF adapter read for `base` (its names and row order).
pub fn load_one(path: &Path, base: &Path) -> Result<PeftAdapter> {
    if is_gguf_adapter(path) {
        let b = Base::open(base).with_context(|| {
            format!(
                "reading the GGUF adapter {} needs its base model's layout",
                path.display()
            )
        })?;
        return Ok(import(path, &b)?);
    }
    if lorakit_models::is_gguf(path) {
        anyhow::bail!(
            "{}: a GGUF model, not an adapter (its general.type is not \"adapter\"); pass it as the model",
            path.display()
        );
    }
    let a = PeftAdapter::load(path)?;
    for w in &a.warnings {
        crate::warn(w);
    }
    Ok(a)
}

/// The adapter the `--adapter` arguments describe, for `base`: `None` for none, the adapter
/// itself for one unweighted, else the exact weighted sum of all of them.
pub fn load(specs: &[String], base: &Path) -> Result<Option<PeftAdapter>> {
    let args: Vec<AdapterArg> = specs
        .iter()
        .map(|s| AdapterArg::parse(s))
        .collect::<Result<_>>()?;
    match args.as_slice() {
        [] => Ok(None),
        [one] if one.weight == 1.0 => Ok(Some(load_one(&one.path, base)?)),
        _ => {
            let loaded: Vec<PeftAdapter> = args
                .iter()
                .map(|a| load_one(&a.path, base))
                .collect::<Result<_>>()?;
            let inputs: Vec<(&PeftAdapter, f64)> = loaded
                .iter()
                .zip(&args)
                .map(|(a, x)| (a, x.weight))
                .collect();
            let dir = Path::new("combined adapters");
            Ok(Some(combine(&inputs, Method::Cat, None, dir)?))
        }
    }
}

/// [`load`] for commands that need an adapter (clap already requires one `--adapter`).
pub fn load_required(specs: &[String], base: &Path) -> Result<PeftAdapter> {
    load(specs, base)?.ok_or_else(|| anyhow::anyhow!("pass --adapter ADAPTER"))
}

/// [`load`] as the model builder takes it.
pub fn adapters(specs: &[String], base: &Path) -> Result<Adapters> {
    Ok(match load(specs, base)? {
        Some(a) => Adapters::Loaded(a),
        None => Adapters::None,
    })
}

/// Writes `adapter` as a PEFT directory at `out` with its model card (all at once: temporary
/// directory, then rename), marked as made by lorakit `command`.
pub fn save_peft(
    adapter: &PeftAdapter,
    out: &Path,
    card: &lorakit_adapter::card::Card,
    command: &str,
    force: bool,
) -> Result<()> {
    use lorakit_adapter::fsutil::AtomicDir;
    // only low-rank pairs are re-written: anything else would be dropped silently
    adapter.check_pairs_only("re-writing an adapter (export --to peft, combine)")?;
    let modules: Vec<(String, lorakit_adapter::LowRank)> = adapter
        .pairs()
        .iter()
        .map(|(m, (a, b))| {
            let s = adapter.config.for_module(m).scaling;
            (
                m.clone(),
                lorakit_adapter::LowRank::new(a.clone(), b.clone(), s),
            )
        })
        .collect();
    let dir = AtomicDir::create(out, force)?;
    lorakit_adapter::save_adapter(dir.path(), &adapter.config, &modules, &Default::default())?;
    card.write(dir.path(), out, &adapter.config)?;
    lorakit_adapter::output_guard::write_marker(dir.path(), command)?;
    dir.commit()?;
    Ok(())
}

/// Refuses to write the file `out` over something it must not replace: anything without
/// `--force`, and with it a directory, one of `inputs`, or a file that is not GGUF.
pub fn check_file_output(out: &Path, force: bool, inputs: &[&Path]) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !force {
        anyhow::bail!("{} exists; pass --force to replace it", out.display());
    }
    if out.is_dir() {
        anyhow::bail!(
            "--force: lorakit will not replace {}: it is a directory, and the output is a file",
            out.display()
        );
    }
    let real = out.canonicalize()?;
    for input in inputs {
        if input
            .canonicalize()
            .is_ok_and(|p| p == real || p.starts_with(&real))
        {
            anyhow::bail!(
                "--force: lorakit will not replace {}: it is one of the inputs ({})",
                out.display(),
                input.display()
            );
        }
    }
    let mut magic = [0u8; 4];
    let is_gguf = std::fs::File::open(out)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"GGUF";
    if !is_gguf {
        anyhow::bail!(
            "--force: lorakit will not replace {}: it is not a GGUF file, so lorakit did not write it",
            out.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_weight_follows_the_last_colon_unless_the_path_exists() {
        let a = AdapterArg::parse("runs/a:0.5").unwrap();
        assert_eq!((a.path, a.weight), (PathBuf::from("runs/a"), 0.5));
        let a = AdapterArg::parse("runs/a").unwrap();
        assert_eq!((a.path, a.weight), (PathBuf::from("runs/a"), 1.0));
        let a = AdapterArg::parse("c:/x:y").unwrap();
        assert_eq!(a.path, PathBuf::from("c:/x:y"));
        assert!(AdapterArg::parse("a:inf").is_err());
    }
}
