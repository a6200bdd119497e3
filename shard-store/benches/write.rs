//! Shard writer throughput: can the writer keep up with a teacher on a GPU?
//!
//! Writes one shard of CLIP-B/16-shaped records (197 x 512 targets) with the
//! f16 codec, as `extract`'s writer thread does: encode + CRC-32C + buffered
//! write, then the table, fsync and rename. Reports views/s for the encode +
//! CRC work alone (one core, in memory) and for the whole shard on this disk.
//!
//! `cargo bench -p shard-store --bench write -- [IMAGES] [VIEWS] [DIR]`
//! (defaults: 64 images x 10 views, in the system temp folder).

use std::time::Instant;

use shard_store::{Codec, ShardHeader, ShardWriter};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let images: u32 = args.first().and_then(|s| s.parse().ok()).unwrap_or(64);
    let views: u32 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    let dir = args.get(2).map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let (tokens, dim) = (197u32, 512u32);
    let values: Vec<f32> = (0..tokens * dim).map(|i| ((i as f32) * 0.618).sin()).collect();
    let n = u64::from(images) * u64::from(views);

    let t = Instant::now();
    let mut buf = Vec::new();
    let mut acc = 0u32;
    for _ in 0..n {
        buf.clear();
        Codec::F16.encode(std::hint::black_box(&values), dim as usize, &mut buf);
        acc ^= crc32c::crc32c(&buf);
    }
    std::hint::black_box(acc);
    let encode_vps = n as f64 / t.elapsed().as_secs_f64();

    let tmp = tempfile::tempdir_in(&dir).expect("temp folder");
    let header = ShardHeader {
        codec: Codec::F16,
        shard_index: 0,
        views_per_image: views,
        first_image: 0,
        num_images: images,
        tokens,
        dim,
        store_id: [7; 12],
    };
    let t = Instant::now();
    let mut w = ShardWriter::create(&tmp.path().join("shard-00000.bin"), header).expect("create");
    for slot in 0..n {
        w.write(slot, &values).expect("write");
    }
    let bytes = w.finish().expect("finish");
    let secs = t.elapsed().as_secs_f64();
    println!("shard writer, one thread, 197 x 512 f16 records ({n} views, {:.0} MB):", bytes as f64 / 1e6);
    println!("  encode + CRC-32C in memory: {encode_vps:.0} views/s ({:.0} MB/s)", encode_vps * 201_728.0 / 1e6);
    println!(
        "  whole shard on {} (write, table, fsync, rename): {:.0} views/s ({:.0} MB/s)",
        dir.display(),
        n as f64 / secs,
        bytes as f64 / secs / 1e6
    );
}
