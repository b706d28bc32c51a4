//! `cargo xtask bench sessions`: the session store on its own (release
//! build, `interlock bench-store`): events per second with the
//! flush-before-forward rule on, for one session and for 64 at once,
//! against the same appends without waiting for the flush; the added
//! latency per statement (p50/p99); then shipping to a real Garage.
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use interlock_e2e::Garage;
use serde_json::Value;

pub fn run(statements: usize, ship_sessions: usize) -> Result<()> {
    crate::bench::prepare()?;
    let binary = crate::workspace_root().join("target/release/interlock");
    let garage = Garage::start("bench");
    let credentials = garage.credentials_file();
    let run = |sessions: usize, per_session: usize, wait: bool, ship: bool| -> Result<Vec<Value>> {
        let dir =
            std::env::temp_dir().join(format!("interlock-bench-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut cmd = Command::new(&binary);
        cmd.arg("bench-store")
            .arg("--dir")
            .arg(&dir)
            .args(["--sessions", &sessions.to_string()])
            .args(["--statements", &per_session.to_string()]);
        if !wait {
            cmd.arg("--no-wait");
        }
        if ship {
            cmd.args([
                "--ship",
                "s3://sessions/bench",
                "--endpoint",
                &garage.endpoint,
            ])
            .args(["--region", "garage", "--credentials-file"])
            .arg(&credentials);
        }
        let out = cmd.output().context("running interlock bench-store")?;
        let _ = std::fs::remove_dir_all(&dir);
        if !out.status.success() {
            bail!("bench-store: {}", String::from_utf8_lossy(&out.stderr));
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| Ok(serde_json::from_str(l)?))
            .collect()
    };

    let mut rows = Vec::new();
    for sessions in [1, 64] {
        let per_session = statements / sessions;
        eprintln!("measuring {sessions} session(s)...");
        let on = run(sessions, per_session, true, false)?.remove(0);
        let off = run(sessions, per_session, false, false)?.remove(0);
        rows.push((sessions, on, off));
    }
    eprintln!("measuring shipping...");
    let shipped = run(ship_sessions, 20, false, true)?;
    let ship = &shipped[1];

    println!(
        "\nInterlock session store ({} cores; sled, group commit; {statements} statements per row)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<34} {:>14} {:>14} {:>8} {:>12} {:>12}",
        "scenario", "flush-wait", "no wait", "ratio", "p50 added", "p99 added"
    );
    for (sessions, on, off) in &rows {
        let (a, b) = (
            on["events_per_s"].as_f64().unwrap(),
            off["events_per_s"].as_f64().unwrap(),
        );
        println!(
            "{:<34} {:>14.0} {:>14.0} {:>8.2} {:>10.0}µs {:>10.0}µs",
            format!("{sessions} session(s): events/s"),
            a,
            b,
            a / b,
            on["p50_us"].as_f64().unwrap() - off["p50_us"].as_f64().unwrap(),
            on["p99_us"].as_f64().unwrap() - off["p99_us"].as_f64().unwrap(),
        );
    }
    println!(
        "shipping {} sessions of 43 events to Garage (zstd, 4 uploads at once): {:.0} sessions/s, {:.2} MB/s compressed, {:.1} s",
        ship["sessions"],
        ship["sessions_per_s"].as_f64().unwrap(),
        ship["mb_per_s"].as_f64().unwrap(),
        ship["seconds"].as_f64().unwrap()
    );
    println!(
        "(flush-wait: each statement waits for the flush that covers it, as before it goes upstream; no wait: the same appends, flushed in the background)"
    );
    Ok(())
}
