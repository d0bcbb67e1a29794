//! `--plot FILE.svg`: latency over time (p50, p99 and max per timeline slot) above the latency
//! distribution (percentile plot), so a stall or a long tail shows at a glance.

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;

use crate::load::Outcome;
use crate::measure::pct;

/// Highest percentile drawn, as a count of nines (5 = 99.999 %).
const NINES: f64 = 5.0;

fn ms(us: u64) -> f64 {
    us.max(1) as f64 / 1_000.0
}

/// Writes the two charts to `path`.
pub(crate) fn write(path: &Path, title: &str, o: &Outcome) -> anyhow::Result<()> {
    let slot = o.slot.as_secs_f64();
    let series: [(&str, RGBColor, f64); 3] = [
        ("p50", BLUE, 50.0),
        ("p99", RED, 99.0),
        ("max", BLACK, 100.0),
    ];
    let points = |p: f64| -> Vec<(f64, f64)> {
        o.timeline
            .iter()
            .enumerate()
            .filter(|(_, h)| !h.is_empty())
            .map(|(i, h)| {
                (
                    (i as f64 + 0.5) * slot,
                    ms(if p >= 100.0 { h.max() } else { pct(h, p) }),
                )
            })
            .collect()
    };
    let quantiles = quantiles(&o.latency);
    let all: Vec<f64> = series
        .iter()
        .flat_map(|s| points(s.2))
        .map(|(_, y)| y)
        .chain(quantiles.iter().map(|(_, y)| *y))
        .collect();
    let y_min = all.iter().copied().fold(f64::INFINITY, f64::min).min(1.0) * 0.8;
    let y_max = all.iter().copied().fold(0.0, f64::max).max(y_min * 10.0) * 1.25;
    let x_max = (o.timeline.len() as f64 * slot).max(slot);

    let root = SVGBackend::new(path, (1000, 820)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let (top, bottom) = root.split_vertically(400);

    let mut chart = ChartBuilder::on(&top)
        .caption(
            "latency over time (per slot of receive time)",
            ("sans-serif", 16),
        )
        .margin(12)
        .margin_right(40)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("seconds since publishing started")
        .y_desc("latency (ms)")
        .draw()?;
    for (label, color, p) in series {
        chart
            .draw_series(LineSeries::new(points(p), &color))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    let mut chart = ChartBuilder::on(&bottom)
        .caption("latency distribution", ("sans-serif", 16))
        .margin(12)
        .margin_right(40)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..NINES, (y_min..y_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(6)
        .x_label_formatter(&|nines| format!("{}%", percentile_label(*nines)))
        .draw()?;
    chart.draw_series(LineSeries::new(quantiles, &BLUE))?;
    root.present()?;
    Ok(())
}

/// `(nines, latency ms)` points of the distribution: x = -log10(1 - q).
fn quantiles(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut points: Vec<(f64, f64)> = h
        .iter_quantiles(4)
        .map(|v| {
            let q = v.quantile_iterated_to();
            (
                (-(1.0 - q).max(1e-9).log10()).min(NINES),
                ms(v.value_iterated_to()),
            )
        })
        .collect();
    points.dedup_by(|a, b| a.0 == b.0);
    points
}

/// 0 → "0", 1 → "90", 2 → "99", 3 → "99.9".
fn percentile_label(nines: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-nines));
    let text = format!("{p:.4}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_labels_count_nines() {
        let labels: Vec<String> = [0.0, 1.0, 2.0, 3.0].map(percentile_label).to_vec();
        assert_eq!(labels, ["0", "90", "99", "99.9"]);
    }

    #[test]
    fn the_distribution_rises_to_the_maximum() {
        let mut h = crate::measure::histogram();
        for v in 1..=10_000u64 {
            h.record(v).unwrap();
        }
        let q = quantiles(&h);
        assert!(q.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        assert!((q.last().unwrap().1 - 10.0).abs() < 0.1, "{q:?}");
    }
}
