//! Fleet-wide policy (`[policy_source]`): a bundle signed with `interlock
//! policy sign` and published to a real Garage bucket (or a git
//! repository) is followed by the agent; a bundle that is unsigned,
//! signed by another key, altered after signing, older than the one in
//! force, or signed but invalid never replaces the running policy, and the
//! status and `/metrics` say so. The bundle's version is in every session,
//! and the last bundle accepted outlives a restart while the source is
//! down.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use interlock_e2e::*;
use serde_json::Value;

const IP: &str = "127.0.0.97";

struct Publisher {
    dir: PathBuf,
    key: PathBuf,
    public: String,
}

impl Publisher {
    fn new(dir: &Path, name: &str) -> Self {
        let key = dir.join(format!("{name}.key"));
        let out = Command::new(interlock_bin())
            .args(["policy", "keygen", "--out"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let public = stdout(&out).trim().to_owned();
        assert!(public.starts_with("ed25519:"), "{public}");
        Self {
            dir: dir.to_owned(),
            key,
            public,
        }
    }

    /// A bundle of one policy file, signed.
    fn sign(&self, version: &str, serial: u64, policy: &str) -> Vec<u8> {
        let files = self.dir.join(format!("files-{version}"));
        std::fs::create_dir_all(&files).unwrap();
        std::fs::write(files.join("10-fleet.toml"), policy).unwrap();
        let out_path = self.dir.join(format!("{version}.bundle"));
        let out = Command::new(interlock_bin())
            .args(["policy", "sign", "--key"])
            .arg(&self.key)
            .arg("--out")
            .arg(&out_path)
            .args(["--version", version, "--serial", &serial.to_string()])
            .arg(&files)
            .output()
            .unwrap();
        assert!(out.status.success(), "policy sign: {}", stderr(&out));
        std::fs::read(out_path).unwrap()
    }
}

fn target(server: &Server) -> String {
    format!(
        "[[target]]\nname = \"svc\"\nprotocol = \"tcp\"\naddress = \"{}\"\n",
        server.addr
    )
}

fn allowing(server: &Server) -> String {
    format!(
        "{}\n[[rule]]\nname = \"fleet-allows-svc\"\nworkloads = [\"*\"]\ntargets = [\"svc\"]\ndecision = \"allow\"\n",
        target(server)
    )
}

fn status(agent: &Agent) -> Value {
    let out = agent.cli(&["status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).unwrap()
}

/// Waits until the status's `policy_source` satisfies `done`.
fn wait_source(agent: &Agent, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let source = status(agent)["policy_source"].clone();
        if done(&source) {
            return source;
        }
        assert!(
            Instant::now() < deadline,
            "waiting for {what}; policy_source: {source:#}\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn bundle_version(source: &Value) -> &str {
    source["bundle"]["version"].as_str().unwrap_or("")
}

/// Waits for the check after this moment to refuse with `why`.
fn wait_refused(agent: &Agent, why: &str) -> Value {
    wait_source(agent, why, |s| {
        s["check"]["last_outcome"] == "refused"
            && s["check"]["error"]
                .as_str()
                .is_some_and(|e| e.contains(why))
    })
}

/// Whether the job reaches the server through the agent.
fn reaches(job: &Path, server: &Server) -> bool {
    let out = sh_in(
        job,
        &format!("curl -sS --max-time 5 http://{}/", server.addr),
    );
    out.status.success() && stdout(&out) == "fleet-ok"
}

/// The newest session's start (session ids are ULIDs: they sort by time).
fn last_start(agent: &Agent) -> Value {
    agent
        .session_events()
        .into_iter()
        .filter(|e| e["kind"] == "session_start")
        .max_by(|a, b| a["session_id"].as_str().cmp(&b["session_id"].as_str()))
        .expect("a recorded session")
}

fn scrape(port: u16, series: &str) -> f64 {
    let out = Command::new("curl")
        .args(["-sf", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .unwrap();
    stdout(&out)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the scrape"))
}

#[test]
fn a_signed_bundle_from_object_storage_is_followed_and_nothing_else_replaces_it() {
    let mut garage = Garage::start("fleet-policy");
    let server = Server::http(&format!("{IP}:0"), "fleet-ok");
    let mut cgroup = TestCgroup::new("fleet-policy");
    let (job, _) = cgroup.child("job.service");
    let work = std::env::temp_dir().join(format!("interlock-fleet-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let fleet = Publisher::new(&work, "fleet");
    let rogue = Publisher::new(&work, "rogue");
    let key = "fleet/policy.bundle";

    garage.put(key, &fleet.sign("v1", 10, &allowing(&server)));
    let metrics = free_port();
    let source = format!(
        "[policy_source]\nurl = \"s3://{}/fleet/\"\nendpoint = \"{}\"\nregion = \"garage\"\n\
         credentials_file = {:?}\ninterval = \"1s\"\ntrusted_keys = [{:?}]\n",
        garage.bucket,
        garage.endpoint,
        garage.credentials_file(),
        fleet.public
    );
    let mut agent = Agent::start_with(
        &cgroup,
        "fleet-policy",
        &format!("metrics_listen = \"127.0.0.1:{metrics}\""),
        &source,
    );
    let running = wait_source(&agent, "bundle v1", |s| bundle_version(s) == "v1");
    assert_eq!(running["bundle"]["serial"], 10);
    assert_eq!(running["bundle"]["signed_by"], fleet.public.as_str());
    assert!(reaches(&job, &server), "v1 allows svc");
    let human = stdout(&agent.cli(&["status"]));
    assert!(
        human.contains("policy:      bundle v1 (serial 10) from s3://"),
        "{human}"
    );
    let start = last_start(&agent);
    assert_eq!(start["policy_bundle"]["version"], "v1", "{start}");
    assert_eq!(
        start["policy_bundle"]["digest"],
        running["bundle"]["digest"]
    );

    // Each of these would deny svc; none may take effect.
    let denying = target(&server);
    let v2 = fleet.sign("v2", 20, &denying);
    let tampered = {
        let mut envelope: Value =
            serde_json::from_slice(&fleet.sign("v1b", 11, &allowing(&server))).unwrap();
        let other: Value = serde_json::from_slice(&v2).unwrap();
        envelope["payload"] = other["payload"].clone();
        serde_json::to_vec(&envelope).unwrap()
    };
    let broken = denying.replace(&format!("\"{}\"", server.addr), &format!("\"{IP}\""));
    let cases: [(&str, Vec<u8>, &str); 5] = [
        (
            "unsigned",
            b"[[rule]]\nname = \"everything\"\n".to_vec(),
            "not a signed policy bundle",
        ),
        (
            "signed by another key",
            rogue.sign("v2-rogue", 20, &denying),
            "not signed by a trusted key",
        ),
        ("altered after signing", tampered, "altered after signing"),
        (
            "older than v1 (a replay)",
            fleet.sign("v0", 5, &denying),
            "not newer than the running bundle's 10",
        ),
        (
            "signed but invalid",
            fleet.sign("v2-broken", 20, &broken),
            "policy bundle v2-broken/10-fleet.toml:4:11:",
        ),
    ];
    // What the publisher runs before uploading: the bundle checked as a
    // host would load it.
    let check = |bundle: &[u8]| {
        let path = work.join("candidate.bundle");
        std::fs::write(&path, bundle).unwrap();
        Command::new(interlock_bin())
            .args(["policy", "check", "--bundle"])
            .arg(&path)
            .arg(&agent.config)
            .output()
            .unwrap()
    };
    let out = check(&v2);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("ok (1 files, bundle v2 of 1 files, 1 targets"),
        "{}",
        stdout(&out)
    );
    let out = check(&cases[1].1);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not signed by a trusted key"),
        "{}",
        stderr(&out)
    );
    let refused_before = scrape(
        metrics,
        "interlock_policy_bundle_checks_total{outcome=\"refused\"}",
    );
    for (what, bytes, why) in &cases {
        garage.put(key, bytes);
        let source = wait_refused(&agent, why);
        assert_eq!(bundle_version(&source), "v1", "{what}: v1 stays in force");
        assert!(reaches(&job, &server), "{what}: v1 still allows svc");
        eprintln!("{what}: refused ({})", source["check"]["error"]);
    }
    let refused = scrape(
        metrics,
        "interlock_policy_bundle_checks_total{outcome=\"refused\"}",
    );
    assert!(
        refused >= refused_before + cases.len() as f64,
        "refused checks counted: {refused_before} → {refused}"
    );
    assert_eq!(scrape(metrics, "interlock_policy_bundle_serial"), 10.0);

    // A newer bundle from the fleet's key is followed.
    let connections = server.connections();
    garage.put(key, &v2);
    wait_source(&agent, "bundle v2", |s| bundle_version(s) == "v2");
    assert!(!reaches(&job, &server), "v2 denies svc");
    assert_eq!(server.connections(), connections, "nothing reached svc");
    let start = last_start(&agent);
    assert_eq!(start["policy_bundle"]["version"], "v2", "{start}");
    assert_eq!(scrape(metrics, "interlock_policy_bundle_serial"), 20.0);

    // Restarted while the source is down: the last bundle accepted holds.
    garage.stop();
    agent.kill9();
    agent.spawn();
    let source = wait_source(&agent, "an unreachable source", |s| {
        s["check"]["last_outcome"] == "unreachable"
    });
    assert_eq!(bundle_version(&source), "v2", "{source:#}");
    assert!(!reaches(&job, &server), "v2 still denies svc");
    assert_eq!(server.connections(), connections);
    garage.resume();
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn a_signed_bundle_is_followed_from_a_git_repository() {
    let server = Server::http("127.0.0.98:0", "fleet-ok");
    let mut cgroup = TestCgroup::new("fleet-git");
    let (job, _) = cgroup.child("job.service");
    let work = std::env::temp_dir().join(format!("interlock-fleet-git-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let fleet = Publisher::new(&work, "fleet");
    let (repo, checkout) = (work.join("policy.git"), work.join("checkout"));
    let git = |dir: &Path, args: &[&str]| {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args([
                "-c",
                "user.name=fleet",
                "-c",
                "user.email=fleet@example.com",
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", stderr(&out));
    };
    git(
        &work,
        &["init", "-q", "--bare", "-b", "main", repo.to_str().unwrap()],
    );
    git(
        &work,
        &[
            "clone",
            "-q",
            repo.to_str().unwrap(),
            checkout.to_str().unwrap(),
        ],
    );
    let publish = |version: &str, serial: u64, policy: &str| {
        std::fs::write(
            checkout.join("policy.bundle"),
            fleet.sign(version, serial, policy),
        )
        .unwrap();
        git(&checkout, &["add", "policy.bundle"]);
        git(&checkout, &["commit", "-q", "-m", version]);
        git(&checkout, &["push", "-q", "origin", "HEAD:main"]);
    };
    publish("g1", 1, &allowing(&server));
    let source = format!(
        "[policy_source]\nurl = \"git+file://{}\"\ngit_ref = \"main\"\ninterval = \"1s\"\ntrusted_keys = [{:?}]\n",
        repo.display(),
        fleet.public
    );
    let agent = Agent::start(&cgroup, "fleet-git", &source);
    wait_source(&agent, "bundle g1", |s| bundle_version(s) == "g1");
    assert!(reaches(&job, &server), "g1 allows svc");
    publish("g2", 2, &target(&server));
    wait_source(&agent, "bundle g2", |s| bundle_version(s) == "g2");
    assert!(!reaches(&job, &server), "g2 denies svc");
    let start = last_start(&agent);
    assert_eq!(start["policy_bundle"]["version"], "g2", "{start}");
    let _ = std::fs::remove_dir_all(&work);
}
