//! The quick start (`interlock demo`) tells its story on stdout, with the
//! agent's own log and access log kept in a file: TCP allowed and denied,
//! PostgreSQL with a masked column and a refused DELETE (the table intact
//! afterwards), and the session replayed from its record.
use interlock_e2e::*;

#[test]
fn the_demo_shows_tcp_and_postgres_with_logs_kept_out_of_its_output() {
    require_root();
    let out = std::process::Command::new(interlock_bin())
        .arg("demo")
        .output()
        .unwrap();
    let shown = stdout(&out);
    assert!(out.status.success(), "{shown}{}", stderr(&out));
    for expected in [
        "hello from demo-api",
        "Connection reset by peer",
        "| ****.com",
        "(3 rows)",
        "statement denied: no rule allows delete on public.customers",
        "(the server, asked directly: 3 customers, none deleted)",
        "#1 ok, 3 rows, 3 masked",
        "#2 DELETE FROM customers [deny]",
        "PostgreSQL cluster are removed",
    ] {
        assert!(shown.contains(expected), "no {expected:?} in:\n{shown}");
    }
    assert!(
        !shown.contains("ada@example.com"),
        "an unmasked email:\n{shown}"
    );
    // No log line in the story: neither an access line nor the agent's log.
    for line in shown.lines() {
        assert!(
            !line.starts_with('{') && !line.contains(" INFO ") && !line.contains(" WARN "),
            "a log line in the demo's output: {line}"
        );
    }
    let log = std::fs::read_to_string(std::env::temp_dir().join("interlock-demo.log")).unwrap();
    let access: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            check_access_line(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            serde_json::from_str(l).unwrap()
        })
        .collect();
    for target in ["demo-api", "demo-secrets", "demo-db"] {
        assert!(
            access.iter().any(|a| a["target"] == target),
            "no access line for {target} in the log:\n{log}"
        );
    }
}
