//! The crate's modules form layers (the crate doc lists them): each module
//! uses only modules below it, so there is no import circle to untangle
//! when a newcomer reads the crate bottom up.

/// Bottom first, as in the crate doc.
const LAYERS: [&str; 14] =
    ["format", "error", "fs", "rans", "pca", "grid", "codec", "index", "records", "shard", "images", "manifest", "store", "recode"];

#[test]
fn every_module_uses_only_modules_below_it() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files: Vec<String> = std::fs::read_dir(&src)
        .expect("list src")
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".rs").map(str::to_owned))
        .filter(|m| m != "lib")
        .collect();
    files.sort();
    let mut listed: Vec<String> = LAYERS.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(files, listed, "a module was added or removed: place it in LAYERS and in the crate doc");
    let mut violations = Vec::new();
    for (level, module) in LAYERS.iter().enumerate() {
        let text = std::fs::read_to_string(src.join(format!("{module}.rs"))).expect("read module");
        // the module's own code, not its unit tests
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for (above, other) in LAYERS.iter().enumerate().skip(level + 1) {
            if code.contains(&format!("crate::{other}::")) || code.contains(&format!("crate::{other};")) {
                violations.push(format!("{module} (layer {level}) uses {other} (layer {above})"));
            }
        }
    }
    assert!(violations.is_empty(), "imports against the layers: {violations:#?}");
}
