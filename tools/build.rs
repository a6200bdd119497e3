//! 1. Link the `caev2` binary with an rpath to libtorch (TOOLCHAIN.md):
//!    without it it fails with "libtorch_cpu.so: cannot open shared object
//!    file" unless LD_LIBRARY_PATH is set.
//! 2. Record the git commit it is built from (`CAEV2_GIT_COMMIT`, for a
//!    run's provenance), when built in a git checkout.
use std::path::Path;
use std::process::Command;

fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = root.join(".git");
    if !git.is_dir() {
        return;
    }
    // a new commit moves HEAD or the branch it names
    println!("cargo:rerun-if-changed={}", git.join("HEAD").display());
    if let Ok(head) = std::fs::read_to_string(git.join("HEAD"))
        && let Some(branch) = head.trim().strip_prefix("ref: ")
    {
        println!("cargo:rerun-if-changed={}", git.join(branch).display());
    }
    let out = Command::new("git").arg("-C").arg(&root).args(["rev-parse", "HEAD"]).output();
    if let Ok(o) = out
        && o.status.success()
    {
        println!("cargo:rustc-env=CAEV2_GIT_COMMIT={}", String::from_utf8_lossy(&o.stdout).trim());
    }
}
