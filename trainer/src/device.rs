//! Choosing the device. The binary links only libtorch_cpu, so CUDA is
//! invisible unless `libtorch_cuda.so` is loaded at start-up (TOOLCHAIN.md).

use tch::Device;

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
}

/// Make CUDA autocast use bfloat16 (the paper's mixed precision) instead of
/// tch's float16 default. Returns whether it took effect.
pub fn use_bf16_autocast() -> bool {
    // SAFETY: the shim only calls at::autocast::set_autocast_dtype and
    // catches every C++ exception.
    unsafe { caev2_set_cuda_autocast_bf16() == 0 }
}
