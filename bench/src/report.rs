//! Results: every step of every system and scenario as JSON, and a Markdown report with a
//! summary, the performance targets as ratios measured in this run, and the step tables. Each
//! outcome says whether its links were on TLS; a run with plain and TLS outcomes also compares
//! the two (TLS's cost per server CPU-second, relaymesh over TLS against NATS over TLS). Each
//! also says whether relaymesh kept topic history (`--history`); a run with both compares them
//! repetition by repetition, and the history scenarios (recovery, memory) get tables of their
//! own.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::Scenario;
use crate::connect::ConnectResult;
use crate::drivers::System;
use crate::histmem::{MemoryRun, Stage};
use crate::idle::IdleStep;
use crate::load::Step;
use crate::logins::LoginStep;
use crate::recovery::RecoveryResult;
use crate::servers::Running;

/// What relaymesh's comm servers held of topic history at the end of a run (all servers
/// together): shows that `--history on` was on.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct HistoryHeld {
    pub(crate) topics: u64,
    pub(crate) bytes: u64,
    pub(crate) stored: u64,
    pub(crate) evicted: u64,
}

impl HistoryHeld {
    pub(crate) async fn read(running: &Running, servers: usize) -> anyhow::Result<Self> {
        let mut held = Self {
            topics: 0,
            bytes: 0,
            stored: 0,
            evicted: 0,
        };
        for i in 0..servers {
            let s = running.comm_stats(i).await?;
            let n = |key: &str| s[key].as_u64().unwrap_or(0);
            held.topics += n("history_topics");
            held.bytes += n("history_bytes");
            held.stored += n("history_stored");
            held.evicted += n("history_evicted");
        }
        Ok(held)
    }
}

/// History on against off in one repetition, at one offered rate both delivered in full with
/// the generator not bound.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HistoryPair {
    scenario: Scenario,
    repeat: u32,
    offered_per_s: f64,
    off_per_cpu_s: f64,
    on_per_cpu_s: f64,
    /// `on_per_cpu_s / off_per_cpu_s`.
    ratio: f64,
    off_cpu_pct: f64,
    on_cpu_pct: f64,
    off_p99_ms: f64,
    on_p99_ms: f64,
    /// Server CPU-seconds and deliveries of each side, for pooled ratios.
    #[serde(skip)]
    cpu: (f64, f64),
    #[serde(skip)]
    delivered: (u64, u64),
}

/// History's cost at one offered rate over every repetition.
#[derive(Debug, Clone)]
struct Pooled {
    offered_per_s: f64,
    pairs: usize,
    /// Σ delivered / Σ CPU with history over the same without.
    ratio: f64,
    min: f64,
    max: f64,
}

/// The pairs of `scenario` pooled per offered rate, in rising order.
fn pooled(pairs: &[HistoryPair], scenario: Scenario) -> Vec<Pooled> {
    let mut rates: Vec<f64> = pairs
        .iter()
        .filter(|p| p.scenario == scenario)
        .map(|p| p.offered_per_s)
        .collect();
    rates.sort_by(f64::total_cmp);
    rates.dedup();
    rates
        .into_iter()
        .filter_map(|rate| {
            let at: Vec<&HistoryPair> = pairs
                .iter()
                .filter(|p| p.scenario == scenario && p.offered_per_s == rate)
                .collect();
            let sum = |f: fn(&HistoryPair) -> f64| at.iter().map(|p| f(p)).sum::<f64>();
            let on = sum(|p| p.delivered.1 as f64) / sum(|p| p.cpu.1);
            let off = sum(|p| p.delivered.0 as f64) / sum(|p| p.cpu.0);
            (off > 0.0 && on.is_finite()).then(|| Pooled {
                offered_per_s: rate,
                pairs: at.len(),
                ratio: on / off,
                min: at.iter().map(|p| p.ratio).fold(f64::INFINITY, f64::min),
                max: at.iter().map(|p| p.ratio).fold(0.0, f64::max),
            })
        })
        .collect()
}

/// One system in one scenario.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Outcome {
    pub(crate) system: System,
    pub(crate) scenario: Scenario,
    /// Every link of the system was on TLS (`--tls`).
    pub(crate) tls: bool,
    /// relaymesh's comm servers kept topic history (`--history on`).
    pub(crate) history: bool,
    /// Which repetition (`--repeat`), 0 for the first.
    pub(crate) repeat: u32,
    /// `ok`, `n/a: why` or `error: what`.
    pub(crate) status: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) steps: Vec<Step>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) idle: Vec<IdleStep>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) logins: Vec<LoginStep>,
    /// How the logins scenarios' clients logged in.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) logins_via: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) recovery: Option<RecoveryResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) storm: Option<crate::storm::StormResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) connect: Option<ConnectResult>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) memory: Vec<MemoryRun>,
    /// relaymesh: the history its comm servers held at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) history_held: Option<HistoryHeld>,
}

impl Outcome {
    pub(crate) fn new(system: System, scenario: Scenario, tls: bool) -> Self {
        Self {
            system,
            scenario,
            tls,
            history: false,
            repeat: 0,
            status: "ok".into(),
            steps: Vec::new(),
            idle: Vec::new(),
            logins: Vec::new(),
            logins_via: String::new(),
            recovery: None,
            storm: None,
            connect: None,
            memory: Vec::new(),
            history_held: None,
        }
    }

    #[cfg(test)]
    pub(crate) fn skipped(system: System, scenario: Scenario, tls: bool, why: &str) -> Self {
        Self {
            status: format!("n/a: {why}"),
            ..Self::new(system, scenario, tls)
        }
    }

    /// The system's name, with ` (TLS)` when its links were on TLS, ` (history)` when it
    /// kept topic history, and the repetition after the first.
    fn label(&self) -> String {
        let mut label = with_tls(self.system, self.tls);
        if self.history {
            label.push_str(" (history)");
        }
        if self.repeat > 0 {
            let _ = write!(label, " #{}", self.repeat + 1);
        }
        label
    }

    /// The last passing step: the sustainable rate.
    fn sustainable(&self) -> Option<&Step> {
        self.steps.iter().take_while(|s| s.passed).last()
    }

    /// The passing step with the most deliveries per server CPU-second.
    fn most_efficient(&self) -> Option<&Step> {
        self.steps
            .iter()
            .take_while(|s| s.passed)
            .max_by(|a, b| a.delivered_per_cpu_s.total_cmp(&b.delivered_per_cpu_s))
    }
}

/// The machine the run was on.
#[derive(Debug, Clone, Serialize)]
struct Machine {
    cpu_model: String,
    cpus: usize,
    memory_gib: f64,
    kernel: String,
}

impl Machine {
    fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
                .unwrap_or_default(),
            cpus: cpuinfo
                .lines()
                .filter(|l| l.starts_with("processor"))
                .count(),
            memory_gib: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .map_or(0.0, |kib| kib / 1048576.0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }
    }
}

/// One of the performance targets, evaluated on this run.
#[derive(Debug, Clone, Serialize)]
struct Target {
    target: String,
    measured: String,
    /// `pass`, `FAIL`, or `not measured` / `generator-bound` when the run cannot tell; `info`
    /// for a figure with no target (a comparison within relaymesh).
    result: String,
}

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub(crate) struct Results {
    /// The command line of the run.
    command: String,
    machine: Machine,
    server_cpu: String,
    warmup_s: f64,
    measure_s: f64,
    drain_s: f64,
    /// A step passes with p99 latency (and pacing lag) at most this.
    max_p99_ms: f64,
    smoke: bool,
    payload_bytes: usize,
    /// The TLS settings each system and scenario ran in, in order: `off` (plain TCP) and/or
    /// `on` (TLS on every link).
    tls: Vec<&'static str>,
    /// The setting the targets that do not name TLS are evaluated in: plain if the run had
    /// plain outcomes, else TLS.
    #[serde(skip)]
    base_tls: bool,
    /// The history settings each scenario ran in, in order: `off` and/or `on`.
    history: Vec<&'static str>,
    /// The setting the targets that do not name history are evaluated in: without if the run
    /// had such outcomes.
    #[serde(skip)]
    base_history: bool,
    outcomes: Vec<Outcome>,
    targets: Vec<Target>,
    /// With history against without, per repetition and offered rate (relaymesh).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    history_pairs: Vec<HistoryPair>,
}

impl Results {
    pub(crate) fn new(
        server_cpu: &str,
        warmup_s: f64,
        measure_s: f64,
        drain_s: f64,
        max_p99_ms: f64,
        smoke: bool,
        tls_modes: &[bool],
    ) -> Self {
        Self {
            command: std::env::args()
                .map(|a| shell_quoted(&a))
                .collect::<Vec<_>>()
                .join(" "),
            machine: Machine::read(),
            server_cpu: server_cpu.to_owned(),
            warmup_s,
            measure_s,
            drain_s,
            max_p99_ms,
            smoke,
            payload_bytes: crate::measure::PAYLOAD_BYTES,
            tls: tls_modes
                .iter()
                .map(|&t| if t { "on" } else { "off" })
                .collect(),
            base_tls: !tls_modes.is_empty() && !tls_modes.contains(&false),
            history: vec!["off"],
            base_history: false,
            outcomes: Vec::new(),
            targets: Vec::new(),
            history_pairs: Vec::new(),
        }
    }

    /// The history settings the run's scenarios ran in (`false`: without), in order.
    pub(crate) fn with_history(mut self, modes: &[bool]) -> Self {
        self.history = modes
            .iter()
            .map(|&t| if t { "on" } else { "off" })
            .collect();
        self.base_history = !modes.is_empty() && !modes.contains(&false);
        self
    }

    pub(crate) fn push(&mut self, o: Outcome) {
        self.outcomes.push(o);
        self.history_pairs = self.pair_history();
        self.targets = self.evaluate();
    }

    /// relaymesh with history against without, in the base TLS setting: for each repetition
    /// that ran both, each offered rate both delivered in full (≥ 99.9 %) with the generator
    /// not bound.
    fn pair_history(&self) -> Vec<HistoryPair> {
        let counts = |s: &&Step| s.delivery_pct >= 99.9 && !s.generator_bound;
        let mut pairs = Vec::new();
        for on in self.outcomes.iter().filter(|o| {
            o.system == System::Relaymesh && o.tls == self.base_tls && o.history && o.status == "ok"
        }) {
            let Some(off) = self.outcomes.iter().find(|o| {
                o.system == on.system
                    && o.scenario == on.scenario
                    && o.tls == on.tls
                    && !o.history
                    && o.repeat == on.repeat
                    && o.status == "ok"
            }) else {
                continue;
            };
            for a in on.steps.iter().filter(counts) {
                let Some(b) = off
                    .steps
                    .iter()
                    .filter(counts)
                    .find(|b| b.offered_per_s == a.offered_per_s)
                else {
                    continue;
                };
                if b.delivered_per_cpu_s <= 0.0 {
                    continue;
                }
                pairs.push(HistoryPair {
                    scenario: on.scenario,
                    repeat: on.repeat,
                    offered_per_s: a.offered_per_s,
                    off_per_cpu_s: b.delivered_per_cpu_s,
                    on_per_cpu_s: a.delivered_per_cpu_s,
                    ratio: a.delivered_per_cpu_s / b.delivered_per_cpu_s,
                    off_cpu_pct: b.server_cpu_pct,
                    on_cpu_pct: a.server_cpu_pct,
                    off_p99_ms: b.p99_ms,
                    on_p99_ms: a.p99_ms,
                    cpu: (b.server_cpu_s, a.server_cpu_s),
                    delivered: (b.delivered, a.delivered),
                });
            }
        }
        pairs
    }

    /// The targets about topic history: its cost per server CPU-second (each message
    /// scenario run with and without), recovery time and completeness, and the memory
    /// bounds.
    /// The cost of a connection against NATS's, run by run (repetition k of each).
    fn connect_targets(&self) -> Vec<Target> {
        let name = "connect + first subscribe: server CPU per connection ≤ NATS's";
        let ok = |system: System| {
            self.outcomes.iter().filter(move |o| {
                o.system == system
                    && o.scenario == Scenario::Connect
                    && o.status == "ok"
                    && o.connect.is_some()
            })
        };
        let mut t = Vec::new();
        for o in ok(System::Relaymesh) {
            let Some(nats) = ok(System::Nats).find(|n| n.repeat == o.repeat && n.tls == o.tls)
            else {
                continue;
            };
            let (Some(a), Some(b)) = (&o.connect, &nats.connect) else {
                continue;
            };
            t.push(Target {
                target: format!("{name} ({})", o.label()),
                measured: format!(
                    "{:.0} µs ({}) vs {:.0} µs ({:.2}×) over {} clients",
                    a.server_us(),
                    a.coordinator_us().map_or_else(String::new, |c| format!(
                        "coordinator {c:.0}, comm server {:.0}",
                        a.server_us() - c
                    )),
                    b.server_us(),
                    a.server_us() / b.server_us().max(1e-9),
                    a.clients
                ),
                result: if a.server_us() <= b.server_us() {
                    "pass"
                } else {
                    "FAIL"
                }
                .into(),
            });
        }
        if t.is_empty()
            && self
                .outcomes
                .iter()
                .any(|o| o.scenario == Scenario::Connect)
        {
            t.push(not_measured(name));
        }
        t
    }

    fn history_targets(&self) -> Vec<Target> {
        let mut t = Vec::new();
        let rm = System::Relaymesh;
        for scenario in [
            Scenario::Fanout10,
            Scenario::Fanout1000,
            Scenario::Dense,
            Scenario::TwoServer,
            Scenario::P2p,
            Scenario::P2pTwoServer,
            Scenario::Direct,
            Scenario::Backend,
        ] {
            let ran = |history| {
                self.outcomes.iter().any(|o| {
                    o.system == rm
                        && o.scenario == scenario
                        && o.tls == self.base_tls
                        && o.history == history
                })
            };
            if !(ran(true) && ran(false)) {
                continue;
            }
            let name = format!(
                "{}: relaymesh with history keeps ≥ 85 % of its delivered per server CPU-s",
                scenario.name()
            );
            let all = pooled(&self.history_pairs, scenario);
            let most = all.iter().map(|p| p.pairs).max().unwrap_or(0);
            // The highest rate measured in the most repetitions.
            t.push(match all.iter().rev().find(|p| p.pairs == most) {
                Some(p) => Target {
                    target: name,
                    measured: format!(
                        "{:.2}× at {} offered (pooled over {} repetition{}; per repetition {:.2}–{:.2})",
                        p.ratio,
                        rate(p.offered_per_s),
                        p.pairs,
                        if p.pairs == 1 { "" } else { "s" },
                        p.min,
                        p.max
                    ),
                    result: if p.ratio >= 0.85 { "pass" } else { "FAIL" }.into(),
                },
                None => not_measured(&name),
            });
        }
        for o in self
            .outcomes
            .iter()
            .filter(|o| o.scenario == Scenario::Recovery && o.status == "ok")
        {
            let Some(r) = &o.recovery else { continue };
            let name = format!(
                "recovery of {} missed messages < 1 s from the reconnect, each once and in order",
                r.trials.first().map_or(0, |t| t.missed)
            );
            if r.trials.is_empty() {
                t.push(not_measured(&name));
                continue;
            }
            let times: Vec<f64> = r
                .trials
                .iter()
                .map(|t| t.reconnected_to_recovered_ms)
                .collect();
            t.push(Target {
                target: name,
                measured: format!(
                    "{:.0}–{:.0} ms over {} trials; {} of them complete and in order",
                    times.iter().copied().fold(f64::INFINITY, f64::min),
                    times.iter().copied().fold(0.0, f64::max),
                    r.trials.len(),
                    r.trials
                        .iter()
                        .filter(|t| t.gap.is_none()
                            && t.missing + t.duplicates + t.out_of_order == 0
                            && t.recovered_count == t.missed)
                        .count()
                ),
                result: if r.trials.iter().all(|t| t.passed) {
                    "pass"
                } else {
                    "FAIL"
                }
                .into(),
            });
        }
        for o in self
            .outcomes
            .iter()
            .filter(|o| o.scenario == Scenario::Storm && o.status == "ok")
        {
            let Some(r) = &o.storm else { continue };
            t.push(Target {
                target: format!(
                    "reconnect storm: {} clients of a killed server back < 3 s and ≤ 1.5× their fresh connect, none giving up, login p99 < 50 ms",
                    r.clients
                ),
                measured: format!(
                    "{:.2} s ({:.2}× the fresh {:.2} s); {} gave up; login p99 {:.1} ms ({:.1} before)",
                    r.storm_s,
                    r.ratio,
                    r.fresh_s,
                    r.gave_up,
                    r.login_p99_ms_storm,
                    r.login_p99_ms_quiet
                ),
                result: if r.passed() { "pass" } else { "FAIL" }.into(),
            });
        }
        t.extend(self.connect_targets());
        for o in self
            .outcomes
            .iter()
            .filter(|o| o.scenario == Scenario::HistoryMemory && o.status == "ok")
        {
            for m in o.memory.iter().filter(|m| m.history) {
                t.push(Target {
                    target: format!(
                        "history within max_total_bytes {} MiB and max_topics {} under a flood ({} B payloads)",
                        m.bounds.max_total_bytes / (1024 * 1024),
                        m.bounds.max_topics,
                        m.payload
                    ),
                    measured: format!(
                        "history_bytes ≤ {:.1} MiB, topics ≤ {}; RSS {:.0} → {:.0} MiB (peak {:.0}); {:.0} B per held message accounted, {:.0} B by RSS",
                        m.max_history_bytes as f64 / 1048576.0,
                        m.max_history_topics,
                        m.baseline_rss_mib,
                        m.settled_rss_mib,
                        m.peak_rss_mib,
                        m.accounted_bytes_per_message,
                        m.rss_bytes_per_message
                    ),
                    result: if m.bounds_held { "pass" } else { "FAIL" }.into(),
                });
            }
        }
        t
    }

    pub(crate) fn any_failed(&self) -> bool {
        self.outcomes.iter().any(|o| o.status.starts_with("error"))
    }

    /// The outcome of `system` in `scenario` in the run's base TLS setting.
    fn get(&self, system: System, scenario: Scenario) -> Option<&Outcome> {
        self.get_in(system, scenario, self.base_tls)
    }

    /// The outcome of `system` in `scenario`, on TLS or not.
    fn get_in(&self, system: System, scenario: Scenario, tls: bool) -> Option<&Outcome> {
        self.outcomes.iter().find(|o| {
            o.system == system
                && o.scenario == scenario
                && o.tls == tls
                && o.history == self.base_history
                && o.status == "ok"
        })
    }

    /// Delivered per server CPU-second of `a` over `b` (in the base TLS setting), at the
    /// highest offered rate both delivered in full (≥ 99.9 %, whatever the latency: a server
    /// can be efficient and slow); `None` without such a step.
    fn cpu_ratio(&self, scenario: Scenario, a: System, b: System) -> Option<(f64, &Step, &Step)> {
        let (a, b) = (self.get(a, scenario)?, self.get(b, scenario)?);
        common_step_ratio(a, b, |s| s.delivery_pct >= 99.9)
    }

    /// Delivered per server CPU-second of `a` over `b`, each a system on TLS or not, at the
    /// highest offered rate both delivered in full with the generator not bound on either
    /// side (else, flagged by the `bool`, the highest both delivered in full); `None` without
    /// such a step.
    fn tls_cpu_ratio(
        &self,
        scenario: Scenario,
        a: (System, bool),
        b: (System, bool),
    ) -> Option<(f64, &Step, &Step, bool)> {
        let a = self.get_in(a.0, scenario, a.1)?;
        let b = self.get_in(b.0, scenario, b.1)?;
        if let Some((ratio, sa, sb)) =
            common_step_ratio(a, b, |s| s.delivery_pct >= 99.9 && !s.generator_bound)
        {
            return Some((ratio, sa, sb, false));
        }
        common_step_ratio(a, b, |s| s.delivery_pct >= 99.9)
            .map(|(ratio, sa, sb)| (ratio, sa, sb, true))
    }

    /// The targets about TLS: what it costs relaymesh (and NATS) per server CPU-second, and
    /// relaymesh over TLS against NATS over TLS, for every message scenario with both sides
    /// measured; logins per second over TLS against plain.
    fn tls_targets(&self) -> Vec<Target> {
        let (rm, nats) = (System::Relaymesh, System::Nats);
        let mut t = Vec::new();
        let ratio_target = |name: String,
                            found: Option<(f64, &Step, &Step, bool)>,
                            pass: Option<fn(f64) -> bool>|
         -> Target {
            match found {
                Some((ratio, a, b, bound)) => Target {
                    target: name,
                    measured: format!(
                        "{:.2}× at {} offered ({} vs {} per CPU-s)",
                        ratio,
                        rate(a.offered_per_s),
                        rate(a.delivered_per_cpu_s),
                        rate(b.delivered_per_cpu_s)
                    ),
                    result: match pass {
                        None => "info".into(),
                        Some(_) if bound => "generator-bound".into(),
                        Some(pass) => if pass(ratio) { "pass" } else { "FAIL" }.into(),
                    },
                },
                None => not_measured(&name),
            }
        };
        for scenario in [
            Scenario::Fanout10,
            Scenario::Fanout1000,
            Scenario::Dense,
            Scenario::TwoServer,
            Scenario::P2p,
            Scenario::P2pTwoServer,
            Scenario::Direct,
            Scenario::Backend,
        ] {
            let name = scenario.name();
            let ran = |system, tls| {
                self.outcomes
                    .iter()
                    .any(|o| o.system == system && o.scenario == scenario && o.tls == tls)
            };
            if ran(rm, true) && ran(rm, false) {
                t.push(ratio_target(
                    format!(
                        "{name}: relaymesh over TLS keeps ≥ 75 % of its plain delivered per server CPU-s"
                    ),
                    self.tls_cpu_ratio(scenario, (rm, true), (rm, false)),
                    Some(|r| r >= 0.75),
                ));
            }
            if ran(nats, true) && ran(nats, false) {
                t.push(ratio_target(
                    format!("{name}: NATS over TLS against plain, delivered per server CPU-s"),
                    self.tls_cpu_ratio(scenario, (nats, true), (nats, false)),
                    None,
                ));
            }
            if ran(rm, true) && ran(nats, true) {
                t.push(ratio_target(
                    format!(
                        "{name}: relaymesh over TLS delivers more per server CPU-s than NATS over TLS"
                    ),
                    self.tls_cpu_ratio(scenario, (rm, true), (nats, true)),
                    Some(|r| r > 1.0),
                ));
            }
        }
        let best = |tls| {
            self.get_in(rm, Scenario::Logins, tls)
                .and_then(|o| o.logins.iter().take_while(|s| s.passed).last())
        };
        let ran = |tls| {
            self.outcomes
                .iter()
                .any(|o| o.system == rm && o.scenario == Scenario::Logins && o.tls == tls)
        };
        if ran(true) && ran(false) {
            let name =
                "logins/s through one coordinator over TLS against plain (last passing step)";
            t.push(match (best(true), best(false)) {
                (Some(a), Some(b)) => Target {
                    target: name.into(),
                    measured: format!(
                        "{:.0} vs {:.0} logins/s ({:.2}×), p99 {:.2} ms vs {:.2} ms",
                        a.logins_per_s,
                        b.logins_per_s,
                        a.logins_per_s / b.logins_per_s.max(1.0),
                        a.p99_ms,
                        b.p99_ms
                    ),
                    result: "info".into(),
                },
                _ => not_measured(name),
            });
        }
        t
    }

    fn evaluate(&self) -> Vec<Target> {
        let mut t = Vec::new();
        let verdict = |ok: bool| if ok { "pass" } else { "FAIL" }.to_owned();
        let rm = System::Relaymesh;
        let rm10 = self.get(rm, Scenario::Fanout10);
        // 1 → 10 sustainable rate against NATS.
        match (
            rm10.and_then(Outcome::sustainable),
            self.get(System::Nats, Scenario::Fanout10)
                .and_then(Outcome::sustainable),
        ) {
            (Some(a), Some(b)) => t.push(Target {
                target: "1→10 sustainable delivered/s ≥ NATS".into(),
                measured: format!(
                    "{} vs {} ({:.2}×)",
                    rate(a.delivered_per_s),
                    rate(b.delivered_per_s),
                    a.delivered_per_s / b.delivered_per_s
                ),
                result: if a.generator_bound && b.generator_bound {
                    "generator-bound".into()
                } else {
                    verdict(a.offered_per_s >= b.offered_per_s)
                },
            }),
            _ => t.push(not_measured("1→10 sustainable delivered/s ≥ NATS")),
        }
        // p99 at 1 M/s.
        match rm10.and_then(|o| o.steps.iter().find(|s| s.offered_per_s == 1e6)) {
            Some(s) => t.push(Target {
                target: "1→10 p99 ≤ 2 ms at 1 M delivered/s".into(),
                measured: format!("p99 {:.2} ms, delivery {:.2} %", s.p99_ms, s.delivery_pct),
                result: verdict(s.p99_ms <= 2.0 && s.delivery_pct >= 99.9),
            }),
            None => t.push(not_measured("1→10 p99 ≤ 2 ms at 1 M delivered/s")),
        }
        for (scenario, peer, factor) in [
            (Scenario::Fanout10, System::Nats, 1.2),
            (Scenario::Fanout1000, System::Nats, 1.2),
            (Scenario::Fanout10, System::Mosquitto, 5.0),
            (Scenario::Fanout1000, System::Mosquitto, 5.0),
        ] {
            let name = format!(
                "{}: delivered per server CPU-s ≥ {factor} × {}",
                scenario.name(),
                peer.name()
            );
            t.push(match self.cpu_ratio(scenario, rm, peer) {
                Some((ratio, a, b)) => Target {
                    target: name,
                    measured: format!(
                        "{:.2}× at {} offered ({} vs {} per CPU-s)",
                        ratio,
                        rate(a.offered_per_s),
                        rate(a.delivered_per_cpu_s),
                        rate(b.delivered_per_cpu_s)
                    ),
                    result: if a.generator_bound || b.generator_bound {
                        "generator-bound".into()
                    } else {
                        verdict(ratio >= factor)
                    },
                },
                None => not_measured(&name),
            });
        }
        // Two servers against one.
        let two = self.get(rm, Scenario::TwoServer);
        match (
            rm10.and_then(Outcome::sustainable),
            two.and_then(Outcome::sustainable),
        ) {
            (Some(one), Some(two_s)) => {
                t.push(Target {
                    target: "two-server throughput ≥ 75 % of one server (1→10)".into(),
                    measured: format!(
                        "{} vs {} ({:.0} %)",
                        rate(two_s.delivered_per_s),
                        rate(one.delivered_per_s),
                        100.0 * two_s.delivered_per_s / one.delivered_per_s
                    ),
                    result: verdict(two_s.delivered_per_s >= 0.75 * one.delivered_per_s),
                });
                let same = rm10.and_then(|o| {
                    o.steps
                        .iter()
                        .find(|s| s.passed && s.offered_per_s == two_s.offered_per_s)
                });
                t.push(match same {
                    Some(s1) => Target {
                        target: "two-server p99 ≤ 2 × one-server p99".into(),
                        measured: format!(
                            "{:.2} ms vs {:.2} ms at {} offered",
                            two_s.p99_ms,
                            s1.p99_ms,
                            rate(two_s.offered_per_s)
                        ),
                        result: verdict(two_s.p99_ms <= 2.0 * s1.p99_ms),
                    },
                    None => not_measured("two-server p99 ≤ 2 × one-server p99"),
                });
            }
            _ => t.push(not_measured(
                "two-server throughput ≥ 75 % of one server (1→10)",
            )),
        }
        // Publishes from an application backend (coordinator's gRPC API) against a client's.
        if self
            .outcomes
            .iter()
            .any(|o| o.system == rm && o.scenario == Scenario::Backend && o.tls == self.base_tls)
        {
            let name =
                "backend API publishes (1→10): delivered per server CPU-s vs client publishes";
            let best = |scenario| self.get(rm, scenario).and_then(Outcome::most_efficient);
            t.push(
                match (best(Scenario::Backend), best(Scenario::Fanout10)) {
                    (Some(b), Some(c)) if c.delivered_per_cpu_s > 0.0 => Target {
                        target: name.into(),
                        measured: format!(
                            "{} deliveries per server CPU-s ({} offered), {:.2} × client publishes ({} per CPU-s at {} offered)",
                            rate(b.delivered_per_cpu_s),
                            rate(b.offered_per_s),
                            b.delivered_per_cpu_s / c.delivered_per_cpu_s,
                            rate(c.delivered_per_cpu_s),
                            rate(c.offered_per_s)
                        ),
                        result: "info".into(),
                    },
                    _ => not_measured(name),
                },
            );
        }
        // Idle memory.
        if let Some(o) = self.get(rm, Scenario::Idle) {
            for s in &o.idle {
                t.push(Target {
                    target: format!("{} idle clients < 16 KiB each", s.clients),
                    measured: if s.blocked.is_empty() {
                        format!("{:.1} KiB each", s.kib_per_client)
                    } else {
                        String::new()
                    },
                    result: if s.blocked.is_empty() {
                        verdict(s.kib_per_client < 16.0)
                    } else {
                        format!("blocked: {}", s.blocked)
                    },
                });
            }
        } else {
            t.push(not_measured("idle clients < 16 KiB each"));
        }
        // Logins.
        match self.get(rm, Scenario::Logins) {
            Some(o) => {
                let best = o.logins.iter().take_while(|s| s.passed).last();
                t.push(Target {
                    target: "≥ 5000 logins/s through one coordinator, p99 < 20 ms".into(),
                    measured: best.map_or_else(
                        || "no step passed".to_owned(),
                        |s| format!("{:.0} logins/s, p99 {:.2} ms", s.logins_per_s, s.p99_ms),
                    ),
                    result: verdict(best.is_some_and(|s| s.offered_per_s >= 5000.0)),
                });
            }
            None => t.push(not_measured(
                "≥ 5000 logins/s through one coordinator, p99 < 20 ms",
            )),
        }
        if self.base_tls {
            // Every target above was measured over TLS.
            for target in &mut t {
                target.target.push_str(" (TLS)");
            }
        }
        t.extend(self.tls_targets());
        t.extend(self.history_targets());
        t
    }

    pub(crate) fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(self)?)?;
        std::fs::write(dir.join("results.md"), self.markdown())?;
        Ok(())
    }

    pub(crate) fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(
            md,
            "# relaymesh benchmark{}\n",
            if self.smoke { " (smoke run)" } else { "" }
        );
        let _ = writeln!(
            md,
            "Machine: {} × {}, {:.0} GiB, Linux {}. Servers {}, generator on the rest (one thread). \
             Payload {} B; each step {} s warm-up, {} s measured, up to {} s drain; a step passes with ≥ 99.9 % delivered and p99 ≤ {} ms.\n",
            m.cpus,
            m.cpu_model,
            m.memory_gib,
            m.kernel,
            if self.server_cpu.is_empty() {
                "not pinned".to_owned()
            } else {
                format!("pinned to CPU {}", self.server_cpu)
            },
            self.payload_bytes,
            self.warmup_s,
            self.measure_s,
            self.drain_s,
            self.max_p99_ms
        );
        let _ = writeln!(
            md,
            "TLS: {}\n",
            match (self.tls.contains(&"off"), self.tls.contains(&"on")) {
                (_, false) => "off (plain TCP on every link).",
                (false, true) =>
                    "on every link (certificates made at start: a CA and an ECDSA P-256 server certificate for 127.0.0.1; relaymesh wss:// and https://, NATS TLS on the client port and the route).",
                (true, true) =>
                    "each system and scenario ran plain, then with TLS on every link (marked \"(TLS)\"; certificates made at start: a CA and an ECDSA P-256 server certificate for 127.0.0.1; relaymesh wss:// and https://, NATS TLS on the client port and the route). Targets that do not name TLS are the plain runs'.",
            }
        );
        if self.history.contains(&"on") {
            let _ = writeln!(
                md,
                "History: {}\n",
                if self.history.contains(&"off") {
                    "relaymesh ran each scenario without, then with topic history on every topic (`bench/configs/history.toml`: `topics = [\"#\"]`, default bounds; marked \"(history)\"), alternating in each repetition. Targets that do not name history are the runs without."
                } else {
                    "relaymesh's comm servers kept topic history on every topic (`bench/configs/history.toml`, default bounds)."
                }
            );
        }
        let _ = writeln!(md, "Command: `{}`\n", self.command);
        let _ = writeln!(
            md,
            "## Targets\n\n| target | measured | result |\n|---|---|---|"
        );
        for t in &self.targets {
            let _ = writeln!(md, "| {} | {} | {} |", t.target, t.measured, t.result);
        }
        self.history_markdown(&mut md);
        let _ = writeln!(
            md,
            "\n## Summary (last passing step)\n\n| scenario | system | sustainable delivered/s | p99 ms | server CPU % | delivered per server CPU-s | server RSS MiB |\n|---|---|---|---|---|---|---|"
        );
        for o in self
            .outcomes
            .iter()
            .filter(|o| !o.steps.is_empty() || o.status != "ok")
        {
            if o.idle.len() + o.logins.len() > 0 {
                continue;
            }
            match o.sustainable() {
                Some(s) => {
                    let _ = writeln!(
                        md,
                        "| {} | {} | {}{} | {:.2} | {:.0} | {} | {:.1} |",
                        o.scenario.name(),
                        o.label(),
                        rate(s.delivered_per_s),
                        if s.generator_bound {
                            " (generator-bound)"
                        } else {
                            ""
                        },
                        s.p99_ms,
                        s.server_cpu_pct,
                        rate(s.delivered_per_cpu_s),
                        s.server_rss_mib
                    );
                }
                None => {
                    let why = if o.status == "ok" {
                        "no step passed"
                    } else {
                        &o.status
                    };
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | | | | |",
                        o.scenario.name(),
                        o.label(),
                        why
                    );
                }
            }
        }
        for o in &self.outcomes {
            if !o.steps.is_empty() {
                let _ = writeln!(
                    md,
                    "\n### {} — {}\n\n| offered/s | delivered/s | delivery % | p50 ms | p99 ms | p999 ms | max ms | release lag p99 ms | server CPU % | per CPU-s | RSS MiB | generator CPU % | |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|",
                    o.scenario.name(),
                    o.label()
                );
                for s in &o.steps {
                    let _ = writeln!(
                        md,
                        "| {} | {} | {:.3} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {} | {:.1} | {:.0}{} | {} |",
                        rate(s.offered_per_s),
                        rate(s.delivered_per_s),
                        s.delivery_pct,
                        s.p50_ms,
                        s.p99_ms,
                        s.p999_ms,
                        s.max_ms,
                        s.release_lag_p99_ms,
                        s.server_cpu_pct,
                        rate(s.delivered_per_cpu_s),
                        s.server_rss_mib,
                        s.generator_cpu_pct,
                        if s.generator_bound { " (bound)" } else { "" },
                        verdict_of(s)
                    );
                }
            }
            if !o.idle.is_empty() {
                let _ = writeln!(
                    md,
                    "\n### idle clients — {}\n\n| clients | server RSS MiB | baseline MiB | KiB per client | connect s |\n|---|---|---|---|---|",
                    o.label()
                );
                for s in &o.idle {
                    if s.blocked.is_empty() {
                        let _ = writeln!(
                            md,
                            "| {} | {:.1} | {:.1} | {:.2} | {:.1} |",
                            s.clients,
                            s.server_rss_mib,
                            s.baseline_rss_mib,
                            s.kib_per_client,
                            s.connect_s
                        );
                    } else {
                        let _ = writeln!(md, "| {} | blocked: {} | | | |", s.clients, s.blocked);
                    }
                }
            }
            if !o.logins.is_empty() {
                let _ = writeln!(
                    md,
                    "\n### {} — {}\n\nLogins: {}.\n\n| offered/s | logins/s | failed | p50 ms | p99 ms | max ms | server CPU % | generator CPU % | |\n|---|---|---|---|---|---|---|---|---|",
                    o.scenario.name(),
                    o.label(),
                    o.logins_via
                );
                for s in &o.logins {
                    let _ = writeln!(
                        md,
                        "| {:.0} | {:.0} | {} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0}{} | {} |",
                        s.offered_per_s,
                        s.logins_per_s,
                        s.failed,
                        s.p50_ms,
                        s.p99_ms,
                        s.max_ms,
                        s.server_cpu_pct,
                        s.generator_cpu_pct,
                        if s.generator_bound { " (bound)" } else { "" },
                        if s.passed { "pass" } else { "fail" }
                    );
                }
            }
        }
        md
    }
}

impl Results {
    /// The sections on topic history: with against without, recovery, memory.
    fn history_markdown(&self, md: &mut String) {
        if !self.history_pairs.is_empty() {
            let _ = writeln!(
                md,
                "\n## relaymesh with history against without\n\nDelivered per server CPU-second (all relaymesh processes) in the same repetition at the same offered rate, where both delivered ≥ 99.9 % and the generator was not bound.\n\n| scenario | repetition | offered/s | without: per CPU-s (CPU %, p99 ms) | with: per CPU-s (CPU %, p99 ms) | with / without |\n|---|---|---|---|---|---|"
            );
            for p in &self.history_pairs {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} ({:.0} %, {:.2}) | {} ({:.0} %, {:.2}) | {:.3} |",
                    p.scenario.name(),
                    p.repeat + 1,
                    rate(p.offered_per_s),
                    rate(p.off_per_cpu_s),
                    p.off_cpu_pct,
                    p.off_p99_ms,
                    rate(p.on_per_cpu_s),
                    p.on_cpu_pct,
                    p.on_p99_ms,
                    p.ratio
                );
            }
            let _ = writeln!(
                md,
                "\n| scenario | offered/s | repetitions | pooled with / without (Σ delivered / Σ CPU) | range |\n|---|---|---|---|---|"
            );
            for scenario in [
                Scenario::Fanout10,
                Scenario::TwoServer,
                Scenario::Fanout1000,
                Scenario::Dense,
                Scenario::P2p,
                Scenario::P2pTwoServer,
                Scenario::Direct,
                Scenario::Backend,
            ] {
                for p in pooled(&self.history_pairs, scenario) {
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {:.3} | {:.3}–{:.3} |",
                        scenario.name(),
                        rate(p.offered_per_s),
                        p.pairs,
                        p.ratio,
                        p.min,
                        p.max
                    );
                }
            }
        }
        let held: Vec<&Outcome> = self
            .outcomes
            .iter()
            .filter(|o| o.history && o.history_held.is_some())
            .collect();
        if !held.is_empty() {
            let _ = writeln!(
                md,
                "\nHistory held by the comm servers at the end of each run with history (all servers): {}\n",
                held.iter()
                    .filter_map(|o| o.history_held.map(|h| format!(
                        "{} {}: {} stored, {} evicted, {} topics, {:.1} MiB",
                        o.scenario.name(),
                        o.label(),
                        h.stored,
                        h.evicted,
                        h.topics,
                        h.bytes as f64 / 1048576.0
                    )))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        let connects: Vec<&Outcome> = self
            .outcomes
            .iter()
            .filter(|o| o.connect.is_some())
            .collect();
        if !connects.is_empty() {
            let _ = writeln!(
                md,
                "\n## Connection cost\n\nClients connect and subscribe to one topic each ({} at a time; the subscription confirmed where the protocol says so), with each system's usual client library: relaymesh logs in through the coordinator and attaches to the comm server it was given. CPU of all the system's server processes (relaymesh: coordinator and comm server) over that phase, per connection.\n\n| system | clients | topics | seconds | connections/s | server CPU µs per connection | of which the coordinator | generator CPU µs per connection |\n|---|---|---|---|---|---|---|---|",
                crate::connect::CONCURRENCY
            );
            for o in connects {
                let Some(r) = &o.connect else { continue };
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {:.2} | {:.0} | {:.0} | {} | {:.0} |",
                    o.label(),
                    r.clients,
                    r.topics,
                    r.wall_s,
                    r.per_s(),
                    r.server_us(),
                    r.coordinator_us()
                        .map_or_else(String::new, |c| format!("{c:.0}")),
                    r.generator_us()
                );
            }
        }
        for o in &self.outcomes {
            if let Some(r) = &o.storm {
                let _ = writeln!(
                    md,
                    "\n## Reconnect storm — {}\n\n{} clients on comm server A of three, each subscribed to one of the storm's topics; A killed (SIGKILL); every client logs in again with the client library's defaults and resubscribes on B or C. Logins go {}. Fresh: the same clients' first connect and subscribe, 512 at a time. The probes run throughout, on a thread of their own: logins (`POST /v1/login` every 20 ms) and 200 messages/s from a publisher on B to 5 subscribers on B and 5 on C. The curves are in `storm.svg`.\n\n| fresh s | storm s | storm / fresh | gave up | held by B, C | login p99 ms before / during | logins during (failed) | existing clients' p99 ms before / during | CPU µs per client fresh: coordinator / A | storm: coordinator / B + C | placements during, p99 under (coordinator's histogram) | |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n| {:.2} | {:.2} | {:.2} | {} | {} | {:.1} / {:.1} | {} ({}) | {:.2} / {:.2} | {:.0} / {:.0} | {:.0} / {:.0} | {}, {} ms | {} |",
                    o.label(),
                    r.clients,
                    r.logins,
                    r.fresh_s,
                    r.storm_s,
                    r.ratio,
                    r.gave_up,
                    r.held
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    r.login_p99_ms_quiet,
                    r.login_p99_ms_storm,
                    r.logins_storm,
                    r.login_failures_storm,
                    r.probe_p99_ms_quiet,
                    r.probe_p99_ms_storm,
                    r.fresh_cpu_s[0] * 1e6 / r.clients.max(1) as f64,
                    r.fresh_cpu_s[1] * 1e6 / r.clients.max(1) as f64,
                    r.storm_cpu_s[0] * 1e6 / r.clients.max(1) as f64,
                    r.storm_cpu_s[1] * 1e6 / r.clients.max(1) as f64,
                    r.placements_storm,
                    r.placement_p99_ms_storm,
                    if r.passed() { "pass" } else { "FAIL" }
                );
                let counts = r.coordinator_storm.map_or_else(
                    || "The coordinator's counters could not be read.".to_owned(),
                    |c| {
                        format!(
                            "The coordinator during the storm: {} logins answered, {} failed, {} reservations failed (the login went on to another server), {} refused for their address's rate.",
                            c.logins, c.login_failures, c.reservations_failed, c.rate_limited
                        )
                    },
                );
                let reasons = if r.login_failure_reasons.is_empty() {
                    "none".to_owned()
                } else {
                    r.login_failure_reasons
                        .iter()
                        .map(|(reason, n)| format!("{n} × {reason}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                let _ = writeln!(
                    md,
                    "\n{counts} Probe logins that failed over the whole run, and why: {reasons}."
                );
            }
            if let Some(r) = &o.recovery {
                let _ = writeln!(
                    md,
                    "\n## Recovery — {}\n\nA subscriber on server A loses it (A and the coordinator killed); a publisher on B publishes while it is away; the coordinator is started again and the subscriber recovers on B or C. Times in ms.\n\n| trial | missed | reconnected to | kill → disconnected | publish + flush | restart → reconnected | reconnected → first | reconnected → recovered | restart → recovered | Recovered count | received before it | gap | dup / out of order / missing | live follows | server requests / replayed / gaps | |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
                    o.label()
                );
                for t in &r.trials {
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {:.0} | {} | {} | {} | {} / {} / {} | {} | {} / {} / {} | {} |",
                        t.trial + 1,
                        t.missed,
                        t.reconnected_to,
                        t.disconnect_ms,
                        t.publish_ms,
                        t.restart_to_reconnected_ms,
                        t.reconnected_to_first_ms,
                        t.reconnected_to_recovered_ms,
                        t.restart_to_recovered_ms,
                        t.recovered_count,
                        t.received_before_recovered,
                        t.gap.map_or_else(|| "none".to_owned(), |g| g.to_string()),
                        t.duplicates,
                        t.out_of_order,
                        t.missing,
                        if t.live_followed { "yes" } else { "no" },
                        t.server_history_requests,
                        t.server_history_replayed,
                        t.server_history_gaps,
                        if t.passed { "pass" } else { "FAIL" }
                    );
                }
                if !r.reads.is_empty() {
                    let _ = writeln!(
                        md,
                        "\n### Backlog reads: `history(topic, Last(n))`\n\nThe messages are held by server A only; the reader on C holds none (its peers answer), the reader on A holds them all. Reads alternate between the two.\n\n| from | reads | n | messages | in order | gap | min ms | median ms | max ms |\n|---|---|---|---|---|---|---|---|---|"
                    );
                    for from in ["peers", "local"] {
                        let reads: Vec<_> = r.reads.iter().filter(|x| x.from == from).collect();
                        if reads.is_empty() {
                            continue;
                        }
                        let mut times: Vec<f64> = reads.iter().map(|x| x.ms).collect();
                        times.sort_by(f64::total_cmp);
                        let _ = writeln!(
                            md,
                            "| {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} |",
                            if from == "peers" {
                                "C (peers answer)"
                            } else {
                                "A (local)"
                            },
                            reads.len(),
                            reads[0].asked,
                            reads.iter().map(|x| x.messages).min().unwrap_or(0),
                            if reads.iter().all(|x| x.in_order) {
                                "yes"
                            } else {
                                "no"
                            },
                            if reads.iter().any(|x| x.gap) {
                                "yes"
                            } else {
                                "no"
                            },
                            times[0],
                            times[times.len() / 2],
                            times[times.len() - 1]
                        );
                    }
                }
            }
            for m in &o.memory {
                if !m.history {
                    let _ = writeln!(
                        md,
                        "\n## Control without history — payload {} B ({})\n\nThe same stages on a comm server without `[history]`.\n\n| stage | topics | messages | s | messages/s | server CPU µs per message | |\n|---|---|---|---|---|---|---|",
                        m.payload,
                        o.label()
                    );
                    stage_rows(md, &m.stages);
                    continue;
                }
                let _ = writeln!(
                    md,
                    "\n## History memory — payload {} B ({})\n\nOne comm server, `max_total_bytes` {} MiB, `max_topics` {}. After the fill (every message held): {:.0} B per held message by `history_bytes`, {:.0} B by RSS growth. Highest `history_bytes` sampled {:.2} MiB, highest `history_topics` {}; RSS baseline {:.1} MiB, at the end of the floods {:.1} MiB, after {} s quiet {:.1} MiB, peak (VmHWM) {:.1} MiB. Bounds held: {}.\n\n| stage | topics | messages | s | messages/s | server CPU µs per message | |\n|---|---|---|---|---|---|---|",
                    m.payload,
                    o.label(),
                    m.bounds.max_total_bytes / (1024 * 1024),
                    m.bounds.max_topics,
                    m.accounted_bytes_per_message,
                    m.rss_bytes_per_message,
                    m.max_history_bytes as f64 / 1048576.0,
                    m.max_history_topics,
                    m.baseline_rss_mib,
                    m.flood_end_rss_mib,
                    2,
                    m.settled_rss_mib,
                    m.peak_rss_mib,
                    if m.bounds_held { "yes" } else { "**no**" }
                );
                stage_rows(md, &m.stages);
                let _ = writeln!(
                    md,
                    "\n| stage | t s | published | history_topics | history_bytes MiB | held | stored | evicted | not kept | RSS MiB | CPU s |\n|---|---|---|---|---|---|---|---|---|---|---|"
                );
                for x in &m.samples {
                    let _ = writeln!(
                        md,
                        "| {} | {:.1} | {} | {} | {:.2} | {} | {} | {} | {} | {:.1} | {:.2} |",
                        x.stage,
                        x.at_s,
                        x.published,
                        x.history_topics,
                        x.history_bytes as f64 / 1048576.0,
                        x.held,
                        x.history_stored,
                        x.history_evicted,
                        x.history_not_kept,
                        x.rss_mib,
                        x.cpu_s
                    );
                }
            }
        }
    }
}

/// Delivered per server CPU-second of `a` over `b` at the highest offered rate at which both
/// have a step that `counts`.
/// A history-memory run's stages, one table row each.
fn stage_rows(md: &mut String, stages: &[Stage]) {
    for st in stages {
        let _ = writeln!(
            md,
            "| {} | {}..{} | {} | {:.1} | {:.0} | {:.2} | {} |",
            st.stage,
            st.first_topic,
            st.first_topic + st.topics,
            st.messages,
            st.seconds,
            st.messages_per_s,
            st.server_cpu_us_per_message,
            if st.cut_short { "cut short" } else { "" }
        );
    }
}

fn common_step_ratio<'a>(
    a: &'a Outcome,
    b: &'a Outcome,
    counts: impl Fn(&Step) -> bool,
) -> Option<(f64, &'a Step, &'a Step)> {
    let mut pairs = a.steps.iter().filter(|s| counts(s)).filter_map(|sa| {
        b.steps
            .iter()
            .filter(|s| counts(s))
            .find(|sb| sb.offered_per_s == sa.offered_per_s)
            .map(|sb| (sa, sb))
    });
    let (sa, sb) = pairs.next_back()?;
    (sb.delivered_per_cpu_s > 0.0)
        .then(|| (sa.delivered_per_cpu_s / sb.delivered_per_cpu_s, sa, sb))
}

/// `system`'s name, with ` (TLS)` when `tls`.
fn with_tls(system: System, tls: bool) -> String {
    if tls {
        format!("{} (TLS)", system.name())
    } else {
        system.name().to_owned()
    }
}

fn not_measured(target: &str) -> Target {
    Target {
        target: target.to_owned(),
        measured: String::new(),
        result: "not measured".into(),
    }
}

/// A rate with a k/M suffix.
fn rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2} M", r / 1e6)
    } else if r >= 1e3 {
        format!("{:.1} k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

/// A step's last column: pass or fail, and any refused publishes.
fn verdict_of(s: &Step) -> String {
    let verdict = if s.passed { "pass" } else { "fail" };
    if s.refused > 0 {
        format!("{verdict} ({} refused)", s.refused)
    } else {
        verdict.to_owned()
    }
}

/// One progress line per message step.
pub(crate) fn step_line(s: &Step) -> String {
    format!(
        "offered {}/s delivered {}/s ({:.3} %) p99 {:.2} ms max {:.2} ms lag p99 {:.2} ms server CPU {:.0} % generator {:.0} %{}{} {}",
        rate(s.offered_per_s),
        rate(s.delivered_per_s),
        s.delivery_pct,
        s.p99_ms,
        s.max_ms,
        s.release_lag_p99_ms,
        s.server_cpu_pct,
        s.generator_cpu_pct,
        if s.generator_bound {
            " (generator-bound)"
        } else {
            ""
        },
        if s.refused > 0 {
            format!(" {} refused", s.refused)
        } else {
            String::new()
        },
        if s.passed { "pass" } else { "FAIL" }
    )
}

pub(crate) fn idle_line(s: &IdleStep) -> String {
    if s.blocked.is_empty() {
        format!(
            "{} idle clients: server RSS {:.1} MiB ({:.2} KiB per client)",
            s.clients, s.server_rss_mib, s.kib_per_client
        )
    } else {
        format!("{} idle clients: blocked: {}", s.clients, s.blocked)
    }
}

pub(crate) fn connect_line(r: &ConnectResult) -> String {
    format!(
        "{} clients connected and subscribed to {} topics in {:.2} s ({:.0}/s): server CPU {:.0} µs per connection{}, generator {:.0} µs",
        r.clients,
        r.topics,
        r.wall_s,
        r.per_s(),
        r.server_us(),
        r.coordinator_us()
            .map(|c| format!(" (coordinator {c:.0})"))
            .unwrap_or_default(),
        r.generator_us()
    )
}

pub(crate) fn login_line(s: &LoginStep) -> String {
    format!(
        "offered {:.0} logins/s: {:.0}/s{}, {} failed{}, p99 {:.2} ms, server CPU {:.0} %, generator {:.0} % {}",
        s.offered_per_s,
        s.logins_per_s,
        if s.answered_with_identity > 0 {
            format!(" ({} answered with the identity)", s.answered_with_identity)
        } else {
            String::new()
        },
        s.failed,
        if s.first_error.is_empty() {
            String::new()
        } else {
            format!(" ({})", s.first_error)
        },
        s.p99_ms,
        s.server_cpu_pct,
        s.generator_cpu_pct,
        if s.passed { "pass" } else { "FAIL" }
    )
}

/// `arg` as a POSIX shell word, so a recorded command line can be run again as printed.
fn shell_quoted(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./,=:+@%".contains(&b));
    if plain {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(offered: f64, delivery_pct: f64, per_cpu: f64, passed: bool) -> Step {
        Step {
            offered_per_s: offered,
            expected: 100,
            delivered: 100,
            delivered_per_s: offered,
            delivery_pct,
            out_of_order: 0,
            refused: 0,
            p50_ms: 1.0,
            p99_ms: 1.0,
            p999_ms: 1.0,
            max_ms: 1.0,
            // Consistent with `per_cpu`, as pooled ratios add CPU-seconds up.
            server_cpu_s: if per_cpu > 0.0 { 100.0 / per_cpu } else { 1.0 },
            server_cpu_pct: 20.0,
            delivered_per_cpu_s: per_cpu,
            server_rss_mib: 10.0,
            generator_cpu_pct: 50.0,
            release_lag_p99_ms: 1.0,
            generator_bound: false,
            passed,
        }
    }

    fn outcome(system: System, steps: Vec<Step>) -> Outcome {
        Outcome {
            steps,
            ..Outcome::new(system, Scenario::Fanout1000, false)
        }
    }

    #[test]
    fn backend_publishes_are_compared_with_client_publishes_per_cpu_second() {
        let mut r = Results::new("0", 1.0, 5.0, 1.0, 10.0, false, &[false]);
        let line = |r: &Results| {
            r.targets
                .iter()
                .find(|t| t.target.starts_with("backend API"))
                .cloned()
        };
        r.push(Outcome {
            steps: vec![step(1e5, 100.0, 400.0, true), step(2e5, 100.0, 800.0, true)],
            ..Outcome::new(System::Relaymesh, Scenario::Fanout10, false)
        });
        assert!(line(&r).is_none(), "no line without a backend run");
        r.push(Outcome {
            steps: vec![step(1e5, 100.0, 200.0, true), step(2e5, 90.0, 900.0, false)],
            ..Outcome::new(System::Relaymesh, Scenario::Backend, false)
        });
        let t = line(&r).expect("the comparison is listed");
        assert_eq!(t.result, "info");
        assert!(t.measured.contains("0.25 ×"), "{}", t.measured);
        r.push(Outcome::skipped(
            System::Nats,
            Scenario::Backend,
            false,
            "relaymesh only",
        ));
        assert!(
            r.markdown()
                .contains("| backend | nats | n/a: relaymesh only |")
        );
    }

    #[test]
    fn tls_runs_are_compared_with_plain_and_with_nats_over_tls() {
        let mut r = Results::new("0", 1.0, 5.0, 1.0, 10.0, false, &[false, true]);
        let tls_outcome = |system, tls, steps| Outcome {
            steps,
            ..Outcome::new(system, Scenario::Fanout10, tls)
        };
        let mut bound = step(4e5, 100.0, 9000.0, true);
        bound.generator_bound = true;
        r.push(tls_outcome(
            System::Relaymesh,
            false,
            vec![
                step(1e5, 100.0, 1000.0, true),
                step(2e5, 100.0, 2000.0, true),
            ],
        ));
        r.push(tls_outcome(
            System::Relaymesh,
            true,
            vec![
                step(1e5, 100.0, 700.0, true),
                step(2e5, 100.0, 1600.0, true),
                bound,
            ],
        ));
        r.push(tls_outcome(
            System::Nats,
            false,
            vec![step(1e5, 100.0, 500.0, true), step(2e5, 100.0, 900.0, true)],
        ));
        r.push(tls_outcome(
            System::Nats,
            true,
            vec![step(1e5, 100.0, 400.0, true), step(2e5, 100.0, 800.0, true)],
        ));
        let find = |prefix: &str| {
            r.targets
                .iter()
                .find(|t| t.target.starts_with(prefix))
                .cloned()
                .unwrap_or_else(|| panic!("no target {prefix}: {:?}", r.targets))
        };
        let cost = find("fanout10: relaymesh over TLS keeps");
        assert!(cost.measured.starts_with("0.80× at 200.0 k"), "{cost:?}");
        assert_eq!(cost.result, "pass");
        let nats = find("fanout10: NATS over TLS against plain");
        assert!(nats.measured.starts_with("0.89×"), "{nats:?}");
        assert_eq!(nats.result, "info");
        let versus = find("fanout10: relaymesh over TLS delivers more");
        assert!(versus.measured.starts_with("2.00×"), "{versus:?}");
        assert_eq!(versus.result, "pass");
        // The plain-only targets are the plain runs' and say nothing about TLS.
        let plain = find("fanout10: delivered per server CPU-s ≥ 1.2 × nats");
        assert!(plain.measured.starts_with("2.22×"), "{plain:?}");
        let md = r.markdown();
        assert!(md.contains("### fanout10 — relaymesh (TLS)"), "{md}");
        assert!(md.contains("| fanout10 | nats (TLS) |"), "{md}");
        let json = serde_json::to_value(&r).expect("JSON");
        assert_eq!(json["tls"], serde_json::json!(["off", "on"]));
        assert_eq!(json["outcomes"][1]["tls"], true);
    }

    #[test]
    fn history_is_compared_with_its_absence_repetition_by_repetition() {
        let mut r =
            Results::new("0", 1.0, 5.0, 1.0, 10.0, false, &[false]).with_history(&[false, true]);
        let run = |history, repeat, steps| Outcome {
            steps,
            history,
            repeat,
            ..Outcome::new(System::Relaymesh, Scenario::Fanout10, false)
        };
        let mut bound = step(4e5, 100.0, 9000.0, true);
        bound.generator_bound = true;
        r.push(run(
            false,
            0,
            vec![
                step(1e5, 100.0, 1000.0, true),
                step(2e5, 100.0, 2000.0, true),
            ],
        ));
        r.push(run(
            true,
            0,
            vec![
                step(1e5, 100.0, 900.0, true),
                step(2e5, 100.0, 1800.0, true),
            ],
        ));
        r.push(run(
            false,
            1,
            vec![
                step(1e5, 100.0, 1000.0, true),
                step(2e5, 100.0, 2000.0, true),
                bound,
            ],
        ));
        // Latency failed, everything delivered: still compared.
        r.push(run(
            true,
            1,
            vec![
                step(1e5, 100.0, 700.0, false),
                step(2e5, 100.0, 1400.0, false),
            ],
        ));
        assert_eq!(r.history_pairs.len(), 4, "{:?}", r.history_pairs);
        let target = r
            .targets
            .iter()
            .find(|t| {
                t.target
                    .starts_with("fanout10: relaymesh with history keeps")
            })
            .expect("the history target");
        // At 200 k, pooled: 200 deliveries over 100/1800 + 100/1400 CPU-s (1575 per CPU-s)
        // against 2000 per CPU-s.
        assert!(
            target.measured.starts_with(
                "0.79× at 200.0 k offered (pooled over 2 repetitions; per repetition 0.70–0.90)"
            ),
            "{target:?}"
        );
        assert_eq!(target.result, "FAIL");
        // The targets that do not name history are the runs without it.
        let md = r.markdown();
        assert!(
            md.contains("## relaymesh with history against without"),
            "{md}"
        );
        assert!(md.contains("### fanout10 — relaymesh (history) #2"), "{md}");
    }

    #[test]
    fn recorded_arguments_are_quoted_for_the_shell() {
        assert_eq!(shell_quoted("--server-cpu"), "--server-cpu");
        assert_eq!(shell_quoted("0,1"), "0,1");
        assert_eq!(shell_quoted(""), "''");
        assert_eq!(shell_quoted("it's"), r"'it'\''s'");
    }

    #[test]
    fn cpu_ratios_compare_the_highest_rate_both_delivered_in_full() {
        let mut r = Results::new("0", 1.0, 5.0, 1.0, 10.0, false, &[false]);
        r.push(outcome(
            System::Relaymesh,
            vec![
                step(1e5, 100.0, 300.0, true),
                step(2e5, 100.0, 500.0, true),
                step(4e5, 99.0, 900.0, false),
            ],
        ));
        // The peer was too slow to pass (latency) but delivered everything at 2e5.
        r.push(outcome(
            System::Nats,
            vec![
                step(1e5, 100.0, 100.0, false),
                step(2e5, 100.0, 200.0, false),
                step(4e5, 50.0, 400.0, false),
            ],
        ));
        let (ratio, a, b) = r
            .cpu_ratio(Scenario::Fanout1000, System::Relaymesh, System::Nats)
            .expect("a common step");
        assert_eq!((a.offered_per_s, b.offered_per_s), (2e5, 2e5));
        assert!((ratio - 2.5).abs() < 1e-9);
        let target = r
            .targets
            .iter()
            .find(|t| t.target.starts_with("fanout1000") && t.target.ends_with("nats"))
            .expect("the target is evaluated");
        assert_eq!(target.result, "pass");
        assert!(
            r.cpu_ratio(Scenario::Fanout10, System::Relaymesh, System::Nats)
                .is_none()
        );
        assert!(r.markdown().contains("Command: `"));
    }
}
