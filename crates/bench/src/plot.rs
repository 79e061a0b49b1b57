//! GB/s against message size as a PNG: one line per op, and the raw TCP baseline. Text uses a
//! TrueType font found on the system (DejaVu or Liberation); without one the chart is drawn unlabeled.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::report::{Point, human};

const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn register_font() -> bool {
    for path in FONTS {
        if let Ok(bytes) = std::fs::read(path) {
            // The registry keeps the font for the process's life; it is registered once per run.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

pub fn draw(path: &Path, title: &str, points: &[Point]) -> Result<(), String> {
    let labeled = register_font();
    if !labeled {
        eprintln!("uccl-tcpx-bench: no TrueType font found ({}); drawing the chart without text", FONTS[0]);
    }
    let fail = |e: &dyn std::fmt::Display| format!("plot {}: {e}", path.display());
    let min = points.iter().map(|p| p.size).min().ok_or("nothing to plot")? as f64;
    let max = points.iter().map(|p| p.size).max().unwrap_or(1) as f64;
    let top =
        points.iter().map(|p| p.gbs().max(p.baseline.map(|b| b.stream_gbs).unwrap_or(0.0))).fold(0.0f64, f64::max);
    let root = BitMapBackend::new(path, (1100, 650)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20).x_label_area_size(50).y_label_area_size(60);
    if labeled {
        builder.caption(title, ("sans-serif", 22));
    }
    let mut chart = builder
        .build_cartesian_2d((min..max.max(min * 2.0)).log_scale(), 0f64..(top * 1.1).max(0.01))
        .map_err(|e| fail(&e))?;
    let mut mesh = chart.configure_mesh();
    if labeled {
        mesh.x_desc("message size").y_desc("GB/s").x_label_formatter(&|v| human(*v as usize));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| fail(&e))?;
    let palette = [RED, BLUE, GREEN, MAGENTA];
    let mut ops: Vec<_> = points.iter().map(|p| p.op).collect();
    ops.dedup();
    for (i, op) in ops.iter().enumerate() {
        let color = palette[i % palette.len()];
        let series: Vec<(f64, f64)> = points.iter().filter(|p| p.op == *op).map(|p| (p.size as f64, p.gbs())).collect();
        let drawn = chart.draw_series(LineSeries::new(series.clone(), color.stroke_width(2))).map_err(|e| fail(&e))?;
        if labeled {
            drawn
                .label(format!("ours: {}", op.name()))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        chart.draw_series(series.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| fail(&e))?;
    }
    let mut raw: Vec<(f64, f64)> =
        points.iter().filter_map(|p| p.baseline.map(|b| (p.size as f64, b.stream_gbs))).collect();
    raw.sort_by(|a, b| a.0.total_cmp(&b.0));
    raw.dedup_by(|a, b| a.0 == b.0);
    if !raw.is_empty() {
        let drawn = chart.draw_series(LineSeries::new(raw, BLACK.stroke_width(2))).map_err(|e| fail(&e))?;
        if labeled {
            drawn
                .label("raw TCP, same streams")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
        }
    }
    if labeled {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| fail(&e))?;
    }
    root.present().map_err(|e| fail(&e))
}
