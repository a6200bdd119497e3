//! Formats v1 and v2, pinned: three tiny stores committed under
//! `tests/golden/` (v1 in f16 and f32, v2 in f16 with its images; 5 images
//! in 2 shards, one image skipped, 2 views each). This build must read
//! them, and its writer must reproduce them byte for byte. When a change
//! makes this test fail, the on-disk format changed: either undo the change
//! or bump the format version, document it in FORMAT.md and keep reading
//! the older versions.
//!
//! `CAEV2_WRITE_GOLDEN=1 cargo test -p shard-store --test golden --
//! --exact the_writer_reproduces_the_golden_bytes` rewrites the folders (only
//! for a deliberate new version).

use std::path::{Path, PathBuf};

use caev2_views::{ViewSampler, ViewSettings};
use shard_store::*;

/// The pinned store ids (first 12 bytes of SHA-256 of the canonical identity JSON).
const STORE_ID_F16: &str = "2a8921e489df807e2f27fa03";
const STORE_ID_F32: &str = "0bb4ead19f09bbe2953750a7";
const STORE_ID_V2_F16: &str = "85fd5ec577c751989daac6f7";

/// The golden stores: (folder, codec, images embedded, store id).
const GOLDEN: [(&str, Codec, bool, &str); 3] = [
    ("v1-f16", Codec::F16, false, STORE_ID_F16),
    ("v1-f32", Codec::F32, false, STORE_ID_F32),
    ("v2-f16", Codec::F16, true, STORE_ID_V2_F16),
];

fn golden_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name)
}

/// The file bytes of golden image `img` (not a real image: the store keeps
/// whatever bytes it is given).
fn image_bytes(img: u64) -> Vec<u8> {
    format!("golden image {img} ").repeat(img as usize + 1).into_bytes()
}

fn paths() -> Vec<String> {
    (0..5).map(|i| format!("{}/img{i}.jpg", if i % 2 == 0 { "cat" } else { "dog" })).collect()
}

fn image_size(img: u64) -> (u32, u32) {
    (100 + img as u32 * 7, 80 + img as u32 * 3)
}

fn manifest(codec: Codec, embed: bool) -> Manifest {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut sorted = paths();
    sorted.sort();
    for p in &sorted {
        h.update(p.as_bytes());
        h.update(b"\n");
    }
    Manifest::new(
        TeacherInfo {
            name: "golden".into(),
            onnx_sha256: "ab".repeat(32),
            output: "tokens".into(),
            input_size: 32,
            mean: [0.5, 0.25, 0.125],
            std: [0.5; 3],
            patch_size: 16,
            has_cls: true,
            grid: [2, 2],
            tokens: 5,
            dim: 4,
            precision: "fp32".into(),
        },
        ViewsInfo { seed: 7, views_per_image: 2, settings: ViewSettings::cae_v2(112, 32), decoder: "golden-decoder".into() },
        codec,
        DatasetInfo {
            root: "/golden".into(),
            num_images: 5,
            file_list_sha256: hex::encode(h.finalize()),
            classes: vec!["cat".into(), "dog".into()],
        },
        Layout::new(5, 3),
        "caev2 golden".into(),
    )
    .with_embedded_images(embed)
}

fn value(image: u64, view: u32, i: usize) -> f32 {
    (image as f32 - 2.0) * 1.5 + view as f32 * 0.25 + i as f32 / 3.0
}

/// Write the golden store with this build's writer.
fn write(root: &Path, codec: Codec, embed: bool) {
    let m = manifest(codec, embed);
    let w = StoreWriter::create_or_open(root, &m).expect("create");
    let sampler = ViewSampler::new(m.views.seed, m.views.settings.clone());
    let names = paths();
    for s in 0..m.layout.num_shards {
        let claim = w.try_claim(s).expect("claim").expect("free");
        let mut sw = claim.writer().expect("writer");
        let mut pack = claim.image_writer().expect("image pack");
        let (mut rows, mut skipped) = (Vec::new(), Vec::new());
        let range = m.layout.images_of(s, m.dataset.num_images);
        for img in range.clone() {
            if img == 3 {
                skipped.push(Skipped { image_id: 3, path: names[3].clone(), reason: "undecodable (golden)".into() });
                continue;
            }
            if let Some(p) = pack.as_mut() {
                p.write(img, &image_bytes(img)).expect("image");
            }
            for v in 0..2 {
                let vals: Vec<f32> = (0..20).map(|i| value(img, v, i)).collect();
                let e = sw.write((img - range.start) * 2 + u64::from(v), &vals).expect("write");
                let (wd, ht) = image_size(img);
                rows.push(IndexRow {
                    image_id: img,
                    path: names[img as usize].clone(),
                    label: Some((img % 2) as i32),
                    view: v,
                    params: sampler.sample(img, v, wd, ht),
                    shard: s,
                    offset: e.offset,
                    length: e.length,
                    crc32c: e.crc,
                });
            }
        }
        let report = ShardReport::new(s, range, rows.len() as u64, skipped);
        claim.commit(sw, pack, &rows, report).expect("commit");
    }
}

/// Every file of a store except lock files (empty, created by flock), sorted.
fn files(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in ["", "shards", "index", "images", "done"] {
        let dir = root.join(sub);
        if sub == "images" && !dir.exists() {
            continue;
        }
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let p = e.expect("entry").path();
            if p.is_file() {
                let rel = p.strip_prefix(root).expect("inside").display().to_string();
                out.push((rel, std::fs::read(&p).expect("read")));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn golden_stores_are_read() {
    for (name, codec, embed, id) in GOLDEN {
        let dir = golden_dir(name);
        let store = Store::open(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let m = store.manifest();
        assert_eq!(m.store_id, id, "{name}");
        assert_eq!(m.format_version, if embed { 2 } else { 1 });
        assert_eq!(m.codec, codec);
        assert_eq!(m.embeds_images(), embed);
        assert_eq!(m.identity_json().len(), manifest(codec, embed).identity_json().len());
        let rows = store.index().expect("index");
        assert_eq!(rows.len(), 8, "4 stored images x 2 views");
        let sampler = ViewSampler::new(7, m.views.settings.clone());
        for r in &rows {
            let (w, h) = image_size(r.image_id);
            assert_eq!(r.params, sampler.sample(r.image_id, r.view, w, h));
            assert_eq!(r.path, paths()[r.image_id as usize]);
            let got = store.targets(r.image_id, r.view).expect("read").expect("stored").to_vec();
            for (i, g) in got.iter().enumerate() {
                let want = value(r.image_id, r.view, i);
                let tol = if codec == Codec::F16 { want.abs() * 1e-3 } else { 0.0 };
                assert!((g - want).abs() <= tol, "image {} view {} value {i}: {g} vs {want}", r.image_id, r.view);
            }
        }
        assert!(store.targets(3, 0).expect("read").is_none(), "image 3 is skipped");
        for img in 0..5u64 {
            match store.image(img) {
                Ok(bytes) if embed => assert_eq!(bytes, (img != 3).then(|| image_bytes(img)).as_deref(), "{name} image {img}"),
                Err(_) if !embed => {}
                other => panic!("{name} image {img}: {other:?}"),
            }
        }
        let report = store.report(1).expect("report").expect("done");
        assert_eq!((report.first_image, report.num_images, report.views_stored, report.skipped.len()), (3, 2, 2, 1));
        assert!(report.index_crc32c.is_some());
        assert_eq!(report.images_bytes.is_some(), embed);
    }
}

#[test]
fn the_writer_reproduces_the_golden_bytes() {
    for (name, codec, embed, _) in GOLDEN {
        let dir = golden_dir(name);
        if std::env::var_os("CAEV2_WRITE_GOLDEN").is_some() {
            // run alone: `-- --exact the_writer_reproduces_the_golden_bytes`
            let _ = std::fs::remove_dir_all(&dir);
            write(&dir, codec, embed);
            let _ = std::fs::remove_dir_all(dir.join("locks"));
        }
        let tmp = tempfile::tempdir().expect("tmp");
        write(tmp.path(), codec, embed);
        let (want, got) = (files(&dir), files(tmp.path()));
        let names = |v: &[(String, Vec<u8>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(names(&got), names(&want), "{name}: the same files");
        for ((name, a), (_, b)) in got.iter().zip(&want) {
            let first = a.iter().zip(b).position(|(x, y)| x != y).or((a.len() != b.len()).then(|| a.len().min(b.len())));
            assert!(first.is_none(), "{codec:?} {name}: differs from the golden file at byte {first:?} ({} vs {} bytes)", a.len(), b.len());
        }
    }
}

#[test]
fn newer_format_versions_are_refused_by_name() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = golden_dir("v1-f16");
    let text = std::fs::read_to_string(dir.join(MANIFEST_FILE)).expect("manifest");
    std::fs::write(tmp.path().join(MANIFEST_FILE), text.replace("\"format_version\": 1", "\"format_version\": 3")).expect("write");
    let e = Store::open_partial(tmp.path()).expect_err("version 3").to_string();
    assert!(e.contains("format version 3") && e.contains("versions 1 to 2"), "{e}");
    // a version 1 manifest relabelled 2 has no images: corrupt, not a store without them
    std::fs::write(tmp.path().join(MANIFEST_FILE), text.replace("\"format_version\": 1", "\"format_version\": 2")).expect("write");
    let e = Store::open_partial(tmp.path()).expect_err("version 2 without images").to_string();
    assert!(e.contains("format_version 2 with images None"), "{e}");
}
