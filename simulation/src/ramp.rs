//! The ramp scenario: run the fanout workload at step after step of higher offered rate, each
//! step with fresh clients on a fresh topic, until delivery falls below the bound or p99
//! latency passes it. The highest passing step is the sustainable rate.

use std::time::Duration;

use serde::Serialize;

use crate::load::{Outcome, Round};
use crate::measure::pct;
use crate::progress::Progress;
use crate::usage::Meter;

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct Ramp {
    /// The first step; later steps change its rate and topic prefix.
    pub(crate) round: Round,
    pub(crate) factor: f64,
    pub(crate) steps: usize,
    /// Lowest passing delivered/expected.
    pub(crate) min_delivery: f64,
    pub(crate) max_p99: Duration,
}

/// One step's verdict.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Step {
    /// Messages per second the publishers achieved (not multiplied by subscribers).
    pub(crate) published_per_s: f64,
    pub(crate) offered_per_s: f64,
    pub(crate) delivered_per_s: f64,
    pub(crate) delivery: f64,
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
    pub(crate) p999_us: u64,
    pub(crate) max_us: u64,
    pub(crate) generator_busy: f64,
    pub(crate) generator_saturated: bool,
    pub(crate) passed: bool,
}

/// The ramp's result: every step, and the outcome of the highest passing one.
#[derive(Debug)]
pub(crate) struct RampResult {
    pub(crate) steps: Vec<Step>,
    /// The highest passing step (index into `steps`) and its full outcome.
    pub(crate) best: Option<(usize, Outcome)>,
    /// The first failing step's outcome, when no step passed.
    pub(crate) first: Option<Outcome>,
}

impl Ramp {
    pub(crate) async fn run(
        &self,
        meter: &Meter,
        progress: &Progress,
    ) -> anyhow::Result<RampResult> {
        let mut result = RampResult {
            steps: Vec::new(),
            best: None,
            first: None,
        };
        let base = self.round.topic_prefix.clone();
        for step in 0..self.steps {
            let mut round = self.round.clone();
            round.rate =
                self.round.rate * self.factor.powi(i32::try_from(step).unwrap_or(i32::MAX));
            round.topic_prefix = format!("{base}/step{step}");
            let offered = round.rate * (round.workload.publishers() as f64);
            progress.line(format!(
                "step {}: offering {offered:.0} msg/s ({:.0} deliveries/s)",
                step + 1,
                offered * round.workload.fanout_factor()
            ));
            let outcome = round.run(None, meter, progress).await?;
            let max_us = u64::try_from(self.max_p99.as_micros()).unwrap_or(u64::MAX);
            let achieved = outcome.published as f64 / outcome.publish_s.max(1e-9);
            let s = Step {
                published_per_s: achieved,
                offered_per_s: offered * round.workload.fanout_factor(),
                delivered_per_s: outcome.delivered_per_s(),
                delivery: outcome.delivery(),
                p50_us: pct(&outcome.latency, 50.0),
                p99_us: pct(&outcome.latency, 99.0),
                p999_us: pct(&outcome.latency, 99.9),
                max_us: outcome.latency.max(),
                generator_busy: outcome.usage.generator_busy,
                generator_saturated: outcome.usage.generator_saturated,
                // Payloads carry the time they were due, so publishers that could not keep
                // the offered rate show up in the p99.
                passed: outcome.delivery() >= self.min_delivery
                    && pct(&outcome.latency, 99.0) <= max_us,
            };
            progress.line(format!(
                "step {}: delivered {:.0}/s ({:.3} %), p99 {:.2} ms: {}",
                step + 1,
                s.delivered_per_s,
                s.delivery * 100.0,
                s.p99_us as f64 / 1000.0,
                if s.passed { "pass" } else { "FAIL" }
            ));
            let passed = s.passed;
            result.steps.push(s);
            if passed {
                result.best = Some((step, outcome));
            } else {
                if result.best.is_none() {
                    result.first = Some(outcome);
                }
                break;
            }
        }
        Ok(result)
    }
}
