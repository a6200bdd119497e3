//! `caev2 inspect summary | verify | show | render | compare | recode | upload | fetch`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use remote_store::Need;

#[derive(Subcommand)]
pub enum InspectCommand {
    /// What a store holds: images, views, shards, bytes, teacher, view settings,
    /// dataset, skipped files. Reads the manifest and shard reports only.
    Summary {
        /// Store folder, or a bucket URL (s3://, gs://, az://) read through --cache.
        store: PathBuf,
        #[command(flatten)]
        cache: super::CacheArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every checksum, that index and shards agree, that no view is
    /// missing or duplicated, and that targets are finite. Exit code 1 on any
    /// problem.
    Verify {
        /// Store folder, or a bucket URL (s3://, gs://, az://) read through --cache.
        store: PathBuf,
        #[command(flatten)]
        cache: super::CacheArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One image's view parameters and target statistics (token norms, mean
    /// cosine of neighbouring tokens, CLS-patch similarity).
    Show {
        /// Store folder, or a bucket URL (s3://, gs://, az://) read through --cache.
        store: PathBuf,
        /// Image id or path relative to the dataset root.
        #[arg(long)]
        image: String,
        /// Only this view.
        #[arg(long)]
        view: Option<u32>,
        #[command(flatten)]
        cache: super::CacheArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A PNG sheet: each view as the teacher saw it next to a 3-component PCA
    /// colouring of its patch targets.
    Render {
        /// Store folder, or a bucket URL (s3://, gs://, az://) read through --cache.
        store: PathBuf,
        /// Image id or path relative to the dataset root.
        #[arg(long)]
        image: String,
        /// Only this view [default: all views of the image].
        #[arg(long)]
        view: Option<u32>,
        /// Image folder [default: the store's own images when it carries
        /// them, else the dataset root recorded in the store].
        #[arg(long)]
        data: Option<PathBuf>,
        /// Output PNG.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        cache: super::CacheArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Two stores of the same images and views (e.g. two codecs): mean, 1st
    /// percentile and min token cosine, max error, bytes per view of each,
    /// and decode (and B's encode) speed on one core. The pca decoder is the
    /// fastest this CPU runs; CAEV2_PCA_DECODER=avx2 or scalar picks a slower
    /// one (what a CPU without AVX-512 would see).
    Compare {
        /// First store (the reference, e.g. f32).
        a: PathBuf,
        /// Second store.
        b: PathBuf,
        #[command(flatten)]
        cache: super::CacheArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy a complete store folder into a bucket (s3://, gs://, az://):
    /// each shard uploaded and checked before its report is written, so the
    /// bucket only ever shows whole shards. Rerun after a kill to finish.
    Upload {
        /// Source store folder (complete).
        src: PathBuf,
        /// Destination: SCHEME://BUCKET/PREFIX (empty, or holding this store).
        url: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fetch a store in a bucket into the cache (each file checked against
    /// its shard report), e.g. on every node before a data-parallel run,
    /// and say where it is.
    Fetch {
        /// SCHEME://BUCKET/PREFIX.
        url: PathBuf,
        #[command(flatten)]
        cache: super::CacheArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a complete store again with another codec, or with its images
    /// embedded, without the teacher: same views and index, new records
    /// (copied byte for byte when the codec stays). Resumable like extract;
    /// verify the result with `inspect verify` and its fidelity with
    /// `inspect compare`.
    Recode {
        /// Source store (complete).
        src: PathBuf,
        /// Destination folder (new, or a killed recode of the same source
        /// and settings to finish).
        dst: PathBuf,
        /// Codec of the destination (default: the source's).
        #[arg(long, value_enum)]
        codec: Option<shard_store::Codec>,
        /// Embed the images (format version 2), read from this folder: the
        /// one the store was extracted from (each file must decode to the
        /// size the index records: the only check possible, so a file
        /// replaced by one of the same size is not noticed). A source that
        /// carries its images keeps them without this.
        #[arg(long, value_name = "DATA", conflicts_with = "drop_images")]
        embed_images: Option<PathBuf>,
        /// Leave the images out (a version 1 store that reads them from a
        /// dataset folder).
        #[arg(long)]
        drop_images: bool,
        #[command(flatten)]
        fit: super::FitArgs,
        #[command(flatten)]
        cache: super::CacheArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Run `caev2 inspect ...`.
pub fn run(cmd: InspectCommand) -> Result<ExitCode> {
    match cmd {
        InspectCommand::Summary { store: given, cache, json } => {
            let (store, pin) = cache.local(&given, Need::Metadata, super::progress(json))?;
            let mut s = tools::inspect::summary(&store)?;
            if pin.is_some() {
                s.store = format!("{} (cached in {})", given.display(), store.display());
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", tools::inspect::format_summary(&s));
            }
            Ok(ExitCode::SUCCESS)
        }
        InspectCommand::Show { store, image, view, cache, json } => {
            let (store, _pin) = local_for_image(&cache, &store, &image, json)?;
            let s = tools::inspect::show(&store, &image, view)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", tools::inspect::format_show(&s));
            }
            Ok(ExitCode::SUCCESS)
        }
        InspectCommand::Render { store, image, view, data, out, cache, json } => {
            let (store, _pin) = local_for_image(&cache, &store, &image, json)?;
            let (w, h) = tools::inspect::render(&store, data.as_deref(), &image, view, &out)?;
            if json {
                println!("{}", serde_json::json!({"out": out, "width": w, "height": h}));
            } else {
                println!("render: {} ({w}x{h})", out.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        InspectCommand::Compare { a, b, cache, json } => {
            let (a, _pin_a) = cache.local(&a, Need::Everything, super::progress(json))?;
            let (b, _pin_b) = cache.local(&b, Need::Everything, super::progress(json))?;
            let c = tools::inspect::compare(&a, &b)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                println!(
                    "compare: {} views, {} vs {}; token cosine mean {:.6} p1 {:.6} min {:.6}; max abs error {:.2e} (unit tokens)",
                    c.views, c.codec_a, c.codec_b, c.mean_cosine, c.p1_cosine, c.min_cosine, c.max_abs_error
                );
                println!(
                    "bytes/view {:.0} vs {:.0} ({:.2}x smaller); decode {:.0} vs {:.0} views/s{}, encode {} {:.0} views/s (one core)",
                    c.bytes_per_view_a,
                    c.bytes_per_view_b,
                    c.bytes_per_view_a / c.bytes_per_view_b.max(1.0),
                    c.decode_views_per_sec_a,
                    c.decode_views_per_sec_b,
                    c.pca_decoder.as_ref().map(|d| format!(" (pca decoder: {d})")).unwrap_or_default(),
                    c.codec_b,
                    c.encode_views_per_sec_b
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        InspectCommand::Recode { src, dst, codec, embed_images, drop_images, fit, cache, json } => {
            let (src, _pin) = cache.local(&src, Need::Everything, super::progress(json))?;
            let source = shard_store::Store::open(&src)?;
            let codec = codec.unwrap_or(source.manifest().codec);
            let images = match (embed_images, drop_images) {
                (Some(data), _) => {
                    shard_store::check_local(&data)?;
                    shard_store::RecodeImages::Embed(data)
                }
                (None, true) => shard_store::RecodeImages::Drop,
                (None, false) => shard_store::RecodeImages::Keep,
            };
            let bar = shard_bar(source.manifest(), json);
            let t = std::time::Instant::now();
            let r = shard_store::recode(&source, &dst, codec, fit.fit(), &images, |_| bar.inc(1))
                .with_context(|| format!("recoding {} into {}", src.display(), dst.display()))?;
            bar.finish_and_clear();
            let secs = t.elapsed().as_secs_f64();
            if json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({"recoded": r, "seconds": secs}))?);
            } else {
                println!(
                    "recode: {} views{} in {} shards written in {:.1} s ({:.0} views/s), {:.1} MB; {} shards were already done",
                    r.views,
                    if r.images > 0 { format!(" and {} images", r.images) } else { String::new() },
                    r.shards_written,
                    secs,
                    r.views as f64 / secs.max(1e-9),
                    r.bytes as f64 / 1e6,
                    r.shards_already_done
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        InspectCommand::Fetch { url, cache, json } => {
            if !remote_store::is_url(&url.to_string_lossy()) {
                anyhow::bail!("{}: not a bucket URL (s3://, gs://, az://); a local store needs no fetch", url.display());
            }
            let t = std::time::Instant::now();
            let (dir, cached) = cache.local(&url, Need::Everything, super::progress(json))?;
            let fetched = cached.as_ref().map_or(0, |c| c.fetched_bytes());
            let secs = t.elapsed().as_secs_f64();
            if json {
                println!("{}", serde_json::json!({"url": url, "cached": dir, "fetched_bytes": fetched, "seconds": secs}));
            } else {
                println!(
                    "fetch: {} is in {} ({:.1} MB fetched and checked in {:.1} s)",
                    url.display(),
                    dir.display(),
                    fetched as f64 / 1e6,
                    secs
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        InspectCommand::Upload { src, url, json } => {
            let store = shard_store::Store::open(&src)?;
            let bucket = remote_store::Bucket::open(&url)?;
            let publisher = remote_store::Publisher::new(bucket, remote_store::DEFAULT_CLAIM_TTL);
            let bar = shard_bar(store.manifest(), json);
            let t = std::time::Instant::now();
            let r = remote_store::upload_store(&publisher, &store, |_| bar.inc(1))
                .with_context(|| format!("uploading {} to {url}", src.display()))?;
            bar.finish_and_clear();
            let secs = t.elapsed().as_secs_f64();
            if json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({"uploaded": r, "seconds": secs}))?);
            } else {
                println!(
                    "upload: {} shards ({:.1} MB) uploaded and checked in {:.1} s; {} were already complete in {url}",
                    r.shards_uploaded,
                    r.bytes as f64 / 1e6,
                    secs,
                    r.shards_already_there
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        InspectCommand::Verify { store: given, cache, json } => {
            let (store, cached) = cache.local(&given, Need::Everything, super::progress(json))?;
            let r = tools::inspect::verify(&store, std::io::stderr().is_terminal() && !json)?;
            if let Some(c) = &cached {
                // damage in the cached copy (it matched its reports when fetched): fetch those shards again next time
                let mut shards: Vec<u32> = r.problems.iter().filter_map(|p| p.shard).collect();
                shards.dedup();
                for s in shards {
                    c.forget_shard(s)?;
                    eprintln!("shard {s}: dropped from the cached copy of {}; the next command fetches it again", given.display());
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for p in &r.problems {
                    let shard = p.shard.map(|s| format!("shard {s}")).unwrap_or_else(|| "store".into());
                    let off = p.offset.map(|o| format!(" @ byte {o}")).unwrap_or_default();
                    println!("PROBLEM {shard}{off}: {}", p.what);
                }
                if r.problems_not_listed > 0 {
                    println!("... and {} more problems, not listed", r.problems_not_listed);
                }
                println!(
                    "verify: {} shards, {} views checked, {} problems{}",
                    r.shards_checked,
                    r.views_checked,
                    r.problems.len() as u64 + r.problems_not_listed,
                    if r.problems.is_empty() { ": store is intact" } else { "" }
                );
            }
            Ok(if r.problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}

/// A progress bar over a store's shards, drawn only on a terminal and not with --json.
fn shard_bar(m: &shard_store::Manifest, json: bool) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(u64::from(m.layout.num_shards));
    if !super::progress(json) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

/// The local folder of `store` with what one image's views need: for a
/// bucket, its metadata and the image's shard only, not the whole store.
fn local_for_image(
    cache: &super::CacheArgs,
    store: &std::path::Path,
    image: &str,
    json: bool,
) -> Result<(PathBuf, Option<remote_store::CachedStore>)> {
    let (dir, pin) = cache.local(store, Need::Metadata, super::progress(json))?;
    if pin.is_none() {
        return Ok((dir, None));
    }
    let rows = tools::inspect::image_rows(&shard_store::Store::open(&dir)?, image)?;
    let shards: Vec<u32> = rows.iter().map(|r| r.shard).take(1).collect();
    cache.local(store, Need::Shards(shards), super::progress(json))
}
