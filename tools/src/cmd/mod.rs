//! One module per command: its arguments (clap derive) and its `run`.
//! Settings and their defaults live in the library crates; these modules
//! only map flags onto them and print the results.

pub mod eval;
pub mod export;
pub mod extract;
pub mod inspect;
pub mod plot;
pub mod train;

use std::ops::Range;

/// Parse `A..B` (end exclusive, non-empty).
pub fn parse_range(s: &str) -> Result<Range<u32>, String> {
    let (a, b) = s.split_once("..").ok_or("expected A..B")?;
    let a = a.parse::<u32>().map_err(|e| e.to_string())?;
    let b = b.parse::<u32>().map_err(|e| e.to_string())?;
    if a >= b {
        return Err(format!("empty range {a}..{b}"));
    }
    Ok(a..b)
}

/// How a codec that needs a fit (`--codec pca`) is fitted when the
/// destination store is new (an existing store keeps its model).
#[derive(Debug, Clone, clap::Args)]
pub struct FitArgs {
    /// pca: views to fit the principal axes and entropy tables on (all K
    /// views of images spread evenly over the dataset).
    #[arg(long, default_value_t = shard_store::PcaFit::default().views)]
    pub fit_views: u64,
    /// pca: the quantiser step is the largest whose mean token cosine to
    /// the teacher's targets on the fit views reaches this value.
    #[arg(long, default_value_t = shard_store::PcaFit::default().cosine)]
    pub fit_cosine: f32,
}

impl FitArgs {
    /// The library's fit settings.
    pub fn fit(&self) -> shard_store::PcaFit {
        shard_store::PcaFit { views: self.fit_views, cosine: self.fit_cosine }
    }
}

pub use target_extractor::cores;

/// This program, for a run's provenance (`run.json`): its version, the git
/// commit it was built from (when built in a git checkout) and its command
/// line.
pub fn program() -> trainer::Program {
    trainer::Program {
        version: format!("caev2 {}", env!("CARGO_PKG_VERSION")),
        git_commit: option_env!("CAEV2_GIT_COMMIT").map(str::to_owned),
        args: std::env::args().collect(),
    }
}

/// Whether to draw a progress bar: asked for, and stderr is a terminal.
pub fn progress(no_progress: bool) -> bool {
    use std::io::IsTerminal;
    !no_progress && std::io::stderr().is_terminal()
}

/// Where a store in a bucket (`s3://`, `gs://`, `az://`) is kept on this
/// machine.
#[derive(Debug, Clone, clap::Args)]
pub struct CacheArgs {
    /// For a store given as a bucket URL: the local cache folder
    /// [default: $CAEV2_CACHE, else $XDG_CACHE_HOME/caev2, else ~/.cache/caev2].
    #[arg(long, value_name = "DIR")]
    pub cache: Option<std::path::PathBuf>,
    /// Most bytes of shard files and image packs the cache keeps over all
    /// its stores, e.g. 800G or 20M (K, M, G, T: powers of 1000); stores no
    /// process is reading are evicted, least recently used first [default:
    /// no limit].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub cache_limit: Option<u64>,
}

impl CacheArgs {
    /// The cache settings.
    pub fn options(&self, progress: bool) -> remote_store::CacheOptions {
        remote_store::CacheOptions {
            dir: self.cache.clone().unwrap_or_else(remote_store::CacheOptions::default_dir),
            limit: self.cache_limit,
            progress,
        }
    }

    /// The local folder of `store`: the path itself, or, for a bucket URL,
    /// its copy in the cache with what `need` asks fetched and checked. The
    /// returned guard keeps the copy from eviction; hold it while reading.
    ///
    /// # Errors
    /// The bucket's errors, one line naming the object.
    pub fn local(
        &self,
        store: &std::path::Path,
        need: remote_store::Need,
        progress: bool,
    ) -> anyhow::Result<(std::path::PathBuf, Option<remote_store::CachedStore>)> {
        let text = store.to_string_lossy();
        if !remote_store::is_url(&text) {
            return Ok((store.to_owned(), None));
        }
        let cached = remote_store::fetch(&text, &self.options(progress), need)?;
        Ok((cached.path().to_owned(), Some(cached)))
    }
}

/// Parse a size: bytes, or a number with K, M, G or T (powers of 1000).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1e3),
        Some('M') => (&t[..t.len() - 1], 1e6),
        Some('G') => (&t[..t.len() - 1], 1e9),
        Some('T') => (&t[..t.len() - 1], 1e12),
        _ => (t, 1.0),
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("{s:?}: expected a size such as 500G, 20M or 1000000"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("{s:?}: the size must be positive"));
    }
    Ok((v * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_in_powers_of_1000() {
        assert_eq!(parse_size("800G"), Ok(800_000_000_000));
        assert_eq!(parse_size("20m"), Ok(20_000_000));
        assert_eq!(parse_size("1.5T"), Ok(1_500_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err() && parse_size("-1G").is_err() && parse_size("0").is_err());
    }
}
