//! Remember where scripts/setup.sh put ONNX Runtime and the models, so the
//! binaries find them without sourcing `.deps/env.sh`. Environment variables
//! at run time still take precedence.
fn main() {
    let ws = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(|p| p.to_path_buf()).unwrap_or_default();
    let deps = ws.join(".deps");
    println!("cargo:rustc-env=CAEV2_BUILD_DEPS_DIR={}", deps.display());
    println!("cargo:rerun-if-changed=build.rs");
}
