//! Reading recorded sessions: summaries, `show`, `replay` and `export`,
//! from a session's lines wherever they came from (the agent, its store, a
//! pulled directory, a bucket). Events are read as JSON values, so a log
//! written by a newer agent still shows.
use std::{
    io::{self, Write},
    time::Duration,
};

use base64::Engine as _;
use serde_json::{Value, json};

use super::store::Summary;

/// One session's lines: events, then the seal (once ended).
pub struct SessionLog {
    pub lines: Vec<Vec<u8>>,
}

impl SessionLog {
    /// From JSONL text.
    pub fn parse(text: &[u8]) -> Self {
        Self {
            lines: text
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(<[u8]>::to_vec)
                .collect(),
        }
    }

    pub fn events(&self) -> impl Iterator<Item = Value> + '_ {
        self.lines
            .iter()
            .filter_map(|line| serde_json::from_slice::<Value>(line).ok())
            .filter(|event| event["kind"] != "seal")
    }

    pub fn verify(
        &self,
        trusted_key: Option<&str>,
    ) -> Result<super::format::Verified, super::format::VerifyError> {
        super::format::verify(self.lines.iter().map(Vec::as_slice), trusted_key)
    }

    /// The listing row, rebuilt from the events.
    pub fn summary(&self) -> Summary {
        let mut summary = Summary {
            outcome: "live".into(),
            ..Summary::default()
        };
        for event in self.events() {
            summary.events += 1;
            let time = event["time_us"].as_u64().unwrap_or(0);
            match event["kind"].as_str().unwrap_or("") {
                "session_start" => {
                    let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
                    summary.id = text(&event["session_id"]);
                    summary.host = text(&event["host"]);
                    summary.protocol = text(&event["protocol"]);
                    summary.target = text(&event["target"]);
                    summary.orig_dst = text(&event["orig_dst"]);
                    summary.start_us = time;
                    let workload = &event["workload"];
                    summary.uid = workload["uid"].as_u64().unwrap_or(0) as u32;
                    summary.pid = workload["pid"].as_u64().unwrap_or(0) as u32;
                    summary.user = workload["user"].as_str().map(str::to_owned);
                    summary.unit = workload["unit"].as_str().map(str::to_owned);
                    summary.exe = workload["exe"].as_str().map(str::to_owned);
                    summary.job = serde_json::from_value(workload["job"].clone()).ok();
                    summary.workloads = event["workloads"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|w| w.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default();
                }
                "connection" => {
                    summary.decision = event["decision"].as_str().unwrap_or("").to_owned();
                    summary.rule = event["rule"].as_str().map(str::to_owned);
                }
                "session_end" => {
                    summary.outcome = event["outcome"].as_str().unwrap_or("").to_owned();
                    summary.end_us = Some(time);
                    summary.statements = event["statements"].as_u64().unwrap_or(0);
                    summary.denied = event["denied"].as_u64().unwrap_or(0);
                }
                _ => {}
            }
        }
        summary.bytes = self.lines.iter().map(|l| l.len() as u64 + 1).sum();
        summary
    }
}

/// `sessions list` filters.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Filter {
    /// Sessions started at or after (unix ms).
    pub since_ms: u64,
    /// A policy workload name, user, unit or executable path.
    pub workload: Option<String>,
    pub target: Option<String>,
    /// `denied`: the connection or any statement was denied; `allowed`:
    /// nothing was.
    pub decision: Option<String>,
    /// Globs on the CI job's project and ref.
    #[serde(default)]
    pub ci_project: Option<String>,
    #[serde(default)]
    pub ci_ref: Option<String>,
}

impl Filter {
    pub fn matches(&self, summary: &Summary) -> bool {
        if summary.start_us / 1000 < self.since_ms {
            return false;
        }
        if let Some(workload) = &self.workload {
            let hit = summary.workloads.iter().any(|w| w == workload)
                || summary.user.as_deref() == Some(workload)
                || summary.unit.as_deref() == Some(workload)
                || summary.exe.as_deref() == Some(workload);
            if !hit {
                return false;
            }
        }
        if let Some(target) = &self.target
            && &summary.target != target
        {
            return false;
        }
        let job = summary.job.as_ref();
        for (glob, value) in [
            (&self.ci_project, job.and_then(|j| j.project.as_deref())),
            (&self.ci_ref, job.and_then(|j| j.git_ref.as_deref())),
        ] {
            if let Some(glob) = glob
                && !crate::policy::Pattern::new(glob)
                    .is_ok_and(|p| value.is_some_and(|v| p.matches(v)))
            {
                return false;
            }
        }
        let denied = summary.decision == "deny" || summary.denied > 0;
        match self.decision.as_deref() {
            Some("denied" | "deny") => denied,
            Some("allowed" | "allow") => !denied,
            _ => true,
        }
    }
}

fn time_text(us: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_micros(us)).to_string()
}

pub fn print_list(summaries: &[Summary], json: bool, out: &mut impl Write) -> io::Result<()> {
    if json {
        for summary in summaries {
            serde_json::to_writer(&mut *out, summary)?;
            out.write_all(b"\n")?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<26}  {:<24}  {:<12}  {:<16}  {:<20}  {:>5}  {:>6}  OUTCOME",
        "SESSION", "STARTED", "HOST", "TARGET", "WORKLOAD", "STMTS", "DENIED"
    )?;
    for s in summaries {
        let mut who = s
            .workloads
            .first()
            .cloned()
            .or_else(|| s.user.clone())
            .unwrap_or_else(|| format!("uid {}", s.uid));
        if let Some(job) = &s.job {
            who.push_str(&format!(
                " ({}@{})",
                job.project.as_deref().unwrap_or("?"),
                job.git_ref.as_deref().unwrap_or("?")
            ));
        }
        let outcome = if s.decision == "deny" {
            "denied".to_owned()
        } else {
            s.outcome.clone()
        };
        writeln!(
            out,
            "{:<26}  {:<24}  {:<12}  {:<16}  {:<20}  {:>5}  {:>6}  {}",
            s.id,
            time_text(s.start_us),
            s.host,
            s.target,
            who,
            s.statements,
            s.denied,
            outcome
        )?;
    }
    Ok(())
}

/// `sessions show`: the metadata, then every event.
pub fn show(log: &SessionLog, json: bool, out: &mut impl Write) -> io::Result<()> {
    if json {
        let events: Vec<Value> = log.events().collect();
        let seal = log
            .lines
            .last()
            .and_then(|l| serde_json::from_slice::<Value>(l).ok())
            .filter(|v| v["kind"] == "seal");
        serde_json::to_writer_pretty(
            &mut *out,
            &json!({"summary": log.summary(), "events": events, "seal": seal}),
        )?;
        return writeln!(out);
    }
    let summary = log.summary();
    writeln!(out, "session   {}", summary.id)?;
    writeln!(out, "host      {}", summary.host)?;
    writeln!(out, "protocol  {}", summary.protocol)?;
    writeln!(out, "target    {} ({})", summary.target, summary.orig_dst)?;
    writeln!(
        out,
        "workload  {} (uid {}{}, pid {}, exe {})",
        if summary.workloads.is_empty() {
            "-".into()
        } else {
            summary.workloads.join(", ")
        },
        summary.uid,
        summary
            .user
            .as_deref()
            .map(|u| format!(" {u}"))
            .unwrap_or_default(),
        summary.pid,
        summary.exe.as_deref().unwrap_or("-")
    )?;
    writeln!(out, "started   {}", time_text(summary.start_us))?;
    if let Some(end) = summary.end_us {
        writeln!(out, "ended     {} ({})", time_text(end), summary.outcome)?;
    }
    writeln!(out, "events    {}", summary.events)?;
    writeln!(out)?;
    for event in log.events() {
        writeln!(out, "{}", describe(&event, summary.start_us))?;
    }
    Ok(())
}

/// One event as a transcript line.
pub fn describe(event: &Value, start_us: u64) -> String {
    let at = event["time_us"]
        .as_u64()
        .unwrap_or(start_us)
        .saturating_sub(start_us);
    let seq = event["seq"].as_u64().unwrap_or(0);
    let rule = |e: &Value| {
        e["rule"]
            .as_str()
            .map(|r| format!(" by rule {r:?}"))
            .unwrap_or_default()
    };
    let what = match event["kind"].as_str().unwrap_or("?") {
        "session_start" => format!(
            "start: {} → {} {} ({}){}",
            event["workload"]["exe"].as_str().unwrap_or("?"),
            event["protocol"].as_str().unwrap_or("?"),
            event["target"].as_str().unwrap_or("?"),
            event["orig_dst"].as_str().unwrap_or("?"),
            event["policy_bundle"]["version"]
                .as_str()
                .map(|v| format!(", policy bundle {v}"))
                .unwrap_or_default(),
        ),
        "connection" => format!(
            "connection {}{}{}",
            event["decision"].as_str().unwrap_or("?"),
            rule(event),
            if event["enforced"] == false {
                " (audit mode)"
            } else {
                ""
            }
        ),
        "statement" => format!(
            "#{} {} [{}{}]",
            event["n"],
            event["text"].as_str().unwrap_or(""),
            event["decision"].as_str().unwrap_or("?"),
            rule(event)
        ),
        "result" => result_text(event),
        "approval_requested" => format!(
            "held for approval: request {} by rule {:?}, waiting up to {}s for {}",
            event["id"].as_str().unwrap_or("?"),
            event["rule"].as_str().unwrap_or("?"),
            event["timeout_s"],
            joined(&event["approvers"]),
        ),
        "approval_decided" => decided_text(event),
        "grant_used" => {
            let mut text = format!(
                "let through by grant {} (rule {:?})",
                event["grant"].as_str().unwrap_or("?"),
                event["rule"].as_str().unwrap_or("?")
            );
            if let Some(reason) = event["reason"].as_str() {
                text.push_str(&format!(", asked for {reason:?}"));
            }
            text
        }
        "output" => format!("output {} bytes", output_bytes(event).len()),
        "input" => format!("input {} bytes", output_bytes(event).len()),
        "ssh_login" => format!(
            "ssh user {:?} ({} accepted by the agent)",
            event["user"].as_str().unwrap_or("?"),
            event["method"].as_str().unwrap_or("?")
        ),
        "ssh_request" => format!(
            "{} {}[{}{}]",
            event["request"].as_str().unwrap_or("?"),
            event["command"]
                .as_str()
                .map(|c| format!("{c} "))
                .unwrap_or_default(),
            event["decision"].as_str().unwrap_or("?"),
            rule(event)
        ),
        "http_request" if event["kube"]["is_resource"] == true => {
            let kube = &event["kube"];
            let text = |key: &str| kube[key].as_str().unwrap_or("");
            let resource = ["group", "resource", "subresource"]
                .map(text)
                .into_iter()
                .filter(|part| !part.is_empty())
                .collect::<Vec<_>>()
                .join("/");
            let name = match text("name") {
                "" => String::new(),
                name => format!(" {name}"),
            };
            let namespace = match text("namespace") {
                "" => String::new(),
                namespace => format!(" in {namespace}"),
            };
            format!(
                "#{} {} {resource}{name}{namespace} ({} {}) [{}{}]",
                event["n"],
                text("verb"),
                event["method"].as_str().unwrap_or("?"),
                event["path"].as_str().unwrap_or("?"),
                event["decision"].as_str().unwrap_or("?"),
                rule(event)
            )
        }
        "http_request" => format!(
            "#{} {} {}{} (host {}) [{}{}]",
            event["n"],
            event["method"].as_str().unwrap_or("?"),
            event["path"].as_str().unwrap_or("?"),
            event["query"]
                .as_str()
                .map(|q| format!("?{q}"))
                .unwrap_or_default(),
            event["host"].as_str().unwrap_or("?"),
            event["decision"].as_str().unwrap_or("?"),
            rule(event)
        ),
        "http_response" => format!(
            "#{} {}, {} bytes{} in {:.1} ms{}",
            event["n"],
            event["status"]
                .as_u64()
                .map_or_else(|| "no answer".to_owned(), |s| format!("status {s}")),
            event["bytes"],
            event["masked"]
                .as_u64()
                .filter(|m| *m > 0)
                .map(|m| format!(", {m} values masked"))
                .unwrap_or_default(),
            event["duration_us"].as_f64().unwrap_or(0.0) / 1000.0,
            event["error"]
                .as_str()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default(),
        ),
        "port_forward" => format!(
            "#{} port-forward to port {} (connection {}): {} bytes up, {} bytes down{}",
            event["n"],
            event["port"]
                .as_u64()
                .map_or_else(|| "?".to_owned(), |p| p.to_string()),
            event["request"].as_str().unwrap_or("?"),
            event["up"],
            event["down"],
            event["error"]
                .as_str()
                .map(|e| format!(" ({})", e.trim()))
                .unwrap_or_default(),
        ),
        "terminal" => format!("terminal {}x{}", event["cols"], event["rows"]),
        "exit" => match event["signal"].as_str() {
            Some(signal) => format!("exit by signal {signal}"),
            None => format!("exit status {}", event["status"]),
        },
        "sftp" => sftp_text(event),
        "session_end" => format!(
            "end: {}{}, {} statements ({} denied), {} bytes up, {} bytes down",
            event["outcome"].as_str().unwrap_or("?"),
            event["error"]
                .as_str()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default(),
            event["statements"],
            event["denied"],
            event["bytes_up"],
            event["bytes_down"]
        ),
        other => format!("{other}: {event}"),
    };
    format!("[{:>10.3}s] {:>5}  {what}", at as f64 / 1e6, seq)
}

/// A statement's result: outcome, rows, masked cells, time.
fn result_text(event: &Value) -> String {
    let mut text = format!(
        "#{} {}",
        event["n"],
        event["outcome"].as_str().unwrap_or("?")
    );
    if let Some(rows) = event["rows"].as_u64() {
        text += &format!(", {rows} row{}", if rows == 1 { "" } else { "s" });
    }
    if let Some(masked) = event["cells_masked"].as_u64().filter(|m| *m > 0) {
        text += &format!(", {masked} masked");
    }
    if let Some(us) = event["duration_us"].as_u64() {
        text += &format!(", {:.3} ms", us as f64 / 1000.0);
    }
    text
}

/// An approval request's outcome, who decided and why.
fn decided_text(event: &Value) -> String {
    let by = joined(&event["by"]);
    let mut text = format!(
        "request {} {}",
        event["id"].as_str().unwrap_or("?"),
        event["outcome"].as_str().unwrap_or("?")
    );
    if !by.is_empty() {
        text += &format!(" by {by}");
    }
    if let Some(reason) = event["reason"].as_str() {
        text += &format!(": {reason}");
    }
    if let Some(grant) = event["grant"].as_str() {
        text += &format!(" (grant {grant})");
    }
    text
}

/// An SFTP operation and what it moved.
fn sftp_text(event: &Value) -> String {
    let mut text = format!(
        "sftp {} {}",
        event["op"].as_str().unwrap_or("?"),
        event["path"].as_str().unwrap_or("?")
    );
    if let Some(to) = event["to"].as_str() {
        text += &format!(" → {to}");
    }
    if let (Some(read), Some(written)) = (event["read"].as_u64(), event["written"].as_u64()) {
        text += &format!(" ({read} bytes read, {written} written)");
    }
    text
}

/// The strings of a JSON array, comma-separated.
fn joined(list: &Value) -> String {
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn output_bytes(event: &Value) -> Vec<u8> {
    event["data"]
        .as_str()
        .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok())
        .unwrap_or_default()
}

/// `sessions replay`: the session at its own pace (`speed` times faster,
/// idle gaps cut to `max_idle`; `speed` 0 does not wait). Terminal output
/// is written as it was; a PostgreSQL session is a transcript.
pub fn replay(
    log: &SessionLog,
    speed: f64,
    max_idle: Duration,
    out: &mut impl Write,
) -> io::Result<()> {
    let summary = log.summary();
    let raw_output = summary.protocol != "postgres";
    let mut last = summary.start_us;
    for event in log.events() {
        let at = event["time_us"].as_u64().unwrap_or(last);
        if speed > 0.0 {
            let gap = Duration::from_micros(at.saturating_sub(last)).min(max_idle);
            out.flush()?;
            std::thread::sleep(gap.div_f64(speed));
        }
        last = at;
        if event["kind"] == "output" && raw_output {
            out.write_all(&output_bytes(&event))?;
        } else if event["kind"] == "input" {
            // The terminal's echo is in the output already.
        } else {
            writeln!(out, "{}", describe(&event, summary.start_us))?;
        }
    }
    out.flush()
}

/// `sessions export --format jsonl`: the lines as recorded (verifiable).
pub fn export_jsonl(log: &SessionLog, out: &mut impl Write) -> io::Result<()> {
    for line in &log.lines {
        out.write_all(line)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// `sessions export --format asciicast`: asciicast v2 (asciinema). The
/// terminal output as it was; for a PostgreSQL session, its transcript.
pub fn export_asciicast(log: &SessionLog, out: &mut impl Write) -> io::Result<()> {
    let summary = log.summary();
    // The terminal's size as the client first gave it.
    let size = log.events().find(|e| e["kind"] == "terminal");
    let dimension = |field: &str, default: u64| {
        size.as_ref()
            .and_then(|e| e[field].as_u64())
            .unwrap_or(default)
    };
    let header = json!({
        "version": 2,
        "width": dimension("cols", 120),
        "height": dimension("rows", 40),
        "timestamp": summary.start_us / 1_000_000,
        "title": format!("interlock session {} ({} → {})", summary.id, summary.exe.as_deref().unwrap_or("?"), summary.target),
        "env": {"TERM": "xterm-256color", "SHELL": "/bin/sh"},
    });
    serde_json::to_writer(&mut *out, &header)?;
    out.write_all(b"\n")?;
    let raw_output = summary.protocol != "postgres";
    for event in log.events() {
        let at = event["time_us"]
            .as_u64()
            .unwrap_or(summary.start_us)
            .saturating_sub(summary.start_us) as f64
            / 1e6;
        let text = if event["kind"] == "output" && raw_output {
            String::from_utf8_lossy(&output_bytes(&event)).into_owned()
        } else if event["kind"] == "input" {
            let typed = String::from_utf8_lossy(&output_bytes(&event)).into_owned();
            serde_json::to_writer(&mut *out, &json!([at, "i", typed]))?;
            out.write_all(b"\n")?;
            continue;
        } else if event["kind"] == "output" {
            continue;
        } else {
            format!("{}\r\n", describe(&event, summary.start_us))
        };
        serde_json::to_writer(&mut *out, &json!([at, "o", text]))?;
        out.write_all(b"\n")?;
    }
    Ok(())
}
