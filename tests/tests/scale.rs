//! Many connections at once, each with exactly one access line.
use interlock_e2e::*;

#[test]
fn a_thousand_concurrent_connections_complete_with_a_thousand_access_lines() {
    const CONNECTIONS: usize = 1000;
    let server = Server::echo("127.0.0.7:0");
    let cgroup = TestCgroup::new("scale");
    let agent = Agent::start(
        &cgroup,
        "scale",
        &format!(
            "[[target]]\nname = \"echo\"\nprotocol = \"tcp\"\naddress = \"{}\"\n[[rule]]\nname = \"r\"\nworkloads = [\"*\"]\ntargets = [\"echo\"]\ndecision = \"allow\"\n",
            server.addr
        ),
    );
    // All connections are opened before any is closed: each sends 64 bytes,
    // half-closes, and expects its bytes back from the echo server.
    let script = format!(
        r#"
import asyncio
async def one(i, opened, go):
    r, w = await asyncio.open_connection("127.0.0.7", {port})
    opened.append(i)
    await go.wait()
    payload = (b"%063d\n" % i)
    w.write(payload)
    await w.drain()
    w.write_eof()
    data = await r.read()
    w.close()
    return data == payload
async def main():
    opened, go = [], asyncio.Event()
    tasks = [asyncio.create_task(one(i, opened, go)) for i in range({n})]
    while len(opened) < {n}:
        if any(t.done() for t in tasks):
            break
        await asyncio.sleep(0.01)
    print("concurrent", len(opened))
    go.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    print("ok", sum(1 for r in results if r is True))
asyncio.run(main())
"#,
        port = server.addr.port(),
        n = CONNECTIONS,
    );
    let started = std::time::Instant::now();
    let out = cgroup.sh(&format!(
        "ulimit -n 8192; exec /usr/bin/python3 -c '{script}'"
    ));
    assert!(
        out.status.success(),
        "{}\nagent:\n{}",
        stderr(&out),
        agent.stderr()
    );
    assert_eq!(
        stdout(&out),
        format!("concurrent {CONNECTIONS}\nok {CONNECTIONS}\n"),
        "{}",
        stderr(&out)
    );

    let lines = agent.wait_access_lines(CONNECTIONS);
    assert_eq!(lines.len(), CONNECTIONS);
    // Measured, not asserted: how long connections lived in the agent.
    let mut durations: Vec<f64> = lines
        .iter()
        .map(|l| l["duration_ms"].as_f64().unwrap())
        .collect();
    durations.sort_by(f64::total_cmp);
    eprintln!(
        "{CONNECTIONS} concurrent connections in {:?}; in-agent duration p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        started.elapsed(),
        durations[CONNECTIONS / 2],
        durations[CONNECTIONS * 99 / 100],
        durations[CONNECTIONS - 1]
    );
    assert!(
        lines
            .iter()
            .all(|l| l["outcome"] == "closed" && l["bytes_up"] == 64 && l["bytes_down"] == 64),
        "every connection closed cleanly with 64 bytes each way"
    );
    let mut sessions: Vec<&str> = lines
        .iter()
        .map(|l| l["session_id"].as_str().unwrap())
        .collect();
    sessions.sort();
    sessions.dedup();
    assert_eq!(sessions.len(), CONNECTIONS, "one line per session");
    assert_eq!(server.connections(), CONNECTIONS);
}
