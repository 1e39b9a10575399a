//! Builds the kernels' shared element math (csrc/row_math.c) for the CPU tests, and with the
//! `cuda` feature compiles csrc/fused.cu with nvcc into a fatbin of sm_80 and sm_90 cubins
//! (no PTX: nothing is JIT-compiled on the first step). nvcc is found through `NVCC`,
//! `CUDA_HOME/bin` or `PATH`.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    cc::Build::new()
        .file("csrc/row_math.c")
        .opt_level(2)
        .warnings(true)
        .compile("lorakit_row_math");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("fused.fatbin");
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let status = Command::new(&nvcc)
        .args(["-fatbin", "-O3", "-std=c++17"])
        .args(["-gencode", "arch=compute_80,code=sm_80"])
        .args(["-gencode", "arch=compute_90,code=sm_90"])
        .arg("-o")
        .arg(&out)
        .arg("csrc/fused.cu")
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "could not run {}: {e} (set NVCC or CUDA_HOME)",
                nvcc.display()
            )
        });
    assert!(status.success(), "nvcc failed on csrc/fused.cu");
}
