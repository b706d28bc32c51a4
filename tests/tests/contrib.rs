//! The alert rules in contrib/ load in Prometheus's own checker, and their
//! unit tests (series in, alerts out) pass. (`tests/metrics.rs` checks
//! that they and the Grafana dashboard query only exported metrics.)
use std::process::Command;

use interlock_e2e::*;

#[test]
fn alert_rules_load_and_fire_as_their_tests_say() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/prometheus");
    let promtool = Command::new("promtool").arg("--version").output();
    if promtool.is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is missing (Debian's prometheus package; `cargo xtask setup` installs it)"
        );
        eprintln!("skipped: promtool is missing");
        return;
    }
    for args in [
        ["check", "rules", "interlock-alerts.yml"],
        ["test", "rules", "interlock-alerts.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            stdout(&out),
            stderr(&out)
        );
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{dir}/../grafana/interlock.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() > 5));
}
