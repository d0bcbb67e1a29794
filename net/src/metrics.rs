//! A small writer for the Prometheus text exposition format (version 0.0.4), enough for the
//! counters and gauges the services export on `GET /metrics`. Each family gets its `# HELP` and
//! `# TYPE` lines once, followed by its samples.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Accumulates metric families into one text document.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

/// Whether a family only goes up or can go both ways.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Monotonic; the name should end in `_total`.
    Counter,
    /// Can go up and down.
    Gauge,
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
        let kind_name = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(
            self.out,
            "# HELP {name} {}",
            help.replace('\\', "\\\\").replace('\n', "\\n")
        );
        let _ = writeln!(self.out, "# TYPE {name} {kind_name}");
        Family {
            out: &mut self.out,
            name,
        }
    }

    /// The finished document.
    pub fn finish(self) -> String {
        self.out
    }
}

/// Writes samples of one family.
#[derive(Debug)]
pub struct Family<'a> {
    out: &'a mut String,
    name: &'a str,
}

impl Family<'_> {
    /// Adds one sample with the given label pairs.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: impl Into<f64>) -> &mut Self {
        self.out.push_str(self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let escaped = val
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{key}=\"{escaped}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", value.into());
        self
    }
}

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
    fn writes_the_text_format() {
        let mut e = Exposition::new();
        e.single("relaymesh_clients", Kind::Gauge, "Connected clients.", 3u32);
        e.family(
            "relaymesh_server_clients",
            Kind::Gauge,
            "Clients per server.",
        )
        .sample(&[("server", "a\"b")], 1u32)
        .sample(&[("server", "c")], 2u32);
        assert_eq!(
            e.finish(),
            "# HELP relaymesh_clients Connected clients.\n# TYPE relaymesh_clients gauge\nrelaymesh_clients 3\n\
             # HELP relaymesh_server_clients Clients per server.\n# TYPE relaymesh_server_clients gauge\n\
             relaymesh_server_clients{server=\"a\\\"b\"} 1\nrelaymesh_server_clients{server=\"c\"} 2\n"
        );
    }
}
