//! Decoding speed per view on one core, side by side for several stores:
//! what the trainer's loader does per sample (`Store::targets`, which
//! checks the record's CRC, then `decode_for_training`), over every stored
//! view, rounds alternating between the stores.
//!
//! ```sh
//! cargo run --release -p shard-store --example decode_speed -- STORE [STORE ...]
//! ```
use std::error::Error;
use std::path::Path;
use std::time::Instant;

fn main() -> Result<(), Box<dyn Error>> {
    let roots: Vec<String> = std::env::args().skip(1).collect();
    if roots.is_empty() {
        return Err("usage: decode_speed STORE [STORE ...]".into());
    }
    let stores = roots.iter().map(|r| shard_store::Store::open(Path::new(r))).collect::<Result<Vec<_>, _>>()?;
    let mut best = vec![f64::INFINITY; stores.len()];
    for _round in 0..5 {
        for (store, best) in stores.iter().zip(&mut best) {
            let views: Vec<(u64, u32)> = store.index()?.iter().map(|r| (r.image_id, r.view)).collect();
            let mut out = vec![0f32; store.manifest().values_per_view()];
            let t = Instant::now();
            for &(image, view) in &views {
                let r = store.targets(image, view)?.ok_or("a listed view is not stored")?;
                if !r.decode_for_training(&mut out) {
                    return Err(format!("image {image} view {view} does not decode").into());
                }
            }
            *best = best.min(t.elapsed().as_secs_f64() / views.len().max(1) as f64);
        }
    }
    for ((root, store), best) in roots.iter().zip(&stores).zip(&best) {
        println!("{root}: {} codec, {:.1} us per view (best of 5 rounds)", store.manifest().codec.name(), best * 1e6);
    }
    Ok(())
}
