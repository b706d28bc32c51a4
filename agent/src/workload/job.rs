//! Which CI job a caller belongs to: read from the environment of the
//! process a CI runner started for the job — the caller's ancestor whose
//! parent is the runner. A job's processes can change their own
//! environment and their children's, never that ancestor's; and a process
//! that left the job's tree (double fork, a daemon) has no such ancestor,
//! so it has no job context rather than one it wrote itself. That
//! ancestor's environment is the one the runner passed at its exec, as the
//! kernel captured it (`exec_env.rs`), not what `/proc` shows now (the
//! job may have replaced the process since). The record names the process
//! the context came from, and how it was read.
use serde::{Deserialize, Serialize};

/// Runners whose direct children are jobs (by executable base name):
/// GitLab Runner, GitHub Actions' runner worker, Buildkite's agent.
/// Jenkins agents are Java processes: name theirs in `[agent] ci_runners`.
pub const DEFAULT_RUNNERS: [&str; 5] = [
    "gitlab-runner",
    "gitlab-ci-multi-runner",
    "Runner.Worker",
    "buildkite-agent",
    "act_runner",
];

/// The most of a process's environment read.
const MAX_ENVIRON: usize = 1 << 20;

/// A CI job, as its runner described it to the job's first process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobContext {
    /// `gitlab`, `github`, `jenkins` or `buildkite`.
    pub ci: String,
    /// The project or repository (`group/app`, `org/repo`).
    pub project: Option<String>,
    /// The branch or tag being built.
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    /// The job's id (GitHub: the job's name in its workflow).
    pub job: Option<String>,
    pub url: Option<String>,
    pub pipeline: Option<String>,
    /// Who started it.
    pub actor: Option<String>,
    /// The process the context was read from (the runner's child).
    pub from_pid: u32,
    pub from_exe: Option<String>,
    /// Read from the environment the runner passed at that process's exec
    /// (captured in the kernel); false: from its environment now
    /// (`/proc`), for a job that started before the agent.
    #[serde(default)]
    pub from_exec: bool,
}

impl JobContext {
    /// The context a job's environment (`KEY=VALUE` pairs) names, if any.
    pub fn from_environment<'a>(vars: impl Iterator<Item = (&'a str, &'a str)>) -> Option<Self> {
        let vars: std::collections::HashMap<&str, &str> = vars.collect();
        let get = |key: &str| vars.get(key).map(|v| (*v).to_owned());
        let context = |ci: &str| Self {
            ci: ci.to_owned(),
            ..Self::default()
        };
        if vars.contains_key("CI_JOB_ID") && vars.contains_key("GITLAB_CI") {
            return Some(Self {
                project: get("CI_PROJECT_PATH"),
                git_ref: get("CI_COMMIT_REF_NAME"),
                job: get("CI_JOB_ID"),
                url: get("CI_JOB_URL"),
                pipeline: get("CI_PIPELINE_ID"),
                actor: get("GITLAB_USER_LOGIN"),
                ..context("gitlab")
            });
        }
        if vars.get("GITHUB_ACTIONS") == Some(&"true") && vars.contains_key("GITHUB_RUN_ID") {
            let url = match (
                vars.get("GITHUB_SERVER_URL"),
                vars.get("GITHUB_REPOSITORY"),
                vars.get("GITHUB_RUN_ID"),
            ) {
                (Some(server), Some(repo), Some(run)) => {
                    Some(format!("{server}/{repo}/actions/runs/{run}"))
                }
                _ => None,
            };
            return Some(Self {
                project: get("GITHUB_REPOSITORY"),
                git_ref: get("GITHUB_REF_NAME"),
                job: get("GITHUB_JOB"),
                url,
                pipeline: get("GITHUB_RUN_ID"),
                actor: get("GITHUB_ACTOR"),
                ..context("github")
            });
        }
        if vars.contains_key("BUILDKITE_JOB_ID") {
            return Some(Self {
                project: get("BUILDKITE_PIPELINE_SLUG"),
                git_ref: get("BUILDKITE_BRANCH"),
                job: get("BUILDKITE_JOB_ID"),
                url: get("BUILDKITE_BUILD_URL"),
                pipeline: get("BUILDKITE_BUILD_NUMBER"),
                actor: get("BUILDKITE_BUILD_CREATOR"),
                ..context("buildkite")
            });
        }
        if vars.contains_key("BUILD_URL") && vars.contains_key("JOB_NAME") {
            return Some(Self {
                project: get("JOB_NAME"),
                git_ref: get("GIT_BRANCH")
                    .map(|b| b.strip_prefix("origin/").map_or(b.clone(), str::to_owned)),
                job: get("BUILD_NUMBER"),
                url: get("BUILD_URL"),
                ..context("jenkins")
            });
        }
        None
    }
}

/// `KEY=VALUE` pairs of a NUL-separated environment block.
pub fn environment(block: &[u8]) -> impl Iterator<Item = (&str, &str)> {
    block[..block.len().min(MAX_ENVIRON)]
        .split(|b| *b == 0)
        .filter_map(|pair| std::str::from_utf8(pair).ok()?.split_once('='))
}

/// The longest stated reason kept.
const MAX_REASON: usize = 512;

/// The reason a caller states in its own environment (`INTERLOCK_REASON`),
/// cut at 512 characters; none when empty.
pub fn stated_reason(block: &[u8]) -> Option<String> {
    let (_, reason) = environment(block).find(|(key, _)| *key == "INTERLOCK_REASON")?;
    let reason = reason.trim();
    (!reason.is_empty()).then(|| reason.chars().take(MAX_REASON).collect())
}

/// Whether `exe` is one of `runners` (base names or whole paths).
pub fn is_runner(exe: &str, runners: &[String]) -> bool {
    let base = exe.rsplit('/').next().unwrap_or(exe);
    runners.iter().any(|r| r == exe || r == base)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(block: &str) -> Option<JobContext> {
        JobContext::from_environment(environment(block.replace('\n', "\0").as_bytes()))
    }

    #[test]
    fn each_runners_variables_are_read() {
        let gitlab = job("GITLAB_CI=true\nCI_JOB_ID=42\nCI_PROJECT_PATH=group/app\nCI_COMMIT_REF_NAME=main\nCI_JOB_URL=https://gitlab.example/group/app/-/jobs/42\nCI_PIPELINE_ID=7\nGITLAB_USER_LOGIN=ann\nPATH=/bin").unwrap();
        assert_eq!(
            (
                gitlab.ci.as_str(),
                gitlab.project.as_deref(),
                gitlab.git_ref.as_deref(),
                gitlab.job.as_deref(),
                gitlab.actor.as_deref()
            ),
            (
                "gitlab",
                Some("group/app"),
                Some("main"),
                Some("42"),
                Some("ann")
            )
        );
        let github = job("GITHUB_ACTIONS=true\nGITHUB_RUN_ID=99\nGITHUB_REPOSITORY=org/repo\nGITHUB_REF_NAME=release/1.2\nGITHUB_JOB=build\nGITHUB_SERVER_URL=https://github.com\nGITHUB_ACTOR=bob").unwrap();
        assert_eq!(
            github.url.as_deref(),
            Some("https://github.com/org/repo/actions/runs/99")
        );
        assert_eq!(github.git_ref.as_deref(), Some("release/1.2"));
        let jenkins = job(
            "BUILD_URL=https://ci/job/app/5/\nJOB_NAME=app\nBUILD_NUMBER=5\nGIT_BRANCH=origin/main",
        )
        .unwrap();
        assert_eq!(
            (jenkins.ci.as_str(), jenkins.git_ref.as_deref()),
            ("jenkins", Some("main"))
        );
        let buildkite =
            job("BUILDKITE_JOB_ID=j-1\nBUILDKITE_PIPELINE_SLUG=app\nBUILDKITE_BRANCH=main")
                .unwrap();
        assert_eq!(buildkite.ci, "buildkite");
        // Half a job's variables are not a job.
        assert_eq!(job("CI_JOB_ID=42\nPATH=/bin"), None);
        assert_eq!(job("GITHUB_RUN_ID=1"), None);
        assert_eq!(job(""), None);
    }

    #[test]
    fn a_stated_reason_is_read_trimmed_and_cut() {
        let block = |text: &str| text.replace('\n', "\0").into_bytes();
        assert_eq!(
            stated_reason(&block("PATH=/bin\nINTERLOCK_REASON= INC-42 cleanup \n")).as_deref(),
            Some("INC-42 cleanup")
        );
        assert_eq!(stated_reason(&block("INTERLOCK_REASON=\nPATH=/bin")), None);
        assert_eq!(stated_reason(&block("PATH=/bin")), None);
        let long = format!("INTERLOCK_REASON={}", "x".repeat(2000));
        assert_eq!(stated_reason(long.as_bytes()).map(|r| r.len()), Some(512));
    }

    #[test]
    fn runners_are_known_by_base_name_or_path() {
        let runners: Vec<String> = ["gitlab-runner", "/opt/ci/agent"].map(String::from).into();
        assert!(is_runner("/usr/bin/gitlab-runner", &runners));
        assert!(is_runner("/opt/ci/agent", &runners));
        assert!(!is_runner("/usr/bin/agent", &runners));
        assert!(!is_runner("/usr/bin/bash", &runners));
    }
}
