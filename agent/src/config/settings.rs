//! `[agent]`: how the daemon runs, with the defaults a packaged install uses.
use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::{
    ConfigError,
    file::{AgentSpec, Located, SourceFile},
};
use crate::principal::Principal;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Decisions are applied.
    #[default]
    Enforce,
    /// Decisions are made and logged, but every connection proceeds.
    Audit,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum CgroupSetting {
    /// The cgroup v2 root, found in /proc/self/mountinfo.
    Auto,
    /// A cgroup v2 directory (absolute path in the filesystem).
    Path(PathBuf),
}

#[derive(Clone, Debug, Serialize)]
pub struct AgentSettings {
    pub mode: Mode,
    pub state_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub admins: Vec<Principal>,
    pub cgroup: CgroupSetting,
    pub policy_dir: Option<PathBuf>,
    /// Port of the agent's listeners on 127.0.0.1 and ::1. Privileged by
    /// default so that, while the agent is down, no unprivileged process can
    /// bind it and pose as the agent.
    pub listen_port: u16,
    /// Where programs, links and maps are pinned in bpffs.
    pub bpffs_dir: PathBuf,
    /// How often host-name targets are resolved again.
    pub resolve_interval: Duration,
    /// Whether statement audit lines replace literal values with `?`.
    pub redact_literals: bool,
    /// Whether the access log also gets one line per PostgreSQL statement
    /// (for a SIEM fed from it); the session record always has them.
    pub access_log_statements: bool,
    /// Where `/metrics` is served (off when none).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// PostgreSQL statements above this size are refused unparsed.
    pub max_statement_bytes: usize,
    /// Names and addresses the local CA may vouch for besides the
    /// targets' own (`ca_names`: the names clients use for them).
    pub ca_names: Vec<crate::tls::CaName>,
    /// CI runners (executable base names or paths) whose children are
    /// jobs: their environment is the job context.
    pub ci_runners: Vec<String>,
    /// How long a client has to finish the protocol's startup.
    pub startup_timeout: Duration,
}

/// `[policy_source]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySourceSettings {
    /// As configured: `s3://…`, `file:///…`, `git+…`.
    pub url: String,
    /// The bundle's object or file name.
    pub bundle: String,
    /// Git: the branch or tag followed.
    pub git_ref: String,
    pub interval: Duration,
    pub trusted_keys: Vec<super::bundle::TrustedKey>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub credentials_file: Option<PathBuf>,
}

impl PolicySourceSettings {
    /// Where the last bundle accepted is kept, to start with after a
    /// restart whether or not the source is reachable.
    pub fn cache_path(state_dir: &std::path::Path) -> PathBuf {
        state_dir.join("policy-bundle.json")
    }
}

pub const DEFAULT_CONFIG_PATH: &str = "/etc/interlock/interlock.toml";
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/interlock/admin.sock";
pub const DEFAULT_LISTEN_PORT: u16 = 955;

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            mode: Mode::Enforce,
            state_dir: PathBuf::from("/var/lib/interlock"),
            admin_socket: PathBuf::from(DEFAULT_ADMIN_SOCKET),
            admins: vec![Principal::Uid(0)],
            cgroup: CgroupSetting::Auto,
            policy_dir: None,
            listen_port: DEFAULT_LISTEN_PORT,
            bpffs_dir: PathBuf::from("/sys/fs/bpf/interlock"),
            resolve_interval: Duration::from_secs(30),
            redact_literals: false,
            access_log_statements: false,
            metrics_listen: None,
            max_statement_bytes: 1024 * 1024,
            ca_names: Vec::new(),
            ci_runners: crate::workload::job::DEFAULT_RUNNERS
                .map(String::from)
                .into(),
            startup_timeout: Duration::from_secs(10),
        }
    }
}

impl AgentSettings {
    pub(super) fn from_spec(
        spec: Option<&Located<AgentSpec>>,
        source: &SourceFile,
    ) -> Result<Self, ConfigError> {
        let mut settings = Self::default();
        let Some(located) = spec else {
            return Ok(settings);
        };
        let spec = located.get_ref();
        if let Some(mode) = spec.mode {
            settings.mode = mode;
        }
        if let Some(dir) = &spec.state_dir {
            settings.state_dir = dir.clone();
        }
        if let Some(socket) = &spec.admin_socket {
            settings.admin_socket = socket.clone();
        }
        if let Some(admins) = &spec.admins {
            settings.admins = admins
                .iter()
                .map(|a| Principal::parse(a.get_ref()).map_err(|m| source.error_at(a.span(), m)))
                .collect::<Result<_, _>>()?;
        }
        if let Some(cgroup) = &spec.cgroup {
            settings.cgroup = match cgroup.get_ref().as_str() {
                "auto" => CgroupSetting::Auto,
                path if path.starts_with('/') => CgroupSetting::Path(PathBuf::from(path)),
                other => {
                    return Err(source.error_at(
                        cgroup.span(),
                        format!("cgroup must be \"auto\" or an absolute path to a cgroup v2 directory, not {other:?}"),
                    ));
                }
            };
        }
        settings.policy_dir = spec.policy_dir.clone();
        if let Some(port) = spec.listen_port {
            if port == 0 {
                return Err(source.error_at(located.span(), "listen_port cannot be 0"));
            }
            settings.listen_port = port;
        }
        if spec.bypass_mark.is_some() {
            // Kept readable so that an older configuration still starts.
            tracing::warn!(
                "[agent] bypass_mark is no longer used (a socket mark can be set by a workload with CAP_NET_RAW): the kernel programs recognise the agent's own sockets by their cookies; remove the line"
            );
        }
        if let Some(dir) = &spec.bpffs_dir {
            settings.bpffs_dir = dir.clone();
        }
        if let Some(redact) = spec.redact_literals {
            settings.redact_literals = redact;
        }
        if let Some(lines) = spec.access_log_statements {
            settings.access_log_statements = lines;
        }
        if let Some(listen) = &spec.metrics_listen {
            settings.metrics_listen = Some(listen.get_ref().parse().map_err(|_| {
                source.error_at(
                    listen.span(),
                    format!(
                        "metrics_listen: {:?} is not an address such as \"127.0.0.1:9964\"",
                        listen.get_ref()
                    ),
                )
            })?);
        }
        if let Some(bytes) = &spec.max_statement_bytes {
            if !(1024..=64 * 1024 * 1024).contains(bytes.get_ref()) {
                return Err(source.error_at(
                    bytes.span(),
                    "max_statement_bytes must be between 1024 and 67108864",
                ));
            }
            settings.max_statement_bytes = *bytes.get_ref();
        }
        if let Some(names) = &spec.ca_names {
            settings.ca_names = names
                .iter()
                .map(|n| {
                    crate::tls::CaName::parse(n.get_ref()).map_err(|m| source.error_at(n.span(), m))
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(runners) = &spec.ci_runners {
            settings.ci_runners.clone_from(runners);
        }
        if let Some(timeout) = spec.startup_timeout {
            settings.startup_timeout = timeout.max(Duration::from_millis(100));
        }
        if let Some(interval) = spec.resolve_interval {
            settings.resolve_interval = interval.max(Duration::from_secs(1));
        }
        Ok(settings)
    }
}

/// `[approvals]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApprovalSettings {
    pub webhook_url: Option<url::Url>,
    pub webhook_ca_file: Option<std::path::PathBuf>,
    pub callback_listen: Option<std::net::SocketAddr>,
    /// The callback's bearer token and the HMAC key of payloads.
    pub token: Option<std::sync::Arc<crate::policy::Secret>>,
    pub webhook_format: WebhookFormat,
    /// Where approvers' browsers reach the callback (for signed links).
    pub callback_url: Option<url::Url>,
}

/// What the webhook posts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WebhookFormat {
    /// `{"event", "text", "request"}`.
    #[default]
    Json,
    /// A Slack incoming-webhook message: `text`, and blocks with the
    /// request's details and approve/deny links.
    Slack,
}
