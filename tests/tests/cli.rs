//! The command line on the shipped examples: `policy check` and
//! `policy explain` (no kernel needed, but run with the real binary).
use std::process::Command;

use interlock_e2e::*;

fn example(name: &str) -> String {
    format!("{}/../policy-examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn interlock(args: &[&str]) -> std::process::Output {
    Command::new(interlock_bin()).args(args).output().unwrap()
}

#[test]
fn policy_check_accepts_examples_and_locates_errors() {
    let out = interlock(&["policy", "check", &example("ci-runner.toml")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("4 targets, 2 workloads, 4 rules"),
        "{}",
        stdout(&out)
    );

    let out = interlock(&["policy", "check", "--json", &example("bastion.toml")]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["valid"], true);
    assert_eq!(json["targets"][1]["address"], "metrics.internal:9100");

    let dir = std::env::temp_dir().join(format!("interlock-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[target]]\nname = \"x\"\nprotocol = \"tcp\"\naddress = \"10.0.0.0/33:1\"\n",
    )
    .unwrap();
    let out = interlock(&["policy", "check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with(&format!("{}:4:11: ", bad.display())),
        "{}",
        stderr(&out)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn policy_explain_names_the_deciding_rule() {
    let config = example("ci-runner.toml");
    let explain = |extra: &[&str]| {
        let mut args = vec!["policy", "explain", "--config", &config, "--json"];
        args.extend_from_slice(extra);
        let out = interlock(&args);
        let json: serde_json::Value =
            serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
        (out.status.code(), json)
    };

    let (code, json) = explain(&[
        "--target",
        "build-cache",
        "--unit",
        "gitlab-runner.service",
        "--exe",
        "/usr/bin/python3",
    ]);
    assert_eq!(code, Some(0));
    assert_eq!(json["verdict"]["action"], "allow");
    assert_eq!(json["verdict"]["rule"], "ci-may-use-cache");
    assert_eq!(json["matching_workloads"][0], "ci-jobs");
    assert_eq!(json["workload"]["exe_sha256"].as_str().unwrap().len(), 64);

    // The same job with curl: the explicit deny wins. Exit status 3 = denied.
    let (code, json) = explain(&[
        "--target",
        "build-cache",
        "--unit",
        "gitlab-runner.service",
        "--exe",
        "/usr/bin/curl",
    ]);
    assert_eq!(code, Some(3));
    assert_eq!(json["verdict"]["rule"], "no-raw-http-to-cache");

    // The deploy API needs a release manager's approval. Exit status 4.
    let (code, json) = explain(&[
        "--target",
        "deploy-api",
        "--unit",
        "gitlab-runner.service",
        "--exe",
        "/usr/bin/curl",
    ]);
    assert_eq!(code, Some(4));
    assert_eq!(json["verdict"]["action"], "approve");
    assert_eq!(json["verdict"]["rule"], "deploys-need-a-release-manager");

    // A live process: this test itself, in no CI unit, is denied by default.
    let pid = std::process::id().to_string();
    let (code, json) = explain(&["--target", "artifact-store", "--pid", &pid]);
    assert_eq!(code, Some(3));
    assert_eq!(json["verdict"]["rule"], serde_json::Value::Null);
    assert_eq!(json["workload"]["pid"], std::process::id());
    assert_eq!(json["workload"]["live"], true);

    let out = interlock(&[
        "policy", "explain", "--config", &config, "--target", "nope", "--uid", "0",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no target named \"nope\""),
        "{}",
        stderr(&out)
    );
}

/// Shell completions and man pages come from the CLI's own definition, so
/// every command is in them (a new one too), and bash accepts the script.
#[test]
fn completions_and_man_pages_cover_every_command() {
    let out = interlock(&["completions", "bash"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let script = stdout(&out);
    for command in ["request", "approvals", "sessions", "grants", "completions"] {
        assert!(
            script.contains(command),
            "{command} missing from the completions"
        );
    }
    let dir = std::env::temp_dir().join(format!("interlock-man-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let checked = Command::new("bash")
        .arg("-n")
        .arg("/dev/stdin")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut bash| {
            use std::io::Write;
            bash.stdin.take().unwrap().write_all(script.as_bytes())?;
            bash.wait()
        })
        .unwrap();
    assert!(checked.success(), "bash -n refused the completions");

    let out = interlock(&["man", "--dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    for page in [
        "interlock.1",
        "interlock-request.1",
        "interlock-sessions-show.1",
    ] {
        let text =
            std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page}: {text}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
