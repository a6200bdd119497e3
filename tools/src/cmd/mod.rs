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

/// Cores of this machine.
pub fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Whether to draw a progress bar: asked for, and stderr is a terminal.
pub fn progress(no_progress: bool) -> bool {
    use std::io::IsTerminal;
    !no_progress && std::io::stderr().is_terminal()
}
