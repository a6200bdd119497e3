//! Property tests: whatever bytes a shard file or an index part holds,
//! `ShardReader::open` and `read_index` return a value or an error, never
//! panic. Mutations are random (seeded, so failures reproduce) and, for
//! shards, include fields set to extreme values with every checksum fixed
//! up, so that the checks past the checksums are exercised too.

use std::path::Path;

use caev2_views::{SplitMix64, ViewSampler, ViewSettings};
use shard_store::*;

fn header() -> ShardHeader {
    ShardHeader {
        codec: Codec::F16,
        shard_index: 0,
        views_per_image: 2,
        first_image: 0,
        num_images: 3,
        tokens: 5,
        dim: 4,
        store_id: [7; 12],
    }
}

fn valid_shard(path: &Path) -> Vec<u8> {
    let mut w = ShardWriter::create(path, header()).expect("create");
    for slot in [0u64, 1, 2, 3, 5] {
        let vals: Vec<f32> = (0..20).map(|i| slot as f32 + i as f32 / 8.0).collect();
        w.write(slot, &vals).expect("write");
    }
    w.finish().expect("finish");
    std::fs::read(path).expect("read")
}

/// Recompute the header, table and footer checksums of a (mutated) shard,
/// where the layout still lets us find them.
fn fix_checksums(b: &mut [u8]) {
    if b.len() >= 64 {
        let c = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&c.to_le_bytes());
    }
    if b.len() >= 64 + 32 {
        let f = b.len() - 32;
        let table_offset = u64::from_le_bytes(b[f..f + 8].try_into().expect("8 bytes"));
        if let Ok(t) = usize::try_from(table_offset)
            && t <= f
        {
            let c = crc32c::crc32c(&b[t..f]);
            b[f + 16..f + 20].copy_from_slice(&c.to_le_bytes());
        }
        let c = crc32c::crc32c(&b[f..f + 20]);
        b[f + 20..f + 24].copy_from_slice(&c.to_le_bytes());
    }
}

fn exercise(path: &Path) {
    if let Ok(r) = ShardReader::open(path) {
        for slot in 0..r.header().num_slots().min(10_000) + 2 {
            let _ = r.record(slot);
            let _ = r.record_checked(slot);
        }
        let _ = r.verify_records();
    }
}

#[test]
fn shard_reader_never_panics_on_damaged_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let good = valid_shard(&dir.path().join("good.bin"));
    let path = dir.path().join("bad.bin");
    let extremes = [0u64, 1, 63, 64, u64::from(u32::MAX), u64::MAX / 16, u64::MAX - 1, u64::MAX];
    let mut rng = SplitMix64::new(2026);
    for case in 0..3000 {
        let mut b = good.clone();
        for _ in 0..1 + rng.below(3) {
            match rng.below(5) {
                0 if !b.is_empty() => {
                    let i = rng.below(b.len() as u64) as usize;
                    b[i] ^= 1 << rng.below(8);
                }
                1 => b.truncate(rng.below(b.len() as u64) as usize),
                // a header field (codec, K, first image, count, T, D) to an extreme
                2 => {
                    let at = [12usize, 20, 24, 32, 36, 40][rng.below(6) as usize];
                    let v = extremes[rng.below(extremes.len() as u64) as usize];
                    let width = if at == 24 { 8 } else { 4 };
                    if at + width <= b.len() {
                        b[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
                    }
                }
                // a table entry or footer field to an extreme
                _ => {
                    if b.len() > 96 {
                        let f = b.len() - 32;
                        let at = if rng.below(2) == 0 {
                            f + 8 * rng.below(2) as usize
                        } else {
                            64 + 16 * rng.below(((f - 64) / 16) as u64) as usize
                        };
                        let v = extremes[rng.below(extremes.len() as u64) as usize];
                        if at + 8 <= b.len() {
                            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
                        }
                    }
                }
            }
        }
        if rng.below(4) != 0 {
            fix_checksums(&mut b);
        }
        std::fs::write(&path, &b).expect("write");
        let outcome = std::panic::catch_unwind(|| exercise(&path));
        assert!(outcome.is_ok(), "case {case}: ShardReader panicked on {} bytes", b.len());
    }
}

#[test]
fn index_reader_never_panics_on_damaged_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("good.parquet");
    let sampler = ViewSampler::new(0, ViewSettings::cae_v2(224, 224));
    let rows: Vec<IndexRow> = (0..40u64)
        .map(|i| IndexRow {
            image_id: i / 2,
            path: format!("n01/img{i}.JPEG"),
            label: Some((i % 3) as i32),
            view: (i % 2) as u32,
            params: sampler.sample(i / 2, (i % 2) as u32, 500, 375),
            shard: 0,
            offset: 64 + i * 64,
            length: 40,
            crc32c: i as u32,
        })
        .collect();
    std::fs::write(&path, encode_index(&path, &rows).expect("encode")).expect("write");
    assert_eq!(read_index(&path).expect("read"), rows);
    let good = std::fs::read(&path).expect("read");
    let bad = dir.path().join("bad.parquet");
    let mut rng = SplitMix64::new(9);
    for case in 0..1500 {
        let mut b = good.clone();
        for _ in 0..1 + rng.below(3) {
            if rng.below(6) == 0 {
                b.truncate(rng.below(b.len() as u64) as usize);
            } else if !b.is_empty() {
                let i = rng.below(b.len() as u64) as usize;
                b[i] = rng.below(256) as u8;
            }
        }
        std::fs::write(&bad, &b).expect("write");
        let outcome = std::panic::catch_unwind(|| read_index(&bad).map(|r| r.len()));
        assert!(outcome.is_ok(), "case {case}: read_index panicked");
    }
}
