//! Device and dtype choice: `auto` means CUDA with bf16 when built with `--features cuda` and a
//! GPU is present, else CPU with f32.
use crate::error::{Result, TrainError};
use candle_core::{DType, Device};

pub fn device(spec: &str) -> Result<Device> {
    let cuda = |n: usize| {
        cuda_device(n).map_err(|e| TrainError::InvalidRecipe {
            file: "recipe".into(),
            field: "model.device".into(),
            message: format!("cuda:{n} is not available ({e}); build with --features cuda on a machine with an NVIDIA GPU, or use device: cpu"),
        })
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(cuda_device(0).unwrap_or(Device::Cpu)),
        "cuda" => cuda(0),
        s => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => cuda(n),
            None => Err(TrainError::InvalidRecipe {
                file: "recipe".into(),
                field: "model.device".into(),
                message: format!("{s:?} is not one of auto, cpu, cuda, cuda:N"),
            }),
        },
    }
}

/// GPU `n`, set up for training steps that allocate thousands of buffers each:
/// - cudarc's per-buffer event tracking off: it creates two CUDA events for every allocation
///   (and destroys them with it) so that buffers can be shared between streams; candle runs a
///   device's work on one stream, where the events order nothing.
/// - the memory pool keeps what is freed: by default the driver's pool (candle allocates with
///   `cuMemAllocAsync`) hands freed memory back to the system at every synchronisation, and the
///   next step maps it again; PyTorch's caching allocator keeps it likewise. Reported peaks
///   count memory in use, not memory kept.
pub fn cuda_device(n: usize) -> candle_core::Result<Device> {
    let device = Device::new_cuda(n)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        // SAFETY: every tensor of this device lives and is used on the device's one stream.
        unsafe { d.disable_event_tracking() };
        keep_freed_memory(d)?;
    }
    Ok(device)
}

#[cfg(feature = "cuda")]
fn keep_freed_memory(d: &candle_core::CudaDevice) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let cu_device = d.cuda_stream().context().cu_device();
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut keep = u64::MAX;
    // SAFETY: driver calls on this device's default pool, writing/reading the locals above.
    let ok = unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, cu_device) == sys::CUresult::CUDA_SUCCESS
            && sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut keep as *mut u64 as *mut std::ffi::c_void,
            ) == sys::CUresult::CUDA_SUCCESS
    };
    if !ok {
        candle_core::bail!("cuda: could not set the memory pool's release threshold");
    }
    Ok(())
}

pub fn dtype(spec: &str, device: &Device) -> DType {
    match spec {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ if device.is_cuda() => DType::BF16,
        _ => DType::F32,
    }
}

/// Process settings for fast CPU training; call at start-up, before any tensor op (and before
/// other threads exist). Each setting is kept when the user set it explicitly; the figures that
/// justify them are in `benches/README.md`.
/// - candle's CPU pool for elementwise ops spins (25,000 iterations by default) after every op,
///   waiting for the next; with few cores the spinning thread takes the core the matmul threads
///   need: `CANDLE_BARRIER_POOL_SPIN_LIMIT` turns it off.
/// - glibc returns freed heap memory to the kernel eagerly, and every reuse then page-faults
///   through fresh zeroed pages (activation and logits buffers are re-allocated each step): a
///   fixed mmap threshold of 32 MiB (glibc's maximum) and a 1 GiB trim threshold
///   (`MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`) keep them in the heap.
/// - candle looks up its thread count on every CPU matmul; unless `RAYON_NUM_THREADS` is set,
///   on a Linux machine that reports no per-core capacities (VMs, most servers) the lookup
///   re-reads `/proc/cpuinfo` each time (the kernel interrupts every core to report its
///   clock). Setting the variable once to candle's own answer makes it an environment read.
pub fn tune_process() {
    const THREADS: &str = "RAYON_NUM_THREADS";
    if std::env::var_os(THREADS).is_none() {
        std::env::set_var(THREADS, candle_core::utils::get_num_threads().to_string());
    }
    const SPIN: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(SPIN).is_none() {
        std::env::set_var(SPIN, "0");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; called before other threads run.
        unsafe {
            if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            }
            if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none() {
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        }
    }
}

/// The process's peak resident set size (`VmHWM` in `/proc/self/status`); `None` off Linux.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// "frozen weights kept in GGML blocks …: 210 (Q4_1 180, Q8_0 30), 61.2 MB" for a model built
/// with quantized weights, and the linear weights a load-time quantization left dense; `None`
/// when there is nothing to say.
pub fn quantized_summary(report: &lorakit_adapter::BuildReport) -> Option<String> {
    let quantized = &report.quantized;
    let dense = match report.left_dense.len() {
        0 => String::new(),
        n => format!(
            "{}{n} linear weight(s) stay dense: their rows are not whole blocks of the model.quantize type ({}{})",
            if quantized.is_empty() { "" } else { "; " },
            report.left_dense.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
            if n > 3 { ", ..." } else { "" }
        ),
    };
    if quantized.is_empty() {
        return (!dense.is_empty()).then(|| format!("warning: {dense}"));
    }
    let mut by_type: std::collections::BTreeMap<String, usize> = Default::default();
    for (_, ty, _) in quantized {
        *by_type.entry(format!("{ty:?}")).or_default() += 1;
    }
    let bytes: usize = quantized.iter().map(|(_, _, b)| b).sum();
    let types: Vec<String> = by_type.iter().map(|(t, n)| format!("{t} {n}")).collect();
    Some(format!(
        "frozen weights kept in GGML blocks (dequantized just in time): {} ({}), {:.1} MB{dense}",
        quantized.len(),
        types.join(", "),
        bytes as f64 / 1e6
    ))
}
