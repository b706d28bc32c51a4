//! `[policy_source]`: the fleet's signed policy bundle, pulled from object
//! storage or a git repository every `interval`.
//!
//! A check fetches the bundle, verifies its signature against the
//! configured keys, refuses one older than the bundle in force (a replay),
//! builds the whole configuration with it exactly as a reload would, and
//! only then keeps it in `state_dir` for the daemon to reload. A bundle
//! that fails any step never replaces the running policy; the status and a
//! metric say why.
use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde::Serialize;

use crate::{
    config::{
        Config, PolicySourceSettings,
        bundle::{self, Bundle},
    },
    policy::BundleInfo,
    sessions::{Bucket, ShipperSettings},
};

/// How long one git command may take.
const GIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Where bundles come from.
pub enum Source {
    /// S3 or a directory (`object_store`, as the shipper uses it).
    Objects { bucket: Bucket, key: String },
    /// A git repository: a bare clone in `state_dir`, fetched shallow.
    Git {
        url: String,
        git_ref: String,
        path: String,
        clone: PathBuf,
    },
}

/// The outcome of one check.
#[derive(Debug)]
pub enum Check {
    Applied(BundleInfo),
    Unchanged,
    Refused(String),
    Unreachable(String),
}

impl Check {
    pub fn outcome(&self) -> &'static str {
        match self {
            Check::Applied(_) => "applied",
            Check::Unchanged => "unchanged",
            Check::Refused(_) => "refused",
            Check::Unreachable(_) => "unreachable",
        }
    }
}

/// What `status` shows of the source.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SourceStatus {
    /// RFC 3339, the last check's end.
    pub last_check: Option<String>,
    pub last_outcome: Option<&'static str>,
    /// Why the last check refused the bundle or could not reach it.
    pub error: Option<String>,
}

impl SourceStatus {
    pub fn record(&mut self, check: &Check) {
        self.last_check = Some(humantime::format_rfc3339_seconds(SystemTime::now()).to_string());
        self.last_outcome = Some(check.outcome());
        self.error = match check {
            Check::Refused(why) | Check::Unreachable(why) => Some(why.clone()),
            Check::Applied(_) | Check::Unchanged => None,
        };
    }
}

impl Source {
    pub fn open(settings: &PolicySourceSettings, state_dir: &Path) -> Result<Self, String> {
        if let Some(url) = settings.url.strip_prefix("git+") {
            return Ok(Source::Git {
                url: url.to_owned(),
                git_ref: settings.git_ref.clone(),
                path: settings.bundle.clone(),
                clone: state_dir.join("policy-source.git"),
            });
        }
        let bucket = Bucket::open(&ShipperSettings {
            url: settings.url.clone(),
            endpoint: settings.endpoint.clone(),
            region: settings.region.clone(),
            credentials_file: settings.credentials_file.clone(),
            ..ShipperSettings::default()
        })
        .map_err(|e| e.to_string())?;
        Ok(Source::Objects {
            bucket,
            key: settings.bundle.clone(),
        })
    }

    /// The bundle's bytes as the source has them now; an error is the
    /// check's outcome (unreachable, or refused when too large).
    pub async fn fetch(&self) -> Result<Vec<u8>, Check> {
        match self {
            Source::Objects { bucket, key } => bucket
                .get_tail(key, bundle::MAX_BUNDLE_BYTES)
                .await
                .map_err(|e| Check::Unreachable(e.to_string()))?
                .ok_or_else(too_large),
            Source::Git {
                url,
                git_ref,
                path,
                clone,
            } => {
                if !clone.join("HEAD").exists() {
                    std::fs::create_dir_all(clone)
                        .map_err(|e| Check::Unreachable(format!("{}: {e}", clone.display())))?;
                    git(clone, &["init", "--bare", "-q"]).await?;
                }
                let refspec = format!("+{git_ref}:refs/interlock/policy");
                git(
                    clone,
                    &["fetch", "-q", "--depth=1", "--no-tags", url, &refspec],
                )
                .await?;
                let object = format!("refs/interlock/policy:{path}");
                let size = git(clone, &["cat-file", "-s", &object]).await?;
                let size: usize = String::from_utf8_lossy(&size)
                    .trim()
                    .parse()
                    .unwrap_or(usize::MAX);
                if size > bundle::MAX_BUNDLE_BYTES {
                    return Err(too_large());
                }
                git(clone, &["cat-file", "blob", &object]).await
            }
        }
    }
}

fn too_large() -> Check {
    Check::Refused(format!(
        "the bundle is over {} bytes",
        bundle::MAX_BUNDLE_BYTES
    ))
}

/// Runs git in `dir` without a terminal to prompt on; its stdout, or its
/// stderr's first line as why the source is unreachable.
async fn git(dir: &Path, args: &[&str]) -> Result<Vec<u8>, Check> {
    let mut command = tokio::process::Command::new("git");
    command
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if std::env::var_os("GIT_SSH_COMMAND").is_none() {
        command.env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes");
    }
    let out = tokio::time::timeout(GIT_TIMEOUT, command.output())
        .await
        .map_err(|_| Check::Unreachable(format!("git took over {GIT_TIMEOUT:?}")))?
        .map_err(|e| Check::Unreachable(format!("cannot run git: {e}")))?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(Check::Unreachable(format!(
        "git: {}",
        stderr.lines().next().unwrap_or("failed").trim()
    )))
}

/// One check of the source against the bundle in force (`running`).
/// `Applied` means the new bundle is kept in the cache: the caller reloads.
pub async fn check(
    source: &Source,
    settings: &PolicySourceSettings,
    config_path: &Path,
    running: Option<&Bundle>,
    state_dir: &Path,
) -> Check {
    let bytes = match source.fetch().await {
        Ok(bytes) => bytes,
        Err(check) => return check,
    };
    // Checked every time (microseconds): a bundle kept but not yet in
    // force (its reload failed on a local file) is applied again.
    let bundle = match bundle::open(&bytes, &settings.trusted_keys) {
        Ok(bundle) => bundle,
        Err(why) => return Check::Refused(why.to_string()),
    };
    if let Some(running) = running {
        let (new, old) = (bundle.manifest.serial, running.manifest.serial);
        if new == old && bundle.digest == running.digest {
            return Check::Unchanged;
        }
        if new <= old {
            return Check::Refused(format!(
                "serial {new} ({}) is not newer than the running bundle's {old} ({}): bundles never go back",
                bundle.manifest.version, running.manifest.version
            ));
        }
    }
    let info = bundle.info();
    let path = config_path.to_owned();
    let built = tokio::task::spawn_blocking(move || Config::load_with_bundle(&path, bundle)).await;
    match built {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => return Check::Refused(error.to_string()),
        Err(error) => return Check::Refused(format!("checking the bundle failed: {error}")),
    }
    let cache = PolicySourceSettings::cache_path(state_dir);
    match keep(&cache, &bytes) {
        Ok(()) => Check::Applied(info),
        Err(error) => Check::Refused(format!("cannot keep it in {}: {error}", cache.display())),
    }
}

/// Writes the accepted bundle in place of the last one, atomically and
/// durably (a crash leaves the old one or the new one).
fn keep(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = path.with_extension("json.new");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// `url` without a password, for status and logs.
pub fn display_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}/{path}")
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real repository: the file at the followed branch, fetched again
    /// after a push, and a missing file or branch is unreachable.
    #[tokio::test]
    async fn a_git_source_fetches_the_bundle_at_its_branch() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, work) = (dir.path().join("repo.git"), dir.path().join("work"));
        let run = |args: &[&str]| {
            let out = std::process::Command::new("git")
                .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "git {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let (repo_s, work_s) = (repo.to_str().unwrap(), work.to_str().unwrap());
        run(&["init", "-q", "--bare", "-b", "main", repo_s]);
        run(&["clone", "-q", repo_s, work_s]);
        let publish = |text: &str| {
            std::fs::write(work.join("policy.bundle"), text).unwrap();
            run(&["-C", work_s, "add", "policy.bundle"]);
            run(&["-C", work_s, "commit", "-q", "-m", text]);
            run(&["-C", work_s, "push", "-q", "origin", "HEAD:main"]);
        };
        publish("one");
        let source = |git_ref: &str, path: &str| Source::Git {
            url: format!("file://{repo_s}"),
            git_ref: git_ref.into(),
            path: path.into(),
            clone: dir.path().join("clone.git"),
        };
        assert_eq!(
            source("main", "policy.bundle").fetch().await.unwrap(),
            b"one"
        );
        publish("two");
        assert_eq!(
            source("main", "policy.bundle").fetch().await.unwrap(),
            b"two"
        );
        for (git_ref, path) in [("main", "other.bundle"), ("release", "policy.bundle")] {
            assert!(matches!(
                source(git_ref, path).fetch().await,
                Err(Check::Unreachable(_))
            ));
        }
    }

    #[test]
    fn passwords_stay_out_of_displayed_urls() {
        assert_eq!(
            display_url("git+https://ci:s3cret@git.example.com/infra/policy.git"),
            "git+https://ci:***@git.example.com/infra/policy.git"
        );
        for url in [
            "s3://fleet/policy/",
            "git+ssh://git@git.example.com/policy.git",
        ] {
            assert_eq!(display_url(url), url);
        }
    }
}
