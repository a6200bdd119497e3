//! Link the test and bench binaries of this crate with an rpath to libtorch
//! (TOOLCHAIN.md): without it they fail with "libtorch_cpu.so: cannot open
//! shared object file" unless LD_LIBRARY_PATH is set.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
