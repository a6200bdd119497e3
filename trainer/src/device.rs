//! The device and the threads of a run: CUDA or the CPU (the binary links
//! only libtorch_cpu, so CUDA is invisible unless `libtorch_cuda.so` is
//! loaded at start-up, TOOLCHAIN.md), bf16 autocast, the split of threads
//! between libtorch and the loader, and the GPU's peak for MFU.

use tch::Device;

use crate::error::{Result, TrainError};

/// Load `libtorch_cuda.so` (from the rpath or `LD_LIBRARY_PATH`) if it can
/// be loaded; otherwise the dynamic loader's reason (e.g. the CUDA library
/// it misses). Fails cleanly on machines without CUDA libraries.
pub fn load_cuda() -> Result<(), String> {
    // SAFETY: dlopen with a constant, NUL-terminated name; the handle is
    // kept for the life of the process on purpose. dlerror's string is
    // copied at once.
    unsafe {
        if !libc::dlopen(c"libtorch_cuda.so".as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL).is_null() {
            return Ok(());
        }
        let e = libc::dlerror();
        Err(if e.is_null() { "unknown reason".into() } else { std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned() })
    }
}

/// Resolve `auto|cpu|cuda|cuda:N` to a device and a line explaining the choice.
///
/// # Errors
/// An unknown name, or CUDA asked for but not available.
pub fn choose(name: &str) -> Result<(Device, String), String> {
    let load = load_cuda();
    let loaded = load.is_ok();
    let available = loaded && tch::Cuda::is_available();
    // why CUDA is not there, in words
    let why = || match &load {
        Ok(()) => "libtorch_cuda.so loaded, but no GPU".to_string(),
        Err(e) => format!("libtorch_cuda.so not loadable: {e}; on a GPU machine, scripts/setup.sh installs the CUDA libraries"),
    };
    match name {
        "auto" if available => Ok((Device::Cuda(0), format!("training on CUDA ({} GPU(s))", tch::Cuda::device_count()))),
        "auto" if loaded => Ok((Device::Cpu, "no usable GPU: training on the CPU".into())),
        "auto" => Ok((Device::Cpu, "no CUDA libraries (libtorch_cuda.so not loadable): training on the CPU".into())),
        "cpu" => Ok((Device::Cpu, "training on the CPU (--device cpu)".into())),
        n if n.starts_with("cuda") => {
            if !available {
                return Err(format!("--device {n}: CUDA is not available ({})", why()));
            }
            let idx =
                n.strip_prefix("cuda:").map(|i| i.parse::<usize>().map_err(|e| format!("--device {n}: {e}"))).transpose()?.unwrap_or(0);
            Ok((Device::Cuda(idx), format!("training on CUDA device {idx}")))
        }
        other => Err(format!("--device {other}: expected auto, cpu, cuda or cuda:N")),
    }
}

unsafe extern "C" {
    fn caev2_set_cuda_autocast_bf16() -> std::os::raw::c_int;
    fn caev2_torch_version() -> *const std::os::raw::c_char;
}

/// libtorch's version (`2.11.0`), from the headers this build compiled
/// against, which are the library's own (setup installs them together).
pub fn libtorch_version() -> String {
    // SAFETY: the shim returns a static NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(caev2_torch_version()) }.to_string_lossy().into_owned()
}

/// The version of the CUDA runtime libtorch_cuda loaded (`13.0`); `None`
/// when none is loaded (CPU runs).
pub fn cuda_runtime_version() -> Option<String> {
    // SAFETY: RTLD_NOLOAD only finds a library already loaded; the symbol
    // is cudaRuntimeGetVersion(int*), called with a valid pointer.
    unsafe {
        let lib = libc::dlopen(c"libcudart.so.13".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if lib.is_null() {
            return None;
        }
        let f = libc::dlsym(lib, c"cudaRuntimeGetVersion".as_ptr());
        if f.is_null() {
            return None;
        }
        let f: unsafe extern "C" fn(*mut std::os::raw::c_int) -> std::os::raw::c_int = std::mem::transmute(f);
        let mut v = 0;
        (f(&mut v) == 0).then(|| format!("{}.{}", v / 1000, (v % 1000) / 10))
    }
}

/// The NVIDIA driver's version, from `/proc/driver/nvidia/version`; `None`
/// without one.
pub fn nvidia_driver_version() -> Option<String> {
    let text = std::fs::read_to_string("/proc/driver/nvidia/version").ok()?;
    // "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.86.15  ..."
    let line = text.lines().next()?;
    line.split_whitespace().find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.')).map(str::to_owned)
}

/// Make CUDA autocast use bfloat16 (the paper's mixed precision) instead of
/// tch's float16 default. Returns whether it took effect.
pub fn use_bf16_autocast() -> bool {
    // SAFETY: the shim only calls at::autocast::set_autocast_dtype and
    // catches every C++ exception.
    unsafe { caev2_set_cuda_autocast_bf16() == 0 }
}

/// The training device named `name` (`auto`, `cpu`, `cuda`, `cuda:N`; under
/// a launcher, rank `local_rank` of the node takes GPU `local_rank`), its
/// description, and whether bf16 autocast is on (on CUDA when `bf16`).
pub(crate) fn for_run(name: &str, bf16: bool, local_rank: usize) -> Result<(Device, String, bool)> {
    let (mut device, mut line) = choose(name).map_err(|what| TrainError::Device { device: name.to_owned(), what })?;
    if local_rank > 0 && matches!(name, "auto" | "cuda") && device.is_cuda() {
        // one GPU per rank of the node, as torchrun users expect
        let n = tch::Cuda::device_count().max(1) as usize;
        device = Device::Cuda(local_rank % n);
        line = format!("training on CUDA device {} (LOCAL_RANK {local_rank})", local_rank % n);
    }
    let autocast = device.is_cuda() && bf16;
    if autocast {
        if !use_bf16_autocast() {
            return Err(TrainError::Device { device: name.to_owned(), what: "cannot switch CUDA autocast to bfloat16".into() });
        }
        line.push_str(", bf16 autocast");
    } else if device.is_cuda() {
        line.push_str(", fp32");
    }
    Ok((device, line, autocast))
}

/// How `threads` are split: `(libtorch intra-op threads, loader threads)`.
///
/// On CUDA the GPU computes and libtorch's CPU pool has little to do (one
/// thread), so the loader gets the rest. On the CPU the model's compute is
/// libtorch's and takes every thread; the loader gets a quarter (at least
/// one). Its threads work only while they refill the two prefetched
/// batches, a few per cent of a CPU step, so the two rarely run at once.
/// `loader` overrides the loader's share.
pub fn thread_budget(threads: usize, cuda: bool, loader: Option<usize>) -> (usize, usize) {
    let threads = threads.max(1);
    match (cuda, loader) {
        (true, Some(l)) => (threads.saturating_sub(l).max(1), l.max(1)),
        (true, None) => (1, threads.saturating_sub(1).max(1)),
        (false, Some(l)) => (threads, l.max(1)),
        (false, None) => (threads, threads.div_ceil(4)),
    }
}

/// Dense peak TFLOP/s of the GPU named `model` (as the NVIDIA driver names
/// it) in bfloat16 (`bf16`) or fp32 without TF32 (libtorch's default for
/// matmuls), from NVIDIA's data sheets; `None` for other devices.
pub fn peak_tflops(model: &str, bf16: bool) -> Option<f64> {
    let m = model.to_ascii_uppercase();
    let (bf, fp) = if m.contains("H100") && m.contains("PCIE") {
        (756.0, 51.0)
    } else if m.contains("H100") && m.contains("NVL") {
        (835.0, 60.0)
    } else if m.contains("H100") || m.contains("H200") || m.contains("GH200") {
        (989.4, 66.9)
    } else if m.contains("A100") {
        (312.0, 19.5)
    } else {
        return None;
    };
    Some(if bf16 { bf } else { fp })
}

/// The NVIDIA GPU model of this machine, from the driver's
/// `/proc/driver/nvidia/gpus/*/information`; `None` without one, or when
/// the GPUs differ.
pub fn gpu_model() -> Option<String> {
    let mut models = std::fs::read_dir("/proc/driver/nvidia/gpus").ok()?.filter_map(|e| {
        let text = std::fs::read_to_string(e.ok()?.path().join("information")).ok()?;
        text.lines().find_map(|l| l.strip_prefix("Model:").map(|m| m.trim().to_string()))
    });
    let first = models.next()?;
    models.all(|m| m == first).then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_budget_splits_without_oversubscribing_the_gpu_host() {
        assert_eq!(thread_budget(16, true, None), (1, 15), "CUDA: the loader gets all but one");
        assert_eq!(thread_budget(16, true, Some(8)), (8, 8));
        assert_eq!(thread_budget(1, true, None), (1, 1));
        assert_eq!(thread_budget(16, false, None), (16, 4), "CPU: libtorch computes, the loader refills");
        assert_eq!(thread_budget(2, false, None), (2, 1));
        assert_eq!(thread_budget(2, false, Some(3)), (2, 3));
    }

    #[test]
    fn peaks_of_known_gpus() {
        assert_eq!(peak_tflops("NVIDIA H100 80GB HBM3", true), Some(989.4));
        assert_eq!(peak_tflops("NVIDIA H100 PCIe", true), Some(756.0));
        assert_eq!(peak_tflops("NVIDIA H200", false), Some(66.9));
        assert_eq!(peak_tflops("NVIDIA A100-SXM4-80GB", true), Some(312.0));
        assert_eq!(peak_tflops("Tesla T4", true), None);
    }
}
