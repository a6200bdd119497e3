//! Choosing the device. The binary links only libtorch_cpu, so CUDA is
//! invisible unless `libtorch_cuda.so` is loaded at start-up (TOOLCHAIN.md).

use tch::Device;

/// Load `libtorch_cuda.so` (from the rpath or `LD_LIBRARY_PATH`) if it can
/// be loaded; returns whether it was. Fails cleanly on machines without
/// CUDA libraries.
pub fn load_cuda() -> bool {
    // SAFETY: dlopen with a constant, NUL-terminated name; the handle is
    // kept for the life of the process on purpose.
    let handle = unsafe { libc::dlopen(c"libtorch_cuda.so".as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    !handle.is_null()
}

/// Resolve `auto|cpu|cuda|cuda:N` to a device and a line explaining the choice.
///
/// # Errors
/// An unknown name, or CUDA asked for but not available.
pub fn choose(name: &str) -> Result<(Device, String), String> {
    let loaded = load_cuda();
    let available = loaded && tch::Cuda::is_available();
    match name {
        "auto" if available => Ok((Device::Cuda(0), format!("training on CUDA ({} GPU(s))", tch::Cuda::device_count()))),
        "auto" => Ok((
            Device::Cpu,
            if loaded {
                "no usable GPU: training on the CPU".into()
            } else {
                "libtorch_cuda.so not loadable (no CUDA libraries): training on the CPU".into()
            },
        )),
        "cpu" => Ok((Device::Cpu, "training on the CPU (--device cpu)".into())),
        n if n.starts_with("cuda") => {
            if !available {
                return Err(format!(
                    "--device {n}: CUDA is not available (libtorch_cuda.so {})",
                    if loaded { "loaded, but no GPU" } else { "not loadable" }
                ));
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
}

/// Make CUDA autocast use bfloat16 (the paper's mixed precision) instead of
/// tch's float16 default. Returns whether it took effect.
pub fn use_bf16_autocast() -> bool {
    // SAFETY: the shim only calls at::autocast::set_autocast_dtype and
    // catches every C++ exception.
    unsafe { caev2_set_cuda_autocast_bf16() == 0 }
}
