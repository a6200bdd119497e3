//! 1. Link the test and bench binaries of this crate with an rpath to
//!    libtorch (TOOLCHAIN.md): without it they fail with "libtorch_cpu.so:
//!    cannot open shared object file" unless LD_LIBRARY_PATH is set.
//! 2. Compile `src/autocast.cpp`, which sets the CUDA autocast dtype to
//!    bfloat16 (tch exposes autocast but not its dtype).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src/autocast.cpp");
    let lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports DEP_TCH_LIBTORCH_LIB"));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    let include = lib.parent().expect("libtorch root").join("include");
    cc::Build::new()
        .cpp(true)
        .file("src/autocast.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={}", std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into())))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile("caev2_autocast");
}
