//! The report: a readable summary on stdout and the JSON document described in DESIGN.md.

use serde_json::{Value, json};

use crate::load::{Outcome, Plan};

pub(crate) struct Report {
    scenario: &'static str,
    plan: Plan,
    outcome: Outcome,
}

fn percentile<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

impl Report {
    pub(crate) fn new(scenario: &'static str, plan: &Plan, outcome: Outcome) -> Self {
        Self {
            scenario,
            plan: plan.clone(),
            outcome,
        }
    }

    fn lost(&self) -> u64 {
        self.outcome.expected.saturating_sub(self.outcome.delivered)
    }

    fn delivered_per_s(&self) -> f64 {
        let publishing = self.plan.duration.as_secs_f64().max(1e-9);
        self.outcome.delivered as f64 / publishing
    }

    pub(crate) fn summary(&self) -> String {
        let o = &self.outcome;
        let l = &o.latency_us;
        let spread: Vec<String> = o
            .clients_per_server
            .iter()
            .map(|(s, n)| format!("{s}={n}"))
            .collect();
        let mut out = String::new();
        out += &format!(
            "scenario          {} ({} publishers -> {} subscribers)\n",
            self.scenario, o.publishers, o.subscribers
        );
        out += &format!("clients/server    {}\n", spread.join(" "));
        out += &format!(
            "connect           p50 {:.1} ms, p99 {:.1} ms\n",
            percentile(&o.connect_ms, 0.50),
            percentile(&o.connect_ms, 0.99)
        );
        out += &format!("published         {}\n", o.published);
        out += &format!("expected          {}\n", o.expected);
        out += &format!(
            "delivered         {} ({:.0} msg/s, {} across servers)\n",
            o.delivered,
            self.delivered_per_s(),
            o.cross_server
        );
        out += &format!(
            "lost              {}   duplicates {}   out of order {}   dropped (reported) {}   disconnects {}\n",
            self.lost(),
            o.duplicates,
            o.out_of_order,
            o.dropped_reported,
            o.disconnects
        );
        out += &format!(
            "latency (us)      p50 {}  p90 {}  p99 {}  p999 {}  max {}\n",
            percentile(l, 0.50),
            percentile(l, 0.90),
            percentile(l, 0.99),
            percentile(l, 0.999),
            l.last().copied().unwrap_or(0)
        );
        out
    }

    pub(crate) fn json(&self) -> Value {
        let o = &self.outcome;
        let l = &o.latency_us;
        json!({
            "scenario": self.scenario,
            "clients": self.plan.clients,
            "publishers": o.publishers,
            "subscribers": o.subscribers,
            "rate_per_publisher": self.plan.rate,
            "payload_bytes": self.plan.payload,
            "duration_s": self.plan.duration.as_secs_f64(),
            "published": o.published,
            "expected": o.expected,
            "delivered": o.delivered,
            "lost": self.lost(),
            "duplicates": o.duplicates,
            "out_of_order": o.out_of_order,
            "dropped_reported": o.dropped_reported,
            "disconnects": o.disconnects,
            "delivered_per_s": self.delivered_per_s(),
            "latency_us": {
                "p50": percentile(l, 0.50),
                "p90": percentile(l, 0.90),
                "p99": percentile(l, 0.99),
                "p999": percentile(l, 0.999),
                "max": l.last().copied().unwrap_or(0),
            },
            "connect_ms": { "p50": percentile(&o.connect_ms, 0.50), "p99": percentile(&o.connect_ms, 0.99) },
            "clients_per_server": o.clients_per_server,
            "cross_server_delivered": o.cross_server,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(
            (
                percentile(&v, 0.5),
                percentile(&v, 0.99),
                percentile(&v, 1.0)
            ),
            (50, 99, 100)
        );
        assert_eq!(percentile::<u64>(&[], 0.5), 0);
        assert_eq!(percentile(&[7u64], 0.999), 7);
    }
}
