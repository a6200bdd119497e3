//! Store-level behaviour: commit, O(1) access, streaming, refusal of
//! incompatible settings, exclusive claims and crash leftovers.

use std::path::Path;

use caev2_views::{ViewSampler, ViewSettings};
use shard_store::*;

fn manifest(codec: Codec, seed: u64) -> Manifest {
    Manifest::new(
        TeacherInfo {
            name: "toy".into(),
            onnx_sha256: "00".repeat(32),
            output: "tokens".into(),
            input_size: 32,
            mean: [0.5; 3],
            std: [0.5; 3],
            patch_size: 16,
            has_cls: true,
            grid: [2, 2],
            tokens: 5,
            dim: 4,
            precision: "fp32".into(),
        },
        ViewsInfo { seed, views_per_image: 2, settings: ViewSettings::cae_v2(224, 32), decoder: "test".into() },
        codec,
        DatasetInfo { root: "/x".into(), num_images: 5, file_list_sha256: "11".repeat(32), classes: vec![] },
        Layout::new(5, 2),
        "test".into(),
    )
}

fn value(image: u64, view: u32, i: usize) -> f32 {
    image as f32 * 10.0 + view as f32 + i as f32 / 64.0
}

/// Fill every shard, skipping image 3.
fn fill(root: &Path, m: &Manifest) {
    let w = StoreWriter::create_or_open(root, m).expect("create");
    let sampler = ViewSampler::new(0, m.views.settings.clone());
    for s in 0..m.layout.num_shards {
        let claim = w.try_claim(s).expect("claim").expect("free");
        let mut sw = claim.writer().expect("writer");
        let mut rows = Vec::new();
        let mut skipped = Vec::new();
        let range = m.layout.images_of(s, m.dataset.num_images);
        for img in range.clone() {
            if img == 3 {
                skipped.push(Skipped { image_id: 3, path: "b/3.jpg".into(), reason: "broken".into() });
                continue;
            }
            for v in 0..2 {
                let vals: Vec<f32> = (0..20).map(|i| value(img, v, i)).collect();
                let slot = (img - range.start) * 2 + u64::from(v);
                let e = sw.write(slot, &vals).expect("write");
                rows.push(IndexRow {
                    image_id: img,
                    path: format!("a/{img}.jpg"),
                    label: Some(img as i32 % 2),
                    view: v,
                    params: sampler.sample(img, v, 100, 80),
                    shard: s,
                    offset: e.offset,
                    length: e.length,
                    crc32c: e.crc,
                });
            }
        }
        let report = ShardReport::new(s, range.clone(), rows.len() as u64, skipped);
        claim.commit(sw, None, &rows, report).expect("commit");
    }
}

#[test]
fn write_then_read_every_way() {
    let dir = tempfile::tempdir().expect("tmp");
    let m = manifest(Codec::F32, 0);
    fill(dir.path(), &m);
    let store = Store::open(dir.path()).expect("open");
    let t = store.targets(4, 1).expect("ok").expect("present");
    assert_eq!(t.as_f32().expect("f32 zero-copy")[7], value(4, 1, 7));
    assert!(store.targets(3, 0).expect("ok").is_none(), "skipped image has no targets");
    assert!(store.targets(5, 0).is_err(), "out of range");
    let streamed: Vec<_> = store.stream().collect::<Result<_>>().expect("stream");
    assert_eq!(streamed.len(), 8);
    for (row, t) in &streamed {
        assert_eq!(t.to_vec()[3], value(row.image_id, row.view, 3));
    }
    let index = store.index().expect("index");
    assert_eq!(index.len(), 8);
    assert_eq!(index[0].params, ViewSampler::new(0, m.views.settings.clone()).sample(0, 0, 100, 80), "params round-trip through parquet");
    assert_eq!(store.report(1).expect("report").expect("done").skipped[0].reason, "broken");
}

#[test]
fn f16_store_is_zero_copy_and_close() {
    let dir = tempfile::tempdir().expect("tmp");
    fill(dir.path(), &manifest(Codec::F16, 0));
    let store = Store::open(dir.path()).expect("open");
    let t = store.targets(2, 0).expect("ok").expect("present");
    let h = t.as_f16().expect("f16 zero-copy");
    assert!((h[5].to_f32() - value(2, 0, 5)).abs() < 0.02);
}

#[test]
fn incompatible_store_is_refused_with_the_field_named() {
    let dir = tempfile::tempdir().expect("tmp");
    StoreWriter::create_or_open(dir.path(), &manifest(Codec::F16, 0)).expect("create");
    let err = StoreWriter::create_or_open(dir.path(), &manifest(Codec::F16, 1)).expect_err("seed differs").to_string();
    assert!(err.contains("views.seed"), "{err}");
    let err = StoreWriter::create_or_open(dir.path(), &manifest(Codec::F32, 0)).expect_err("codec differs").to_string();
    assert!(err.contains("codec"), "{err}");
}

#[test]
fn incomplete_store_is_refused_and_claims_are_exclusive() {
    let dir = tempfile::tempdir().expect("tmp");
    let m = manifest(Codec::F16, 0);
    let w1 = StoreWriter::create_or_open(dir.path(), &m).expect("create");
    let w2 = StoreWriter::create_or_open(dir.path(), &m).expect("reopen");
    let c = w1.try_claim(0).expect("claim").expect("free");
    assert!(w2.try_claim(0).expect("claim").is_none(), "second writer must not get a held shard");
    // a crashed writer's temporary file is cleaned when the shard is claimed again
    let stale = dir.path().join("shards/.shard-00000.bin.abc.tmp");
    std::fs::write(&stale, b"junk").expect("write");
    drop(c);
    let _c = w2.try_claim(0).expect("claim").expect("free after release");
    assert!(!stale.exists());
    let err = Store::open(dir.path()).expect_err("incomplete").to_string();
    assert!(err.contains("3 of 3 shards are not complete"), "{err}");
}

#[test]
fn shard_from_another_store_is_refused() {
    let a = tempfile::tempdir().expect("tmp");
    let b = tempfile::tempdir().expect("tmp");
    fill(a.path(), &manifest(Codec::F16, 0));
    fill(b.path(), &manifest(Codec::F16, 9));
    std::fs::copy(b.path().join("shards/shard-00001.bin"), a.path().join("shards/shard-00001.bin")).expect("copy");
    let store = Store::open(a.path()).expect("open");
    let err = store.targets(2, 0).expect_err("foreign shard").to_string();
    assert!(err.contains("another store"), "{err}");
}

/// A fitted codec's model is written once: a second run reuses it without
/// fitting, and of two runs fitting at once the first manifest wins, the
/// loser removes its own model file and writes with the winner's.
#[test]
fn fitted_models_are_reused_and_racing_fits_resolve_to_one() {
    let fit = |scale: f32| {
        let sample: Vec<f32> = (0..8 * 20).map(|i| ((i as f32) * 0.37 * scale).sin() + 0.3).collect();
        PcaModel::fit(&sample, 5, 4, true, (2, 2), 0.99)
    };
    let m = manifest(Codec::Pca, 0).with_codec_fit(Some(CodecFit { views: 8, cosine: 0.99, file: String::new(), sha256: String::new() }));
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path();
    let err = StoreWriter::create_or_open(root, &m).expect_err("a new pca store needs a fit").to_string();
    assert!(err.contains("needs a fitted model"), "{err}");
    let loser_model = fit(1.0).expect("fit");
    let mut winner_sha = String::new();
    let w = StoreWriter::create_or_open_fitting(root, &m, || {
        // another process finishes creating the store meanwhile
        let other = StoreWriter::create_or_open_fitting(root, &m, || fit(2.0)).expect("winner");
        winner_sha = other.codec_model().expect("model").sha256().to_owned();
        Ok::<_, StoreError>(loser_model.clone())
    })
    .expect("loser opens the winner's store");
    assert_ne!(winner_sha, loser_model.sha256());
    assert_eq!(w.codec_model().expect("model").sha256(), winner_sha);
    let models: Vec<String> = std::fs::read_dir(root)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("codec-pca-"))
        .collect();
    assert_eq!(models, vec![w.manifest().codec_fit.as_ref().expect("fit").file.clone()]);
    let again = StoreWriter::create_or_open_fitting(root, &m, || -> Result<PcaModel> { panic!("an existing store is not refitted") });
    assert_eq!(again.expect("reopen").codec_model().expect("model").sha256(), winner_sha);
}

/// Store files are readable by whoever the umask lets read them (a shared
/// store on a cluster file system), not only by their writer.
#[test]
fn store_files_follow_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let umask = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Umask:").and_then(|v| u32::from_str_radix(v.trim(), 8).ok())))
        .expect("umask");
    let dir = tempfile::tempdir().expect("tmp");
    fill(dir.path(), &manifest(Codec::F16, 0));
    for f in [
        dir.path().join("manifest.json"),
        dir.path().join("shards/shard-00000.bin"),
        dir.path().join("index/shard-00000.parquet"),
        dir.path().join("done/shard-00000.json"),
    ] {
        let mode = std::fs::metadata(&f).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !umask, "{}", f.display());
    }
}
