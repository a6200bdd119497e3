//! `caev2 plot`: training curves (loss, loss_v, loss_z; learning rate) of a
//! run folder's `metrics.jsonl` as a PNG.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use plotters::style::FontStyle;

const FONTS: [&str; 3] =
    ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"];

fn register_font() -> Result<()> {
    let path = std::env::var_os("CAEV2_FONT")
        .map(PathBuf::from)
        .or_else(|| FONTS.iter().map(PathBuf::from).find(|p| p.exists()))
        .context("no TrueType font found for the labels: install fonts-dejavu-core or set CAEV2_FONT=FILE.ttf")?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{}: not a usable font", path.display()))
}

/// Plot `run/metrics.jsonl` to `out` (default `run/curves.png`); returns
/// the output path and the number of steps plotted.
///
/// # Errors
/// Missing or empty metrics, font or IO problems.
pub fn plot(run: &Path, out: Option<&Path>) -> Result<(PathBuf, usize)> {
    let path = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let rows: Vec<trainer::Metrics> =
        text.lines().map(serde_json::from_str).collect::<Result<_, _>>().with_context(|| format!("parsing {}", path.display()))?;
    if rows.is_empty() {
        bail!("{} has no steps yet", path.display());
    }
    register_font()?;
    let out = out.map(Path::to_path_buf).unwrap_or_else(|| run.join("curves.png"));
    let root = BitMapBackend::new(out.as_path(), (1000, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(500);
    let last = rows.last().map(|r| r.step).unwrap_or(1) as f64;
    let max_loss = rows.iter().flat_map(|r| [r.loss, r.loss_v, r.loss_z]).fold(0.0, f64::max) * 1.05;
    let mut c = ChartBuilder::on(&top)
        .caption(format!("{}: losses", run.display()), ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..last, 0f64..max_loss.max(1e-6))?;
    c.configure_mesh().x_desc("step").y_desc("loss").draw()?;
    for (name, color, f) in [
        ("loss", BLACK, (|r: &trainer::Metrics| r.loss) as fn(&trainer::Metrics) -> f64),
        ("loss_v (visible)", BLUE, |r| r.loss_v),
        ("loss_z (masked)", RED, |r| r.loss_z),
    ] {
        c.draw_series(LineSeries::new(rows.iter().map(|r| (r.step as f64, f(r))), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    c.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;
    let max_lr = rows.iter().map(|r| r.lr).fold(0.0, f64::max) * 1.05;
    let mut c = ChartBuilder::on(&bottom)
        .caption("learning rate", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..last, 0f64..max_lr.max(1e-12))?;
    c.configure_mesh().x_desc("step").y_label_formatter(&|v| format!("{v:.1e}")).draw()?;
    c.draw_series(LineSeries::new(rows.iter().map(|r| (r.step as f64, r.lr)), GREEN.stroke_width(2)))?;
    root.present().with_context(|| format!("writing {}", out.display()))?;
    Ok((out.clone(), rows.len()))
}
