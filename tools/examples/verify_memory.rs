//! Peak memory of `caev2 inspect verify` as a store grows: synthetic stores
//! of 8, 32 and 128 shards (500 images x 2 views of 50 x 40 f16 targets,
//! 4 MB a shard), each verified by a fresh process whose peak RSS is read
//! from `wait4`. With `--baseline BIN`, another caev2 binary verifies the
//! same stores side by side (an older build, to compare).
//!
//! ```sh
//! cargo build --release -p tools --bin caev2
//! cargo run --release -p tools --example verify_memory -- [--baseline OLD_CAEV2] [--dir DIR]
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use caev2_views::{DECODER_ID, ViewSampler, ViewSettings};
use sha2::Digest;
use shard_store::*;

const IMAGES_PER_SHARD: u32 = 500;
const VIEWS: u32 = 2;
const TOKENS: u32 = 50;
const DIM: u32 = 40;

fn manifest(num_images: u64) -> Manifest {
    let mut paths = sha2::Sha256::new();
    for id in 0..num_images {
        paths.update(format!("c/{id:08}.JPEG\n").as_bytes());
    }
    Manifest::new(
        TeacherInfo {
            name: "synthetic".into(),
            onnx_sha256: "00".repeat(32),
            output: "tokens".into(),
            input_size: 224,
            mean: [0.5; 3],
            std: [0.5; 3],
            patch_size: 32,
            has_cls: true,
            grid: [7, 7],
            tokens: TOKENS,
            dim: DIM,
            precision: "fp32".into(),
        },
        ViewsInfo { seed: 0, views_per_image: VIEWS, settings: ViewSettings::cae_v2(112, 224), decoder: DECODER_ID.into() },
        Codec::F16,
        DatasetInfo { root: "/synthetic".into(), num_images, file_list_sha256: hex::encode(paths.finalize()), classes: vec![] },
        Layout::new(num_images, IMAGES_PER_SHARD),
        "verify_memory example".into(),
    )
}

fn make_store(root: &Path, shards: u32) -> anyhow::Result<()> {
    let m = manifest(u64::from(shards * IMAGES_PER_SHARD));
    let w = StoreWriter::create_or_open(root, &m)?;
    let sampler = ViewSampler::new(0, m.views.settings.clone());
    let values: Vec<f32> = (0..TOKENS * DIM).map(|i| (i as f32 * 0.01).sin()).collect();
    for s in 0..shards {
        let Some(claim) = w.try_claim(s)? else { continue };
        let mut sw = claim.writer()?;
        let range = m.layout.images_of(s, m.dataset.num_images);
        let mut rows = Vec::new();
        for img in range.clone() {
            for v in 0..VIEWS {
                let e = sw.write((img - range.start) * u64::from(VIEWS) + u64::from(v), &values)?;
                rows.push(IndexRow {
                    image_id: img,
                    path: format!("c/{img:08}.JPEG"),
                    label: None,
                    view: v,
                    params: sampler.sample(img, v, 500, 375),
                    shard: s,
                    offset: e.offset,
                    length: e.length,
                    crc32c: e.crc,
                });
            }
        }
        let report = ShardReport::new(s, range, rows.len() as u64, Vec::new());
        claim.commit(sw, None, &rows, report)?;
    }
    Ok(())
}

/// Peak RSS in MB of `bin inspect verify store`, and whether it passed.
fn verify_peak(bin: &Path, store: &Path) -> anyhow::Result<(f64, bool)> {
    let child = Command::new(bin).args(["inspect", "verify"]).arg(store).stdout(std::process::Stdio::null()).spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our unwaited child; both pointers are valid for writes.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    anyhow::ensure!(rc == pid, "wait4 failed");
    Ok((usage.ru_maxrss as f64 / 1024.0, libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(PathBuf::from);
    let root = flag("--dir").unwrap_or_else(|| std::env::temp_dir().join("caev2-verify-memory"));
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/caev2");
    let mut bins = vec![("this build", bin)];
    if let Some(b) = flag("--baseline") {
        bins.push(("baseline", b));
    }
    println!("| shards | views | on disk | {} |", bins.iter().map(|(n, _)| format!("peak RSS, {n}")).collect::<Vec<_>>().join(" | "));
    println!("|---:|---:|---:|{}", "---:|".repeat(bins.len()));
    for shards in [8u32, 32, 128] {
        let store = root.join(format!("s{shards}"));
        make_store(&store, shards)?;
        let bytes: u64 = std::fs::read_dir(store.join("shards"))?.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum();
        let mut cells = Vec::new();
        for (name, b) in &bins {
            let (mb, ok) = verify_peak(b, &store)?;
            anyhow::ensure!(ok, "{name}: verify failed on {}", store.display());
            cells.push(format!("{mb:.0} MB"));
        }
        println!("| {shards} | {} | {:.0} MB | {} |", u64::from(shards * IMAGES_PER_SHARD * VIEWS), bytes as f64 / 1e6, cells.join(" | "));
    }
    Ok(())
}
