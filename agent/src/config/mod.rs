//! Configuration and policy files, format v1 (docs/POLICY.md).
//!
//! One main file (`[agent]` plus any `[[target]]`, `[[workload]]`, `[[rule]]`)
//! and optionally a `policy_dir` of `*.toml` files with more of the latter
//! three. Every error names its file, line and column; nothing half-loaded is
//! ever returned, so a bad reload leaves the running policy untouched.
pub mod bundle;
mod file;
mod policy;
mod secrets;
mod settings;

pub use settings::{
    AgentSettings, ApprovalSettings, CgroupSetting, DEFAULT_ADMIN_SOCKET, DEFAULT_CONFIG_PATH,
    Mode, PolicySourceSettings, WebhookFormat,
};

use std::path::{Path, PathBuf};

use crate::policy::Policy;
use file::{Located, SourceFile};
use policy::build_policy;
use secrets::read_secret_file;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {cause}", path.display())]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}: {cause}", path.display())]
    Bundle {
        path: PathBuf,
        cause: bundle::BundleError,
    },
}

/// A fully loaded configuration: agent settings and a validated policy.
#[derive(Clone, Debug)]
pub struct Config {
    pub agent: AgentSettings,
    pub sessions: crate::sessions::SessionSettings,
    /// Where ended sessions are shipped; none keeps them local.
    pub shipper: Option<crate::sessions::ShipperSettings>,
    pub approvals: ApprovalSettings,
    /// Where signed policy bundles come from; none: local files only.
    pub policy_source: Option<PolicySourceSettings>,
    /// The bundle whose files are part of `policy` (the last one accepted
    /// from `policy_source`).
    pub bundle: Option<bundle::Bundle>,
    pub policy: Policy,
    /// Every file read, main file first: what a reload watches.
    pub sources: Vec<PathBuf>,
}

impl Config {
    /// Loads the main file and its policy directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let main = SourceFile::read(path)?;
        Self::from_main(main)
    }

    /// Loads the main file and its policy directory with `bundle` in place
    /// of the one accepted last: whether a bundle just fetched makes a
    /// valid policy here, before it is kept.
    pub fn load_with_bundle(path: &Path, bundle: bundle::Bundle) -> Result<Self, ConfigError> {
        Self::build(SourceFile::read(path)?, Some(bundle), None)
    }

    /// Loads the main file and its policy directory with the bundle in
    /// `bundle_path` (signed under the main file's `[policy_source]`
    /// trusted keys) in place of the one accepted last: `interlock policy
    /// check --bundle`, before a bundle is published.
    pub fn load_with_bundle_file(path: &Path, bundle_path: &Path) -> Result<Self, ConfigError> {
        let main = SourceFile::read(path)?;
        let spec = main.parse()?;
        let Some(settings) = policy_source_settings(spec.policy_source.as_ref(), &main)? else {
            return Err(ConfigError::Bundle {
                path: path.to_owned(),
                cause: bundle::BundleError::Key(
                    "no [policy_source] trusted_keys to check a bundle against".into(),
                ),
            });
        };
        let bytes = std::fs::read(bundle_path).map_err(|cause| ConfigError::Read {
            path: bundle_path.to_owned(),
            cause,
        })?;
        let bundle =
            bundle::open(&bytes, &settings.trusted_keys).map_err(|cause| ConfigError::Bundle {
                path: bundle_path.to_owned(),
                cause,
            })?;
        Self::build(main, Some(bundle), None)
    }

    /// Loads the main file and its policy directory with the rules of
    /// `rules` in place of theirs: a candidate policy (`interlock policy
    /// check --rules`), its workloads added to theirs.
    pub fn load_with_rules(path: &Path, rules: &Path) -> Result<Self, ConfigError> {
        let main = SourceFile::read(path)?;
        let candidate = SourceFile::read(rules)?;
        let spec = candidate.parse()?;
        if let Some(span) = spec
            .agent
            .as_ref()
            .map(|a| a.span())
            .or(spec.target.first().map(|t| t.span()))
        {
            return Err(candidate.error_at(
                span,
                "a candidate's rules file holds [[workload]] and [[rule]] tables only (targets and [agent] come from the configuration)",
            ));
        }
        Self::build(main, None, Some((candidate, spec)))
    }

    /// Loads a configuration held in memory (the embedded demo); `name` is
    /// what errors call it.
    pub fn from_text(name: &str, text: &str) -> Result<Self, ConfigError> {
        Self::from_main(SourceFile::new(PathBuf::from(name), text.to_owned()))
    }

    fn from_main(main: SourceFile) -> Result<Self, ConfigError> {
        Self::build(main, None, None)
    }

    /// The main file, its policy directory, the policy bundle (`bundle`,
    /// else the one accepted last), and a candidate's rules in place of
    /// theirs when one is given.
    fn build(
        main: SourceFile,
        bundle: Option<bundle::Bundle>,
        candidate: Option<(SourceFile, file::FileSpec)>,
    ) -> Result<Self, ConfigError> {
        let main_spec = main.parse()?;
        let agent = AgentSettings::from_spec(main_spec.agent.as_ref(), &main)?;
        let sessions = session_settings(main_spec.sessions.as_ref(), &main)?;
        let shipper = main_spec.shipper.as_ref().map(|s| {
            let spec = s.get_ref();
            crate::sessions::ShipperSettings {
                url: spec.url.get_ref().clone(),
                endpoint: spec.endpoint.clone(),
                region: spec.region.clone(),
                credentials_file: spec.credentials_file.clone(),
                part_interval: spec
                    .part_interval
                    .unwrap_or(crate::sessions::ship::DEFAULT_PART_INTERVAL)
                    .max(std::time::Duration::from_secs(1)),
            }
        });
        if let Some(spec) = &main_spec.shipper {
            let url = &spec.get_ref().url;
            if !(url.get_ref().starts_with("s3://") || url.get_ref().starts_with("file:///")) {
                return Err(main.error_at(
                    url.span(),
                    format!(
                        "url {:?} must be s3://bucket/prefix or file:///dir",
                        url.get_ref()
                    ),
                ));
            }
        }

        let approvals = approval_settings(main_spec.approvals.as_ref(), &main)?;
        let policy_source = policy_source_settings(main_spec.policy_source.as_ref(), &main)?;

        let mut files = vec![(main, main_spec)];
        if let Some(dir) = &agent.policy_dir {
            for path in policy_files(dir)? {
                let source = SourceFile::read(&path)?;
                let spec = policy_only(&source, "the policy directory")?;
                files.push((source, spec));
            }
        }
        let mut sources: Vec<PathBuf> = files.iter().map(|(s, _)| s.path.clone()).collect();
        let bundle = match &policy_source {
            None => None,
            Some(settings) => {
                match bundle {
                    Some(bundle) => Some(bundle),
                    None => {
                        // Watched even while missing: a bundle kept there
                        // later is loaded.
                        let cache = PolicySourceSettings::cache_path(&agent.state_dir);
                        sources.push(cache.clone());
                        cached_bundle(&cache, &settings.trusted_keys)?
                    }
                }
            }
        };
        if let Some(bundle) = &bundle {
            for file in &bundle.manifest.files {
                let name = format!("policy bundle {}/{}", bundle.manifest.version, file.name);
                let source = SourceFile::new(PathBuf::from(name), file.text.clone());
                let spec = policy_only(&source, "a policy bundle")?;
                files.push((source, spec));
            }
        }
        if let Some(candidate) = candidate {
            for (_, spec) in &mut files {
                spec.rule.clear();
            }
            files.push(candidate);
        }
        let policy = build_policy(&files)?;
        Ok(Self {
            agent,
            sessions,
            shipper,
            approvals,
            policy_source,
            bundle,
            policy,
            sources,
        })
    }
}

/// Whether `text` may be a bundle's file `name`: TOML with targets,
/// workloads and rules only (`interlock policy sign`; the whole policy is
/// checked where it is loaded).
pub fn check_bundle_file(name: &str, text: &str) -> Result<(), ConfigError> {
    policy_only(
        &SourceFile::new(PathBuf::from(name), text.to_owned()),
        "a policy bundle",
    )
    .map(drop)
}

/// A policy directory's or bundle's file: targets, workloads and rules
/// only.
fn policy_only(source: &SourceFile, place: &str) -> Result<file::FileSpec, ConfigError> {
    let spec = source.parse()?;
    if let Some(agent) = &spec.agent {
        return Err(source.error_at(
            agent.span(),
            format!("[agent] belongs in the main configuration file, not in {place}"),
        ));
    }
    if let Some(span) = spec
        .sessions
        .as_ref()
        .map(|s| s.span())
        .or(spec.shipper.as_ref().map(|s| s.span()))
        .or(spec.approvals.as_ref().map(|s| s.span()))
        .or(spec.policy_source.as_ref().map(|s| s.span()))
    {
        return Err(source.error_at(span, format!("[sessions], [shipper], [approvals] and [policy_source] belong in the main configuration file, not in {place}")));
    }
    Ok(spec)
}

/// The bundle accepted last, checked again: a cache file that no longer
/// verifies (altered, or its key no longer trusted) is an error, never
/// silently dropped.
fn cached_bundle(
    path: &Path,
    trusted: &[bundle::TrustedKey],
) -> Result<Option<bundle::Bundle>, ConfigError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(cause) => {
            return Err(ConfigError::Read {
                path: path.to_owned(),
                cause,
            });
        }
    };
    bundle::open(&bytes, trusted)
        .map(Some)
        .map_err(|cause| ConfigError::Bundle {
            path: path.to_owned(),
            cause,
        })
}

fn policy_source_settings(
    spec: Option<&Located<file::PolicySourceSpec>>,
    source: &SourceFile,
) -> Result<Option<PolicySourceSettings>, ConfigError> {
    let Some(spec) = spec.map(Located::get_ref) else {
        return Ok(None);
    };
    let url = spec.url.get_ref();
    let known = [
        "s3://",
        "file:///",
        "git+https://",
        "git+ssh://",
        "git+file://",
    ];
    if !known.iter().any(|scheme| url.starts_with(scheme)) {
        return Err(source.error_at(
            spec.url.span(),
            format!("url {url:?} must start with one of {}", known.join(", ")),
        ));
    }
    let bundle = match &spec.bundle {
        Some(name) if name.get_ref().is_empty() || name.get_ref().starts_with('/') => {
            return Err(source.error_at(name.span(), "bundle: a relative name"));
        }
        Some(name) => name.get_ref().clone(),
        None => "policy.bundle".into(),
    };
    if let Some(git_ref) = &spec.git_ref
        && !url.starts_with("git+")
    {
        return Err(source.error_at(git_ref.span(), "git_ref is for git+… urls"));
    }
    if spec.trusted_keys.get_ref().is_empty() {
        return Err(source.error_at(
            spec.trusted_keys.span(),
            "trusted_keys: at least one key (`interlock policy keygen` prints one)",
        ));
    }
    let trusted_keys = spec
        .trusted_keys
        .get_ref()
        .iter()
        .map(|key| {
            bundle::TrustedKey::parse(key.get_ref())
                .map_err(|e| source.error_at(key.span(), format!("trusted_keys: {e}")))
        })
        .collect::<Result<_, _>>()?;
    Ok(Some(PolicySourceSettings {
        url: url.clone(),
        bundle,
        git_ref: spec
            .git_ref
            .as_ref()
            .map_or_else(|| "main".to_owned(), |r| r.get_ref().clone()),
        interval: spec
            .interval
            .unwrap_or(std::time::Duration::from_secs(60))
            .max(std::time::Duration::from_secs(1)),
        trusted_keys,
        endpoint: spec.endpoint.clone(),
        region: spec.region.clone(),
        credentials_file: spec.credentials_file.clone(),
    }))
}

fn session_settings(
    spec: Option<&Located<file::SessionsSpec>>,
    source: &SourceFile,
) -> Result<crate::sessions::SessionSettings, ConfigError> {
    let mut settings = crate::sessions::SessionSettings::default();
    let Some(spec) = spec.map(Located::get_ref) else {
        return Ok(settings);
    };
    if let Some(size) = &spec.max_store_bytes {
        settings.max_store_bytes = size
            .get_ref()
            .bytes()
            .map_err(|m| source.error_at(size.span(), format!("max_store_bytes: {m}")))?;
    }
    if let Some(retention) = spec.retention {
        settings.retention = retention;
    }
    Ok(settings)
}

fn approval_settings(
    spec: Option<&Located<file::ApprovalsSpec>>,
    source: &SourceFile,
) -> Result<ApprovalSettings, ConfigError> {
    let mut settings = ApprovalSettings::default();
    let Some(located) = spec else {
        return Ok(settings);
    };
    let spec = located.get_ref();
    if let Some(url) = &spec.webhook_url {
        let parsed = url::Url::parse(url.get_ref())
            .map_err(|e| source.error_at(url.span(), format!("webhook_url: {e}")))?;
        let loopback = match parsed.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(name)) => name == "localhost",
            None => false,
        };
        if !(parsed.scheme() == "https" || parsed.scheme() == "http" && loopback) {
            return Err(source.error_at(
                url.span(),
                "webhook_url must be https:// (plain http only to a loopback address)",
            ));
        }
        settings.webhook_url = Some(parsed);
    }
    settings.webhook_ca_file = spec.webhook_ca_file.clone();
    if let Some(listen) = &spec.callback_listen {
        settings.callback_listen = Some(listen.get_ref().parse().map_err(|_| {
            source.error_at(
                listen.span(),
                format!(
                    "callback_listen: {:?} is not an address such as \"127.0.0.1:9956\"",
                    listen.get_ref()
                ),
            )
        })?);
    }
    if let Some(file) = &spec.token_file {
        let token = read_secret_file(source, file.get_ref(), file.span(), "token_file")?;
        settings.token = Some(std::sync::Arc::new(token));
    } else if let Some(listen) = &spec.callback_listen {
        return Err(source.error_at(
            listen.span(),
            "callback_listen needs a token_file (the callers' bearer token)",
        ));
    }
    if let Some(format) = &spec.webhook_format {
        settings.webhook_format = match format.get_ref().as_str() {
            "json" => WebhookFormat::Json,
            "slack" => WebhookFormat::Slack,
            other => {
                return Err(source.error_at(
                    format.span(),
                    format!("webhook_format: {other:?} is not \"json\" or \"slack\""),
                ));
            }
        };
    }
    settings.callback_url = match (&spec.callback_url, settings.callback_listen) {
        (Some(text), _) if settings.callback_listen.is_none() => {
            return Err(source.error_at(
                text.span(),
                "callback_url names where callback_listen is reached: set callback_listen too",
            ));
        }
        (Some(text), _) => Some(
            url::Url::parse(text.get_ref())
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https"))
                .ok_or_else(|| source.error_at(text.span(), "callback_url: not an http(s) URL"))?,
        ),
        (None, Some(listen)) => url::Url::parse(&format!("http://{listen}")).ok(),
        (None, None) => None,
    };
    Ok(settings)
}

/// The admin socket a configuration file names, read leniently: the CLI
/// must find a running agent even while its file is broken (say, to ask it
/// to reload and hear why that fails).
pub fn admin_socket_of(path: &Path) -> PathBuf {
    let named = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|table| {
            let socket = table.get("agent")?.get("admin_socket")?.as_str()?;
            Some(PathBuf::from(socket))
        });
    named.unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET))
}

/// `*.toml` in `dir`, sorted by name so merges are deterministic. A missing
/// directory is an empty one: it is optional.
fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(cause) => {
            return Err(ConfigError::Read {
                path: dir.to_owned(),
                cause,
            });
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "toml") && p.is_file())
        .collect();
    paths.sort();
    Ok(paths)
}

#[cfg(test)]
mod tests;
