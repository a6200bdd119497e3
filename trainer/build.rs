//! 1. Link the test and bench binaries of this crate with an rpath to
//!    libtorch (TOOLCHAIN.md): without it they fail with "libtorch_cpu.so:
//!    cannot open shared object file" unless LD_LIBRARY_PATH is set.
//! 2. Compile `src/runtime.cpp`, which sets the CUDA autocast dtype to
//!    bfloat16 (tch exposes autocast but not its dtype) and tells
//!    libtorch's version.
//! 3. Compile `src/optim.cpp`: ATen's fused AdamW and sync-free gradient
//!    clipping (multi-tensor kernels tch does not wrap).
//! 4. Compile `src/dist.cpp`, the binding to libtorch's c10d (TCPStore +
//!    ProcessGroupGloo) for data-parallel training. It needs the gloo
//!    headers that `scripts/setup.sh` installs (`CAEV2_GLOO_INCLUDE`).
use std::path::PathBuf;

fn torch_build(include: &std::path::Path) -> cc::Build {
    let mut b = cc::Build::new();
    b.cpp(true)
        .include(include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={}", std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into())))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false);
    b
}

fn main() {
    println!("cargo:rerun-if-changed=src/runtime.cpp");
    println!("cargo:rerun-if-changed=src/dist.cpp");
    println!("cargo:rerun-if-changed=src/optim.cpp");
    println!("cargo:rerun-if-env-changed=CAEV2_GLOO_INCLUDE");
    let lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports DEP_TCH_LIBTORCH_LIB"));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    let include = lib.parent().expect("libtorch root").join("include");
    torch_build(&include).file("src/runtime.cpp").compile("caev2_runtime");
    torch_build(&include).file("src/optim.cpp").compile("caev2_optim");

    let gloo = std::env::var_os("CAEV2_GLOO_INCLUDE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")).join("../.deps/gloo/include")
    });
    assert!(
        gloo.join("gloo/algorithm.h").exists(),
        "gloo headers not found in {} (run scripts/setup.sh, or set CAEV2_GLOO_INCLUDE)",
        gloo.display()
    );
    torch_build(&include)
        .include(&gloo)
        .define("USE_C10D_GLOO", None)
        .define("USE_DISTRIBUTED", None)
        .file("src/dist.cpp")
        .compile("caev2_dist");
}
