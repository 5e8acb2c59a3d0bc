//! PNG plots of the key curves of a sweep's trials (or of one run), one chart per metric with
//! one line per trial: loss, reward by source, chosen-source rates and evaluation metrics.
//!
//! Text needs a TrueType font from the system: `SIPT_PLOT_FONT`, else a DejaVu/Liberation
//! font in the usual places, else whatever `fc-match sans` names. Without one, plots are
//! skipped with a warning (tables are still written).

use crate::metrics::Row;
use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The metrics worth a chart, in the order they are listed.
pub fn wanted(key: &str) -> bool {
    key == "loss/total"
        || key == "loss/ntp"
        || key == "loss/dpo"
        || key == "loss/nll"
        || (key.starts_with("reward/") && key.ends_with("/mean"))
        || key.starts_with("chosen/")
        || (key.starts_with("eval/") && !key.ends_with("failures") && !key.ends_with("calls"))
}

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// The font plot text uses, if this machine has one (see the module docs).
pub fn find_font() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SIPT_PLOT_FONT") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = FONT_PATHS.iter().map(Path::new).find(|p| p.exists()) {
        return Some(p.to_path_buf());
    }
    let out = std::process::Command::new("fc-match")
        .args(["-f", "%{file}", "sans"])
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    path.exists().then_some(path)
}

/// Register the font once per process; the error says how to get one.
fn font() -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let path = find_font().ok_or_else(|| {
            "no TrueType font found for plot text: install fonts-dejavu-core (Debian) or set SIPT_PLOT_FONT to a .ttf file".to_string()
        })?;
        let bytes = std::fs::read(&path).map_err(|e| format!("cannot read font {}: {e}", path.display()))?;
        // The plotting library keeps a 'static reference; one font per process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a usable TrueType font", path.display()))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// A file name for a metric: `reward/rollout/mean` → `reward-rollout-mean.png`.
pub fn file_name(key: &str) -> String {
    let stem: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{stem}.png")
}

/// Draw one chart per wanted metric into `out`; `runs` are (trial name, its metric rows).
/// Returns the metric keys drawn with their file names.
pub fn write(out: &Path, runs: &[(String, Vec<Row>)]) -> Result<Vec<(String, String)>> {
    let mut keys: Vec<String> = runs
        .iter()
        .flat_map(|(_, rows)| rows.iter().flat_map(|r| r.values.keys()))
        .filter(|k| wanted(k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    font()?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut drawn = Vec::new();
    for key in keys {
        let series: Vec<(&str, Vec<(f64, f64)>)> = runs
            .iter()
            .map(|(name, rows)| {
                let points = rows
                    .iter()
                    .filter_map(|r| r.get(&key).map(|v| (r.step as f64, v)))
                    .filter(|(_, v)| v.is_finite())
                    .collect();
                (name.as_str(), points)
            })
            .filter(|(_, p): &(&str, Vec<(f64, f64)>)| !p.is_empty())
            .collect();
        if series.is_empty() {
            continue;
        }
        let name = file_name(&key);
        let path = out.join(&name);
        // Draw to a temporary file and move it into place: readers never see half a PNG.
        let tmp = out.join(format!(".{name}.tmp.png"));
        chart(&tmp, &key, &series).with_context(|| format!("cannot draw {}", path.display()))?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("cannot move {} into place", path.display()))?;
        drawn.push((key, name));
    }
    Ok(drawn)
}

/// Ten well-separated colours, then the library's palette.
fn color(i: usize) -> RGBAColor {
    const TEN: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    match TEN.get(i) {
        Some(&(r, g, b)) => RGBColor(r, g, b).to_rgba(),
        None => Palette99::pick(i).to_rgba(),
    }
}

fn chart(path: &Path, key: &str, series: &[(&str, Vec<(f64, f64)>)]) -> Result<()> {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (_, points) in series {
        for &(x, y) in points {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if x1 <= x0 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    let pad = if y1 > y0 {
        (y1 - y0) * 0.05
    } else {
        y0.abs().max(1.0) * 0.05
    };
    let (y0, y1) = (y0 - pad, y1 + pad);
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
    let mut c = ChartBuilder::on(&root)
        .caption(key, ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| anyhow!("{e:?}"))?;
    c.configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{}", x.round() as i64))
        .y_desc(key)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = color(i);
        if points.len() < 3 {
            // A single evaluation point would be invisible as a line.
            c.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| anyhow!("{e:?}"))?;
        }
        c.draw_series(LineSeries::new(
            points.iter().copied(),
            color.stroke_width(2),
        ))
        .map_err(|e| anyhow!("{e:?}"))?
        .label(name.to_string())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    root.present().map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}
