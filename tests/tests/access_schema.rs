//! The access log's schema (docs/access-log.schema.json) is what every
//! e2e test checks its agent's lines against (`Agent`'s drop): here, that
//! it refuses what breaks it.
use interlock_e2e::check_access_line;

const CONNECTION: &str = r#"{"event":"connection","time":"2026-11-30T20:04:54.518Z","session_id":"01M8Q0YX3J8HHKMZ7XRV86AN97","client":"127.0.0.1:49128","orig_dst":"127.0.0.92:5432","target":"db","workload":{"pid":13944,"uid":0,"user":"root","gid":0,"groups":["root"],"cgroup":"/ci.slice","unit":null,"container":null,"comm":"psql","exe":"/usr/bin/psql","exe_sha256":null,"cmdline":["psql"],"parents":[{"pid":1,"exe":null}],"job":null,"live":true},"decision":"allow","enforced":true,"rule":"r","reason":"rule \"r\" allows this workload on target \"db\"","outcome":"closed","error":null,"statements":{"allowed":1,"denied":0},"bytes_up":10,"bytes_down":20,"duration_ms":1.5}"#;

#[test]
fn the_schema_takes_a_connection_line_and_refuses_broken_ones() {
    check_access_line(CONNECTION).unwrap();
    for (broken, why) in [
        (
            CONNECTION.replace(r#""session_id":"01M8Q0YX3J8HHKMZ7XRV86AN97","#, ""),
            "no session_id",
        ),
        (
            CONNECTION.replace(r#""outcome":"closed""#, r#""outcome":"fine""#),
            "an unknown outcome",
        ),
        (
            CONNECTION.replace(r#""bytes_up":10"#, r#""bytes_up":-1"#),
            "negative bytes",
        ),
        (
            CONNECTION.replace("2026-11-30T20:04:54.518Z", "yesterday"),
            "a time that is not RFC 3339",
        ),
        (
            CONNECTION.replace(r#""event":"connection""#, r#""event":"conection""#),
            "an unknown event",
        ),
        (
            CONNECTION.replace(
                r#""session_id":"01M8Q0YX3J8HHKMZ7XRV86AN97""#,
                r#""session":"01M8Q0YX3J8HHKMZ7XRV86AN97""#,
            ),
            "session for session_id",
        ),
    ] {
        assert!(
            check_access_line(&broken).is_err(),
            "{why} passed: {broken}"
        );
    }
}
