//! `/metrics` (`[agent] metrics_listen`) says what the agent did: after
//! real psql traffic (allowed and denied statements, a refused
//! connection), each connection and decision counter equals what the
//! access log and the session records say happened, and the gauges read
//! the agent's state (programs attached, protected entries, store).
use std::collections::HashMap;

use interlock_e2e::*;
use serde_json::Value;

const PG_IP: &str = "127.0.0.96";

fn scrape_text(port: u16) -> String {
    let out = std::process::Command::new("curl")
        .args(["-sf", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .unwrap();
    assert!(out.status.success(), "scrape failed: {}", stderr(&out));
    let text = stdout(&out);
    assert!(text.ends_with("# EOF\n"), "{text}");
    text
}

/// `name{labels} value` lines of a scrape, by `name{labels}`.
fn scrape(port: u16) -> HashMap<String, f64> {
    scrape_text(port)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

#[test]
fn metrics_count_what_the_records_say_happened() {
    let pg = Postgres::start("metrics", PG_IP);
    pg.admin_sql(
        "postgres",
        "CREATE ROLE app LOGIN PASSWORD 'metrics-secret'; CREATE TABLE t (n int); GRANT SELECT, DELETE ON t TO app;",
    );
    let secret = pg.password_file("metrics-secret");
    let cgroup = TestCgroup::new("metrics");
    let port = free_port();
    let policy = format!(
        r#"
[[target]]
name = "db"
protocol = "postgres"
address = "{addr}"
tls = "disable"
[target.credential]
user = "app"
password_file = {secret:?}

[[workload]]
name = "root"
uid = 0

[[rule]]
name = "reads"
workloads = ["root"]
targets = ["db"]
decision = "allow"
statements = ["select"]
"#,
        addr = pg.addr,
    );
    let agent = Agent::start_with(
        &cgroup,
        "metrics",
        &format!("metrics_listen = \"127.0.0.1:{port}\""),
        &policy,
    );
    let psql = |sql: &str| {
        cgroup.sh(&format!(
            "psql -X -w -q -t -A -h {} -p {} -U x -d postgres -c '{sql}'",
            pg.addr.ip(),
            pg.addr.port()
        ))
    };
    assert!(psql("SELECT count(*) FROM t").status.success());
    assert!(psql("SELECT 1").status.success());
    assert!(!psql("DELETE FROM t").status.success());
    // Another user: no rule admits it.
    let refused = cgroup.sh(&format!(
        "setpriv --reuid=65534 --regid=65534 --clear-groups psql -X -w -q -h {} -p {} -U x -d postgres -c 'SELECT 1'",
        pg.addr.ip(),
        pg.addr.port()
    ));
    assert!(!refused.status.success());
    agent.wait_access_lines(4);

    // Counters: as many connections, by decision and outcome, as access
    // lines; as many decisions as the sessions recorded. (Lines reach
    // stdout through a writer thread: compared until they agree.)
    let compare = || -> Result<HashMap<String, f64>, String> {
        let metrics = scrape(port);
        let value = |series: &str| metrics.get(series).copied().unwrap_or(0.0);
        let lines = agent.access_lines();
        let mut by_labels: HashMap<(String, String), f64> = HashMap::new();
        for line in &lines {
            let decision = line["decision"].as_str().unwrap_or("-").to_owned();
            let outcome = line["outcome"].as_str().unwrap().to_owned();
            *by_labels.entry((decision, outcome)).or_default() += 1.0;
        }
        if !by_labels.contains_key(&("deny".into(), "denied".into())) {
            return Err(format!("no denied connection yet: {lines:?}"));
        }
        let counted: f64 = metrics
            .iter()
            .filter(|(k, _)| k.starts_with("interlock_connections_total{"))
            .map(|(_, v)| v)
            .sum();
        if counted != lines.len() as f64 {
            return Err(format!(
                "{counted} connections counted, {} lines",
                lines.len()
            ));
        }
        for ((decision, outcome), count) in &by_labels {
            let series = format!(
                "interlock_connections_total{{target=\"db\",protocol=\"postgres\",decision=\"{decision}\",outcome=\"{outcome}\"}}"
            );
            if value(&series) != *count {
                return Err(format!("{series} = {} for {count} lines", value(&series)));
            }
        }
        let statements: Vec<Value> = agent
            .session_events()
            .into_iter()
            .filter(|e| e["kind"] == "statement")
            .collect();
        for decision in ["allow", "deny"] {
            let recorded = statements
                .iter()
                .filter(|s| s["decision"] == decision)
                .count();
            let series = format!(
                "interlock_decisions_total{{target=\"db\",kind=\"statement\",decision=\"{decision}\"}}"
            );
            if recorded == 0 || value(&series) != recorded as f64 {
                return Err(format!(
                    "{series} = {} for {recorded} recorded",
                    value(&series)
                ));
            }
        }
        Ok(metrics)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let metrics = loop {
        match compare() {
            Ok(metrics) => break metrics,
            Err(why) if std::time::Instant::now() > deadline => panic!("{why}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(200)),
        }
    };
    let value = |series: &str| metrics.get(series).copied().unwrap_or(0.0);

    // Gauges: the agent's state now.
    assert_eq!(value("interlock_kernel_programs_attached"), 5.0);
    assert_eq!(value("interlock_kernel_protected_entries"), 1.0);
    // Every redirected connect of the traffic was taken by the agent.
    assert_eq!(
        metrics.get("interlock_kernel_pending_redirects"),
        Some(&0.0),
        "{metrics:?}"
    );
    assert_eq!(value("interlock_store_admitting"), 1.0);
    assert!(value("interlock_store_max_bytes") > 0.0);
    assert_eq!(value("interlock_approvals_pending"), 0.0);
    assert_eq!(value("interlock_ci_job_capture"), 1.0);
    assert!(value("interlock_store_flush_seconds_count") > 0.0);
    assert!(
        metrics
            .keys()
            .any(|k| k.starts_with("interlock_build_info{version=")),
        "{metrics:?}"
    );
    // The dashboard and the alert rules in contrib/ query only metrics the
    // agent exports (by family, as `# TYPE` names them).
    let families: Vec<(String, String)> = scrape_text(port)
        .lines()
        .filter_map(|l| {
            let mut words = l.strip_prefix("# TYPE ")?.split(' ');
            Some((words.next()?.to_owned(), words.next()?.to_owned()))
        })
        .collect();
    let exported = |name: &str| {
        families.iter().any(|(family, kind)| {
            let suffixes: &[&str] = match kind.as_str() {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_count", "_sum"],
                _ => &[""],
            };
            suffixes.iter().any(|s| format!("{family}{s}") == name)
        })
    };
    for file in [
        "contrib/grafana/interlock.json",
        "contrib/prometheus/interlock-alerts.yml",
    ] {
        let text =
            std::fs::read_to_string(format!("{}/../{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let mut rest = text.as_str();
        let mut seen = 0;
        while let Some(at) = rest.find("interlock_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            seen += 1;
            assert!(
                exported(&name),
                "{file} queries {name}, which the agent does not export"
            );
        }
        assert!(seen > 3, "{file} queries no metrics?");
    }

    // Bounded labels only: no pid, executable, SQL or path in any series.
    for series in metrics.keys() {
        assert!(
            !series.contains("pid") && !series.contains('/') && !series.contains("SELECT"),
            "{series}"
        );
    }
}
