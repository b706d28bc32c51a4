//! Job context from the kernel's view of the process tree: a stand-in CI
//! runner (a copy of bash named `gitlab-runner`) starts a job with GitLab's
//! variables; the job's shell changes its own environment to claim another
//! branch and runs `psql`. The agent reads the job from the process the
//! runner started, not from the caller: the session and the access line
//! carry the job's real branch, and a `ci_ref = "main"` workload admits the
//! job on `main` and refuses the same job on another branch, whatever it
//! claims — even when the job's first process replaces itself with
//! another environment (read as the runner passed it at exec, in the
//! kernel).
use std::fs;

use interlock_e2e::*;
use serde_json::Value;

const PG_IP: &str = "127.0.0.92";

#[test]
fn a_job_is_known_by_what_its_runner_said_not_by_what_it_claims() {
    let pg = Postgres::start("job", PG_IP);
    pg.admin_sql("postgres", "CREATE ROLE app LOGIN PASSWORD 'job-secret';");
    let secret = pg.password_file("job-secret");
    let cgroup = TestCgroup::new("job-context");
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
name = "app-main"
ci_project = "group/app"
ci_ref = "main"

[[rule]]
name = "main-may-query"
workloads = ["app-main"]
targets = ["db"]
decision = "allow"
statements = ["select"]
tables = []
"#,
        addr = pg.addr,
    );
    let agent = Agent::start(&cgroup, "job-context", &policy);
    // The runner: bash under the name GitLab's runner has.
    let runner = agent.workdir.join("gitlab-runner");
    fs::copy("/bin/bash", &runner).unwrap();

    // The runner starts the job's shell with the job's variables (as a
    // runner does: fork, then exec with them); `script` is the job.
    let job = |git_ref: &str, script: &str| {
        cgroup.sh(&format!(
            "exec {runner} -c 'PATH=/usr/bin:/bin GITLAB_CI=true CI_JOB_ID=77 \
             CI_PROJECT_PATH=group/app CI_COMMIT_REF_NAME={git_ref} CI_PIPELINE_ID=9 \
             CI_JOB_URL=https://gitlab.example/group/app/-/jobs/77 GITLAB_USER_LOGIN=ann \
             /bin/sh -c \"{script}\"; echo exit=$?'",
            runner = runner.display(),
        ))
    };
    let psql = format!(
        "psql -X -w -q -t -A -h {} -p {} -U x -d postgres -c \\\"SELECT 1\\\"",
        pg.addr.ip(),
        pg.addr.port()
    );
    // The job claims `main` in its own environment before it runs psql.
    let claims_main = format!("export CI_COMMIT_REF_NAME=main CI_JOB_ID=1; {psql}");
    let on_main = job("main", &claims_main);
    assert!(
        stdout(&on_main).contains("1\nexit=0"),
        "{}{}",
        stdout(&on_main),
        stderr(&on_main)
    );
    let on_branch = job("feature-x", &claims_main);
    assert!(
        stdout(&on_branch).contains("exit=2"),
        "a feature branch claiming main was let in: {}{}",
        stdout(&on_branch),
        stderr(&on_branch)
    );
    // The job's first process replaces itself with another environment:
    // /proc then shows `main`; what the runner passed at exec stands.
    let replaced = job(
        "feature-y",
        &format!("exec env CI_COMMIT_REF_NAME=main CI_JOB_ID=1 {psql}"),
    );
    assert!(
        stdout(&replaced).contains("exit=2"),
        "a job that replaced its environment was let in: {}{}",
        stdout(&replaced),
        stderr(&replaced)
    );

    // Recorded: the job as its runner described it, and where it came from.
    let jobs: Vec<Value> = agent
        .session_events()
        .into_iter()
        .filter(|e| e["kind"] == "session_start")
        .map(|e| e["workload"]["job"].clone())
        .collect();
    let refs: Vec<&str> = jobs
        .iter()
        .map(|j| j["ref"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(refs, ["main", "feature-x", "feature-y"], "{jobs:?}");
    for job in &jobs {
        assert_eq!(job["ci"], "gitlab");
        assert_eq!(job["project"], "group/app");
        assert_eq!(job["job"], "77", "the job's own edit must not count");
        assert_eq!(job["actor"], "ann");
        assert_eq!(job["from_exec"], true, "captured at exec: {job}");
    }
    assert!(
        jobs[0]["from_exe"]
            .as_str()
            .is_some_and(|e| e.ends_with("sh")),
        "{jobs:?}"
    );
    assert!(
        jobs[2]["from_exe"]
            .as_str()
            .is_some_and(|e| e.ends_with("psql")),
        "{jobs:?}"
    );
    // Sessions are found by their job.
    let out = agent.cli(&["sessions", "list", "--ci-ref", "main", "--json"]);
    assert_eq!(stdout(&out).lines().count(), 1, "{}", stdout(&out));
    let out = agent.cli(&[
        "sessions",
        "list",
        "--ci-project",
        "group/*",
        "--ci-ref",
        "feature-*",
    ]);
    assert!(
        stdout(&out).contains("(group/app@feature-x)"),
        "{}",
        stdout(&out)
    );
    assert_eq!(stdout(&out).lines().count(), 3, "{}", stdout(&out));

    // The access log says the same.
    let lines = agent.access_lines();
    assert!(
        lines
            .iter()
            .any(|l| l["workload"]["job"]["ref"] == "feature-x" && l["decision"] == "deny"),
        "{lines:?}"
    );
}
