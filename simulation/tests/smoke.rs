//! The README's first command must keep working: a short run against an embedded cluster
//! delivers everything and writes the JSON fields DESIGN.md lists.

#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn a_short_embedded_run_delivers_everything_and_writes_the_report() {
    let json =
        std::env::temp_dir().join(format!("relaymesh-simulation-{}.json", std::process::id()));
    for scenario in ["fanout", "dense"] {
        let output = Command::new(env!("CARGO_BIN_EXE_simulation"))
            .args([
                "--scenario",
                scenario,
                "--clients",
                "12",
                "--rate",
                "50",
                "--duration",
                "1",
            ])
            .arg("--json")
            .arg(&json)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("lost              0"), "{stdout}");
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        for field in [
            "scenario",
            "published",
            "expected",
            "delivered",
            "lost",
            "duplicates",
            "out_of_order",
            "delivered_per_s",
            "latency_us",
            "connect_ms",
            "clients_per_server",
            "cross_server_delivered",
        ] {
            assert!(!report[field].is_null(), "{field} missing: {report}");
        }
        for q in ["p50", "p90", "p99", "max"] {
            assert!(report["latency_us"][q].is_u64(), "latency_us.{q}: {report}");
        }
        assert_eq!(report["scenario"], scenario);
        assert!(report["published"].as_u64().unwrap() > 0);
        assert_eq!(report["delivered"], report["expected"]);
        assert_eq!(
            (
                report["lost"].as_u64(),
                report["duplicates"].as_u64(),
                report["out_of_order"].as_u64()
            ),
            (Some(0), Some(0), Some(0))
        );
        assert_eq!(
            report["clients_per_server"]
                .as_object()
                .unwrap()
                .values()
                .map(|n| n.as_u64().unwrap())
                .sum::<u64>(),
            12
        );
    }
    std::fs::remove_file(&json).unwrap();
}
