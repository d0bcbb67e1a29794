//! Metrics for `GET /metrics`: the services' counters, gauges and histograms, bumped without
//! locks on their hot paths, and written at scrape time in the Prometheus text format (0.0.4)
//! by `prometheus-client`, the official Rust client, which does the names, escaping, `# HELP`
//! and `# TYPE` lines and histogram buckets. A scrape builds an [`Exposition`] of what the
//! service holds now; nothing is registered up front, so no metric can be left out of step
//! with `/v1/stats`.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The metric families of one scrape.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<FamilyData>,
}

/// Whether a family only goes up or can go both ways.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Monotonic; the name should end in `_total`.
    Counter,
    /// Can go up and down.
    Gauge,
}

/// A sample's label pairs.
type Labels = Vec<(Cow<'static, str>, Cow<'static, str>)>;

/// A histogram as read at a scrape.
#[derive(Debug)]
struct Snapshot {
    /// (upper bound, observations in that bucket alone).
    buckets: Vec<(f64, u64)>,
    sum: f64,
    count: u64,
}

#[derive(Debug)]
struct FamilyData {
    /// Without `_total` for a counter: the encoder adds it.
    name: String,
    help: String,
    kind: Kind,
    samples: Vec<(Labels, f64)>,
    /// A histogram family instead.
    histogram: Option<Snapshot>,
}

impl Exposition {
    /// An empty document.
    pub fn new() -> Self {
        Self::default()
    }

    /// A family with a single unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl Into<f64>) {
        self.family(name, kind, help).sample(&[], value);
    }

    /// Starts a family; add its samples through the returned writer.
    pub fn family<'a>(&'a mut self, name: &'a str, kind: Kind, help: &str) -> Family<'a> {
        let name = match kind {
            Kind::Counter => name.strip_suffix("_total").unwrap_or(name),
            Kind::Gauge => name,
        };
        self.families.push(FamilyData {
            name: name.to_owned(),
            help: help.to_owned(),
            kind,
            samples: Vec::new(),
            histogram: None,
        });
        let last = self.families.len() - 1;
        Family {
            family: &mut self.families[last],
        }
    }

    /// The process's own figures: `{prefix}_build_info{version}`, `{prefix}_uptime_seconds`,
    /// and the standard `process_cpu_seconds_total` and `process_resident_memory_bytes`.
    pub fn process(&mut self, prefix: &str, uptime: std::time::Duration) {
        let info = format!("{prefix}_build_info");
        self.family(
            &info,
            Kind::Gauge,
            "The running build (its version as a label).",
        )
        .sample(&[("version", env!("CARGO_PKG_VERSION"))], 1u8);
        self.single(
            &format!("{prefix}_uptime_seconds"),
            Kind::Gauge,
            "Seconds since the process started serving.",
            uptime.as_secs_f64().floor(),
        );
        if let Some(usage) = crate::procstat::process() {
            self.single(
                "process_cpu_seconds_total",
                Kind::Counter,
                "CPU time of every thread of the process, in seconds.",
                usage.cpu_seconds,
            );
            self.single(
                "process_resident_memory_bytes",
                Kind::Gauge,
                "Resident memory of the process.",
                usage.rss_bytes as f64,
            );
        }
    }

    /// A histogram family: `histogram`'s buckets, sum and count as they are now.
    pub fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) {
        self.families.push(FamilyData {
            name: name.to_owned(),
            help: help.to_owned(),
            kind: Kind::Gauge,
            samples: Vec::new(),
            histogram: Some(histogram.snapshot()),
        });
    }

    /// The finished document.
    pub fn finish(self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Scrape(self.families)));
        let mut out = String::new();
        // Writing to a String does not fail; a family the encoder refuses is a bug here.
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
            tracing::error!(error = %e, "metrics: encoding failed");
        }
        out
    }
}

/// The families of one scrape, handed to `prometheus-client` as a collector.
#[derive(Debug)]
struct Scrape(Vec<FamilyData>);

impl prometheus_client::collector::Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            if let Some(h) = &f.histogram {
                let mut metric =
                    encoder.encode_descriptor(&f.name, &f.help, None, MetricType::Histogram)?;
                metric.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    h.sum, h.count, &h.buckets, None,
                )?;
                continue;
            }
            let kind = match f.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            let mut metric = encoder.encode_descriptor(&f.name, &f.help, None, kind)?;
            for (labels, value) in &f.samples {
                let sample = metric.encode_family(labels)?;
                match f.kind {
                    // The services count in whole numbers; CPU seconds are not.
                    Kind::Counter if value.fract() == 0.0 && *value >= 0.0 => {
                        ConstCounter::new(*value as u64).encode(sample)?
                    }
                    Kind::Counter => ConstCounter::new(*value).encode(sample)?,
                    // Whole values print as integers, as the services count.
                    Kind::Gauge if value.fract() == 0.0 && value.abs() < 9.0e15 => {
                        ConstGauge::new(*value as i64).encode(sample)?
                    }
                    Kind::Gauge => ConstGauge::new(*value).encode(sample)?,
                }
            }
        }
        Ok(())
    }
}

/// Writes samples of one family.
#[derive(Debug)]
pub struct Family<'a> {
    family: &'a mut FamilyData,
}

impl Family<'_> {
    /// Adds one sample with the given label pairs.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: impl Into<f64>) -> &mut Self {
        let labels = labels
            .iter()
            .map(|(k, v)| (Cow::Owned((*k).to_owned()), Cow::Owned((*v).to_owned())))
            .collect();
        self.family.samples.push((labels, value.into()));
        self
    }
}

/// A histogram that many tasks observe without locking: one atomic per bucket, and the sum
/// (an `f64` in an atomic's bits, added with compare-and-swap).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations at or under each bound (not cumulative; the last is +Inf).
    buckets: Box<[AtomicU64]>,
    sum_bits: AtomicU64,
}

impl Histogram {
    /// A histogram with these upper bounds (ascending); +Inf is added.
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// Records one observation.
    pub fn observe(&self, value: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }

    /// The buckets (the encoder makes them cumulative), the sum and the count, as now.
    fn snapshot(&self) -> Snapshot {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.buckets.iter())
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        // The count from the buckets read, so the two always agree.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = f64::from_bits(self.sum_bits.load(Ordering::Relaxed));
        Snapshot {
            buckets,
            sum,
            count,
        }
    }
}

/// Bounds for latencies in seconds: 100 µs to 10 s.
pub const LATENCY_SECONDS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Bounds for counts (batch sizes, queue depths): powers of four up to 65 536.
pub const COUNTS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1_024.0, 4_096.0, 16_384.0, 65_536.0,
];

/// A monotonic counter that many tasks bump without locking.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A gauge that goes up and down (connections open, sessions live).
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Subtracts one.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Increments now and decrements when the returned guard drops.
    pub fn track(&self) -> GaugeGuard<'_> {
        self.inc();
        GaugeGuard(self)
    }
}

/// Decrements its [`Gauge`] when dropped.
#[derive(Debug)]
pub struct GaugeGuard<'a>(&'a Gauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_text_format_through_prometheus_client() {
        let mut e = Exposition::new();
        e.single("relaymesh_clients", Kind::Gauge, "Connected clients.", 3u32);
        e.single("relaymesh_things_total", Kind::Counter, "Things.", 7u32);
        e.family(
            "relaymesh_server_clients",
            Kind::Gauge,
            "Clients per server.",
        )
        .sample(&[("server", "a\"b")], 1u32)
        .sample(&[("server", "c")], 2u32);
        let text = e.finish();
        for line in [
            "# HELP relaymesh_clients Connected clients.",
            "# TYPE relaymesh_clients gauge",
            "relaymesh_clients 3",
            "# TYPE relaymesh_things_total counter",
            "relaymesh_things_total 7",
            "relaymesh_server_clients{server=\"a\\\"b\"} 1",
            "relaymesh_server_clients{server=\"c\"} 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from\n{text}"
            );
        }
    }

    #[test]
    fn a_histogram_has_cumulative_buckets_a_sum_and_a_count() {
        let h = Histogram::new(&[0.001, 0.01]);
        for v in [0.0005, 0.002, 0.003, 5.0] {
            h.observe(v);
        }
        let mut e = Exposition::new();
        e.histogram("relaymesh_wait_seconds", "Waits.", &h);
        let text = e.finish();
        for line in [
            "# TYPE relaymesh_wait_seconds histogram",
            "relaymesh_wait_seconds_bucket{le=\"0.001\"} 1",
            "relaymesh_wait_seconds_bucket{le=\"0.01\"} 3",
            "relaymesh_wait_seconds_bucket{le=\"+Inf\"} 4",
            "relaymesh_wait_seconds_count 4",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from\n{text}"
            );
        }
        let sum: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("relaymesh_wait_seconds_sum "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((sum - 5.0055).abs() < 1e-6, "{sum}");
    }
}
