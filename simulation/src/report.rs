//! The report: a summary for people on stdout and the JSON document for scripts (the fields
//! the README lists under "Load testing", which scripts rely on, plus the rest of what was
//! measured).

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::churn::ChurnReport;
use crate::load::Outcome;
use crate::measure::pct;
use crate::ramp::Step;

/// Publisher lag (seconds) past which the report warns.
const LATE_S: f64 = 0.1;

/// How the run was set up, for the header line and the JSON.
#[derive(Debug, Clone)]
pub(crate) struct Setup {
    pub(crate) scenario: &'static str,
    /// e.g. "300 clients in rooms of 10".
    pub(crate) shape: String,
    /// "3 embedded comm servers" or the coordinator URL.
    pub(crate) cluster: String,
    pub(crate) servers: Option<usize>,
    pub(crate) rate_per_publisher: f64,
    pub(crate) payload_bytes: usize,
    pub(crate) duration_s: f64,
}

/// Ramp results that go beside the sustainable step's outcome.
#[derive(Debug, Clone)]
pub(crate) struct RampSummary {
    pub(crate) steps: Vec<Step>,
    pub(crate) best: Option<usize>,
    pub(crate) min_delivery: f64,
    pub(crate) max_p99_ms: f64,
}

pub(crate) struct Report {
    pub(crate) setup: Setup,
    pub(crate) outcome: Outcome,
    pub(crate) churn: Option<ChurnReport>,
    pub(crate) ramp: Option<RampSummary>,
    pub(crate) direct: Option<crate::direct::DirectReport>,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1_000.0
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

impl Report {
    /// Whether every expected message arrived exactly once and in order.
    ///
    /// With a server killed (failover), messages may be lost for cause (a server that died
    /// with them, or a recovery that reported a gap): the run is clean when none is lost
    /// without a cause, none came twice or out of order, and the kill and restart were done.
    pub(crate) fn clean(&self) -> bool {
        let o = &self.outcome;
        let lost_ok = match &o.server_killed {
            None => o.lost == 0,
            Some(k) => o.lost_by_cause.unexplained == 0 && k.error.is_none(),
        };
        lost_ok
            && o.counts.duplicates == 0
            && o.counts.out_of_order == 0
            && o.counts.misrouted == 0
            && o.server_drain.as_ref().is_none_or(|d| d.clean())
    }

    /// Lines that must not be missed: loss without a cause first, then saturation, falling
    /// behind, loss and where it came from.
    pub(crate) fn warnings(&self) -> Vec<String> {
        let o = &self.outcome;
        let u = &o.usage;
        let by = &o.lost_by_cause;
        let mut w = Vec::new();
        if by.unexplained > 0 {
            w.push(format!(
                "UNEXPLAINED LOSS: {} of the {} messages lost have no cause this run can prove: no \
                 Dropped notice covers them and neither their receiver nor their publisher lost its \
                 server around them, and they did not arrive late either: \"nothing is lost \
                 silently\" did not hold",
                by.unexplained, o.lost
            ));
        }
        if u.generator_saturated {
            w.push(format!(
                "load generator saturated ({:.0} % of its threads busy): these figures are the \
                 generator's limit, not the cluster's; spread the clients over more processes \
                 or hosts with --shard i/n",
                u.generator_busy * 100.0
            ));
        }
        if u.machine_saturated {
            w.push(format!(
                "this host's {} cores were {:.0} % busy: the generator and the cluster (or other \
                 programs) competed for CPU; run them on separate hosts for figures of the \
                 cluster alone",
                u.cores,
                u.host_busy * 100.0
            ));
        }
        if o.max_lag_s > LATE_S {
            w.push(format!(
                "publishers fell up to {:.0} ms behind their schedule (the generator or a full \
                 client queue held them back); the delay is counted in the latency",
                o.max_lag_s * 1_000.0
            ));
        }
        if o.publish_errors > 0 {
            w.push(format!(
                "{} publishes failed (client closed); they are not counted as expected",
                o.publish_errors
            ));
        }
        if o.lost > 0 {
            w.push(format!(
                "{} expected messages did not arrive by the end of the drain: {} dropped from \
                 slow consumers' queues and {} lost between servers, both told (Dropped notices \
                 of {} in all, {} of them upstream: exactly once while connected, nothing lost \
                 silently); {} went with a server that a receiver or a publisher lost ({} \
                 disconnects seen by receivers: at most once across a server failure); {} were \
                 still queued for a receiver slower than --drain (they arrived after it); {} \
                 unexplained. The servers counted {} messages dropped for slow consumers and {} \
                 forwards dropped",
                o.lost,
                by.slow_consumer,
                by.peer_gap,
                o.counts.dropped_reported,
                o.counts.dropped_upstream,
                by.server_failure,
                o.counts.disconnects,
                by.late,
                by.unexplained,
                u.server_dropped,
                u.server_forward_dropped,
            ));
        }
        if let Some(d) = &o.server_drain {
            if let Some(e) = &d.error {
                w.push(format!("draining {} failed: {e}", d.server_id));
            } else if d.remaining > 0 {
                w.push(format!(
                    "the drained server {} still held {} clients at the drain's deadline",
                    d.server_id, d.remaining
                ));
            }
        }
        if let Some(k) = &o.server_killed
            && let Some(e) = &k.error
        {
            w.push(format!("killing {} failed: {e}", k.server_id));
        }
        if o.counts.misrouted > 0 {
            w.push(format!(
                "{} messages reached a subscriber that did not subscribe to them",
                o.counts.misrouted
            ));
        }
        if o.counts.refused > 0 {
            w.push(format!(
                "{} subscriptions were refused when a client reconnected to another server",
                o.counts.refused
            ));
        }
        if o.counts.foreign > 0 {
            w.push(format!(
                "{} payloads without a simulation header arrived (another publisher on these topics?)",
                o.counts.foreign
            ));
        }
        if let Some(c) = &self.churn {
            if !c.leaks_checked {
                w.push(
                    "the servers' stats could not be read after the churn: leaks unchecked".into(),
                );
            }
            if c.leaked_sessions + c.leaked_topics + c.leaked_remote_topics > 0 {
                w.push(format!(
                    "after churn the servers still hold {} extra sessions, {} extra topics and {} \
                     extra peer-interest topics",
                    c.leaked_sessions, c.leaked_topics, c.leaked_remote_topics
                ));
            }
            if c.connect_failures > 0 {
                w.push(format!("{} churn connections failed", c.connect_failures));
            }
        }
        w
    }

    pub(crate) fn summary(&self) -> String {
        let (s, o, u) = (&self.setup, &self.outcome, &self.outcome.usage);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "relaymesh simulation: {} ({}), {}, {} B payloads{}",
            s.scenario,
            s.shape,
            s.cluster,
            s.payload_bytes,
            if o.shards > 1 {
                format!(", {} generator processes", o.shards)
            } else {
                String::new()
            }
        );
        let spread: Vec<String> = o
            .clients_per_server
            .iter()
            .map(|(id, n)| format!("{id}={n}"))
            .collect();
        let _ = writeln!(out, "clients/server  {}", spread.join("  "));
        let c = &o.connect;
        let _ = writeln!(
            out,
            "connect         p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms  ({} connections)",
            ms(pct(c, 50.0)),
            ms(pct(c, 90.0)),
            ms(pct(c, 99.0)),
            ms(c.max()),
            c.len()
        );
        let _ = writeln!(
            out,
            "published       {} by {} publishers over {:.1} s ({} scheduled)",
            o.published, o.publishers, o.publish_s, o.scheduled
        );
        let _ = writeln!(
            out,
            "expected        {} at {} subscribers",
            o.expected, o.subscribers
        );
        let _ = writeln!(
            out,
            "delivered       {} ({:.0} msg/s, {:.3} %; {} crossed servers)",
            o.counts.delivered,
            o.delivered_per_s(),
            o.delivery() * 100.0,
            o.counts.cross_server
        );
        let _ = writeln!(
            out,
            "lost            {}   duplicates {}   out of order {}   (last delivery {:.2} s after publishing)",
            o.lost, o.counts.duplicates, o.counts.out_of_order, o.drain_s
        );
        let by = &o.lost_by_cause;
        let _ = writeln!(
            out,
            "lost by cause   told: slow consumer {}, peer gap {} (exactly once while connected), \
             recovery gap {}; server failure {} (at most once); late {}; unexplained {}{}",
            by.slow_consumer,
            by.peer_gap,
            by.recovery_gap,
            by.server_failure,
            by.late,
            by.unexplained,
            if by.unexplained > 0 {
                "  <- see WARNING"
            } else {
                ""
            }
        );
        let _ = writeln!(
            out,
            "drops           {} reported to clients ({} upstream), {} counted by servers, {} slow consumers cut off",
            o.counts.dropped_reported,
            o.counts.dropped_upstream,
            u.server_dropped,
            u.server_slow_consumers
        );
        if let Some(k) = &o.server_killed {
            let restarted = match (&k.restarted, k.restarted_at_s) {
                (Some(id), Some(at)) if !id.is_empty() => format!(", {id} started at {at:.1} s"),
                (Some(_), Some(at)) => format!(", restart command run at {at:.1} s"),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "server killed   {}{} at {:.1} s{}{}; {} clients lost their server",
                k.server_id,
                if k.external { " (externally)" } else { "" },
                k.at_s,
                restarted,
                k.error
                    .as_ref()
                    .map(|e| format!(" (FAILED: {e})"))
                    .unwrap_or_default(),
                o.counts.disconnects
            );
        }
        if o.server_killed.is_some() || o.counts.recovered + o.counts.recovery_gaps > 0 {
            let _ = writeln!(
                out,
                "recovery        {} messages recovered after reconnects; {} gaps reported ({} messages said gone, {} of unknown size)",
                o.counts.recovered,
                o.counts.recovery_gaps,
                o.counts.recovery_gap_missed,
                o.counts.recovery_gap_unknown
            );
        }
        if let Some(d) = &o.server_drain {
            let _ = writeln!(
                out,
                "server drained  {} at {:.1} s: {} clients moved in {:.2} s, {} remained{}; {} moves seen by receivers",
                d.server_id,
                d.at_s,
                d.moved,
                d.took_s,
                d.remaining,
                d.error
                    .as_ref()
                    .map(|e| format!(" (FAILED: {e})"))
                    .unwrap_or_default(),
                o.counts.moves
            );
        }
        let l = &o.latency;
        let _ = writeln!(
            out,
            "latency         p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
            ms(pct(l, 50.0)),
            ms(pct(l, 90.0)),
            ms(pct(l, 99.0)),
            ms(pct(l, 99.9)),
            ms(l.max())
        );
        let _ = writeln!(
            out,
            "cpu             servers {:.1} s ({:.0} % of a core), generator {:.1} s ({:.0} % of its threads), {} cores",
            u.servers_cpu_s,
            u.servers_cpu_s / u.window_s.max(1e-9) * 100.0,
            u.generator_cpu_s,
            u.generator_busy * 100.0,
            u.cores
        );
        let _ = writeln!(
            out,
            "memory          peak RSS {:.1} MiB ({})",
            mib(u.peak_rss_bytes),
            u.rss_scope
        );
        if let Some(c) = &self.churn {
            let _ = writeln!(
                out,
                "churn           {} sessions ({:.0}/s), {} failed; left over: {} sessions, {} topics, {} peer-interest topics",
                c.sessions,
                c.sessions_per_s,
                c.connect_failures,
                c.leaked_sessions,
                c.leaked_topics,
                c.leaked_remote_topics
            );
            let _ = writeln!(
                out,
                "churn memory    RSS {:.1} MiB a third in, {:.1} MiB at the end, {:+.0} KiB per 1000 sessions ({})",
                mib(c.rss_early_bytes),
                mib(c.rss_end_bytes),
                c.rss_growth_per_1000_sessions / 1024.0,
                c.rss_scope
            );
        }
        if let Some(r) = &self.ramp {
            let _ = writeln!(
                out,
                "ramp            step: offered/s -> delivered/s, delivery, p99 (pass: >= {:.1} % and p99 <= {} ms)",
                r.min_delivery * 100.0,
                r.max_p99_ms
            );
            for (i, step) in r.steps.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "  {:>2}: {:>10.0} -> {:>10.0}  {:>8.3} %  p99 {:>7.2} ms  {}{}",
                    i + 1,
                    step.offered_per_s,
                    step.delivered_per_s,
                    step.delivery * 100.0,
                    ms(step.p99_us),
                    if step.passed { "pass" } else { "FAIL" },
                    if step.generator_saturated {
                        " (generator saturated)"
                    } else {
                        ""
                    }
                );
            }
            let _ = match r.best {
                Some(best) if best + 1 == r.steps.len() => writeln!(
                    out,
                    "sustainable     at least {:.0} deliveries/s: no step failed (raise --ramp-steps or --rate)",
                    r.steps[best].delivered_per_s
                ),
                Some(best) => writeln!(
                    out,
                    "sustainable     {:.0} deliveries/s (step {}; the figures above are that step's)",
                    r.steps[best].delivered_per_s,
                    best + 1
                ),
                None => writeln!(out, "sustainable     none: the first step already failed"),
            };
        }
        let warnings = self.warnings();
        for w in &warnings {
            let _ = writeln!(out, "WARNING         {w}");
        }
        let verdict = if self.clean() && o.lost == 0 {
            "every expected message delivered once, in order".to_owned()
        } else if self.clean() {
            format!(
                "{} messages lost, every one for a cause (none unexplained), none twice or out of order; guarantee: {}",
                o.lost,
                by.guarantee()
            )
        } else if o.lost > 0 {
            format!(
                "delivery incomplete (see above); guarantee: {}",
                by.guarantee()
            )
        } else {
            "delivery incomplete (see above)".to_owned()
        };
        if let Some(d) = &self.direct {
            let t = &d.inbox_delivery_ms;
            let _ = writeln!(
                out,
                "direct          {} nodes, {} offline for the first half; {} stored in inboxes (Accepted), {} delivered from them ({} after a later live one), {} undeliverable (their senders told, so not expected)",
                d.nodes,
                d.offline_nodes,
                d.accepted,
                d.inbox_delivered,
                d.inbox_overtaken,
                d.undeliverable
            );
            let _ = writeln!(
                out,
                "inbox at login  p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms from the start of the login to each inbox delivery",
                t.p50, t.p99, t.max
            );
            let p = &d.presence_visible_ms;
            let _ = writeln!(
                out,
                "presence        p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms from the start of a login to the node online on each server ({} seen)",
                p.p50, p.p99, p.max, d.presence_seen
            );
        }
        let _ = writeln!(out, "result          {verdict}");
        out
    }

    pub(crate) fn json(&self) -> Value {
        let (s, o, u) = (&self.setup, &self.outcome, &self.outcome.usage);
        let l = &o.latency;
        let c = &o.connect;
        let timeline: Vec<Value> = o
            .timeline
            .iter()
            .enumerate()
            .map(|(i, h)| {
                json!({
                    "t_s": i as f64 * o.slot.as_secs_f64(),
                    "delivered": h.len(),
                    "p50_us": pct(h, 50.0),
                    "p99_us": pct(h, 99.0),
                    "max_us": h.max(),
                })
            })
            .collect();
        let mut v = json!({
            "scenario": s.scenario,
            "shape": s.shape,
            "servers": s.servers,
            "clients": o.clients,
            "publishers": o.publishers,
            "subscribers": o.subscribers,
            "shards": o.shards,
            "rate_per_publisher": s.rate_per_publisher,
            "payload_bytes": s.payload_bytes,
            "duration_s": s.duration_s,
            "scheduled": o.scheduled,
            "published": o.published,
            "publish_errors": o.publish_errors,
            "expected": o.expected,
            "delivered": o.counts.delivered,
            "lost": o.lost,
            "duplicates": o.counts.duplicates,
            "out_of_order": o.counts.out_of_order,
            "delivered_per_s": o.delivered_per_s(),
            "delivery_ratio": o.delivery(),
            "latency_us": {
                "p50": pct(l, 50.0),
                "p90": pct(l, 90.0),
                "p99": pct(l, 99.0),
                "p999": pct(l, 99.9),
                "max": l.max(),
                "mean": l.mean(),
            },
            "connect_ms": {
                "p50": ms(pct(c, 50.0)),
                "p90": ms(pct(c, 90.0)),
                "p99": ms(pct(c, 99.0)),
                "max": ms(c.max()),
            },
            "clients_per_server": o.clients_per_server,
            "cross_server_delivered": o.counts.cross_server,
            "dropped_reported": o.counts.dropped_reported,
            "dropped_upstream": o.counts.dropped_upstream,
            "lost_by_cause": o.lost_by_cause,
            "guarantee": o.lost_by_cause.guarantee(),
            "disconnects": o.counts.disconnects,
            "moves": o.counts.moves,
            "server_drain": o.server_drain,
            "server_killed": o.server_killed,
            "recovered": o.counts.recovered,
            "recovery_gaps": o.counts.recovery_gaps,
            "recovery_gap_missed": o.counts.recovery_gap_missed,
            "recovery_gap_unknown": o.counts.recovery_gap_unknown,
            "foreign_payloads": o.counts.foreign,
            "misrouted": o.counts.misrouted,
            "subscriptions_refused": o.counts.refused,
            "max_publisher_lag_ms": o.max_lag_s * 1_000.0,
            "server_dropped": u.server_dropped,
            "server_slow_consumers": u.server_slow_consumers,
            "server_forward_dropped": u.server_forward_dropped,
            "publish_s": o.publish_s,
            "drain_s": o.drain_s,
            "cpu": {
                "window_s": u.window_s,
                "cores": u.cores,
                "servers_cpu_s": u.servers_cpu_s,
                "generator_cpu_s": u.generator_cpu_s,
                "generator_busy": u.generator_busy,
                "generator_saturated": u.generator_saturated,
                "host_busy": u.host_busy,
                "machine_saturated": u.machine_saturated,
            },
            "memory": { "peak_rss_bytes": u.peak_rss_bytes, "scope": u.rss_scope },
            "timeline": timeline,
            "warnings": self.warnings(),
        });
        if let Some(c) = &self.churn {
            v["churn"] = json!(c);
        }
        if let Some(d) = &self.direct {
            v["direct"] = json!(d);
        }
        if let Some(r) = &self.ramp {
            v["ramp"] = json!({
                "steps": r.steps,
                "sustainable_per_s": r.best.map(|b| r.steps[b].delivered_per_s),
                "min_delivery": r.min_delivery,
                "max_p99_ms": r.max_p99_ms,
            });
        }
        v
    }
}
