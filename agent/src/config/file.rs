//! The on-disk shape of a configuration or policy file, and where in it an
//! error is.
use std::{ops::Range, path::PathBuf};

use serde::Deserialize;

use super::ConfigError;
use crate::policy::{
    Action, MaskSpec, Pattern, Protocol, RecordMode, StatementKind, UpstreamTls, WorkloadSelector,
};

pub type Located<T> = toml::Spanned<T>;

/// One file's text, kept so that byte spans become line and column.
#[derive(Debug)]
pub struct SourceFile {
    pub path: PathBuf,
    text: String,
}

impl SourceFile {
    pub fn new(path: PathBuf, text: String) -> Self {
        Self { path, text }
    }

    pub fn read(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_owned(),
            cause,
        })?;
        Ok(Self::new(path.to_owned(), text))
    }

    pub fn parse(&self) -> Result<FileSpec, ConfigError> {
        toml::from_str(&self.text).map_err(|e| {
            // toml's message repeats the location and a snippet; keep only
            // the sentence, since the location leads the line anyway.
            let message = e.message().trim().to_owned();
            self.error_at(e.span().unwrap_or(0..0), message)
        })
    }

    /// An error at a byte span, as `file:line:column: message` (1-based).
    pub fn error_at(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        ConfigError::Invalid {
            path: self.path.clone(),
            line,
            column,
            message: message.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    pub agent: Option<Located<AgentSpec>>,
    #[serde(default)]
    pub target: Vec<Located<TargetSpec>>,
    #[serde(default)]
    pub workload: Vec<Located<WorkloadSpec>>,
    #[serde(default)]
    pub rule: Vec<Located<RuleSpec>>,
    pub sessions: Option<Located<SessionsSpec>>,
    pub shipper: Option<Located<ShipperSpec>>,
    pub approvals: Option<Located<ApprovalsSpec>>,
    pub policy_source: Option<Located<PolicySourceSpec>>,
}

/// `[policy_source]`: signed policy bundles pulled from object storage or
/// a git repository.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySourceSpec {
    /// `s3://bucket/prefix/`, `file:///dir/`, or `git+https://…`,
    /// `git+ssh://…`, `git+file://…`.
    pub url: Located<String>,
    /// The bundle's object or file name under `url` (`policy.bundle`).
    pub bundle: Option<Located<String>>,
    /// Git: the branch or tag to follow (`main`).
    pub git_ref: Option<Located<String>>,
    #[serde(default, with = "humantime_serde")]
    pub interval: Option<std::time::Duration>,
    pub trusted_keys: Located<Vec<Located<String>>>,
    /// S3: as in `[shipper]`.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub credentials_file: Option<PathBuf>,
}

/// `[approvals]`: where requests are announced and answered from besides
/// the admin socket.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsSpec {
    /// HTTPS URL that receives each request and outcome as JSON.
    pub webhook_url: Option<Located<String>>,
    /// Extra CA bundle (PEM) for the webhook's certificate.
    pub webhook_ca_file: Option<PathBuf>,
    /// Address of the HTTP callback a chat bot or ticket system answers on.
    pub callback_listen: Option<Located<String>>,
    /// 0600 file with the shared secret: the callback's bearer token and
    /// the HMAC key of payloads both ways.
    pub token_file: Option<Located<PathBuf>>,
    /// `"json"` (the request record) or `"slack"` (an incoming-webhook
    /// message with approve and deny links).
    pub webhook_format: Option<Located<String>>,
    /// The callback as approvers reach it (behind a proxy, say), for the
    /// links in messages; default `http://{callback_listen}`.
    pub callback_url: Option<Located<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsSpec {
    /// Bytes, or a size such as `"2GiB"`.
    pub max_store_bytes: Option<Located<ByteSize>>,
    #[serde(default, with = "humantime_serde")]
    pub retention: Option<std::time::Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ByteSize {
    Bytes(u64),
    Text(String),
}

impl ByteSize {
    pub fn bytes(&self) -> Result<u64, String> {
        let text = match self {
            ByteSize::Bytes(n) => return Ok(*n),
            ByteSize::Text(text) => text.trim(),
        };
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a size such as \"512MiB\" or \"2GB\""))?;
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1000,
            "KiB" => 1 << 10,
            "MB" => 1000 * 1000,
            "MiB" => 1 << 20,
            "GB" => 1000 * 1000 * 1000,
            "GiB" => 1 << 30,
            "TB" => 1000_u64.pow(4),
            "TiB" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown size unit {other:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
                ));
            }
        };
        number
            .checked_mul(scale)
            .ok_or_else(|| format!("{text:?} is too large"))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShipperSpec {
    pub url: Located<String>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub credentials_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub part_interval: Option<std::time::Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    pub mode: Option<super::Mode>,
    pub state_dir: Option<PathBuf>,
    pub admin_socket: Option<PathBuf>,
    pub admins: Option<Vec<Located<String>>>,
    pub cgroup: Option<Located<String>>,
    pub policy_dir: Option<PathBuf>,
    pub listen_port: Option<u16>,
    /// No longer used; see `Settings`.
    pub bypass_mark: Option<u32>,
    pub bpffs_dir: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub resolve_interval: Option<std::time::Duration>,
    pub redact_literals: Option<bool>,
    pub access_log_statements: Option<bool>,
    /// Address of the Prometheus endpoint (`/metrics`); none: off.
    pub metrics_listen: Option<Located<String>>,
    pub max_statement_bytes: Option<Located<usize>>,
    pub ca_names: Option<Vec<Located<String>>>,
    #[serde(default, with = "humantime_serde")]
    pub startup_timeout: Option<std::time::Duration>,
    pub ci_runners: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    pub name: Located<String>,
    pub protocol: Located<Protocol>,
    pub address: Located<String>,
    pub credential: Option<Located<CredentialSpec>>,
    pub tls: Option<Located<UpstreamTls>>,
    pub tls_ca_file: Option<PathBuf>,
    /// SQL targets: values every workload sees masked.
    pub mask: Option<Vec<Located<MaskSpec>>>,
    /// What sessions to this target record.
    pub record: Option<RecordMode>,
    /// SSH targets: an OpenSSH known_hosts file with the server's key.
    pub known_hosts: Option<Located<PathBuf>>,
    /// SSH targets: the server key's `SHA256:...` fingerprint.
    pub host_key_fingerprint: Option<Located<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSpec {
    /// The user name (postgres, ssh; with `password_file`, HTTP basic).
    pub user: Option<String>,
    pub password_file: Option<Located<PathBuf>>,
    /// HTTP targets: a token sent as `Authorization: Bearer …`.
    pub bearer_token_file: Option<Located<PathBuf>>,
    /// HTTP targets: a header of the target's own naming (`X-Api-Key`),
    /// whose value is in `value_file`.
    pub header: Option<Located<String>>,
    pub value_file: Option<Located<PathBuf>>,
    /// HTTP targets: a client certificate (PEM, with its chain) presented
    /// to the server, and its key (root, 0600).
    pub client_certificate_file: Option<Located<PathBuf>>,
    pub client_key_file: Option<Located<PathBuf>>,
    /// SSH targets: an OpenSSH private key (unencrypted; root 0600).
    pub private_key_file: Option<Located<PathBuf>>,
    /// SSH targets: an OpenSSH certificate for that key.
    pub certificate_file: Option<Located<PathBuf>>,
}

/// Each field takes one value or a list of values.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

/// The values of an optional one-or-many field; unset is empty.
fn list<T: Clone>(field: &Option<OneOrMany<T>>) -> Vec<T> {
    match field {
        None => Vec::new(),
        Some(OneOrMany::One(v)) => vec![v.clone()],
        Some(OneOrMany::Many(v)) => v.clone(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    pub name: Located<String>,
    #[expect(dead_code, reason = "documentation for readers of the file")]
    pub description: Option<String>,
    pub unit: Option<OneOrMany<String>>,
    pub uid: Option<OneOrMany<u32>>,
    pub user: Option<OneOrMany<String>>,
    pub group: Option<OneOrMany<String>>,
    pub exe: Option<OneOrMany<String>>,
    pub exe_sha256: Option<OneOrMany<String>>,
    pub cgroup: Option<OneOrMany<String>>,
    pub container: Option<OneOrMany<String>>,
    pub comm: Option<OneOrMany<String>>,
    pub ci_project: Option<OneOrMany<String>>,
    pub ci_ref: Option<OneOrMany<String>>,
    pub ci_job: Option<OneOrMany<String>>,
}

impl WorkloadSpec {
    pub fn selector(&self) -> Result<WorkloadSelector, String> {
        fn globs(field: &str, values: &Option<OneOrMany<String>>) -> Result<Vec<Pattern>, String> {
            list(values)
                .into_iter()
                .map(|v| Pattern::new(&v).map_err(|e| format!("{field}: bad pattern {v:?}: {e}")))
                .collect()
        }

        let exe_sha256 = list(&self.exe_sha256);
        if let Some(bad) = exe_sha256
            .iter()
            .find(|d| d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(format!("exe_sha256: {bad:?} is not a hex SHA-256 digest"));
        }
        let cgroup = list(&self.cgroup);
        if let Some(bad) = cgroup.iter().find(|c| !c.starts_with('/')) {
            return Err(format!(
                "cgroup: {bad:?} must be an absolute cgroup path such as \"/system.slice\""
            ));
        }
        let selector = WorkloadSelector {
            unit: globs("unit", &self.unit)?,
            uid: list(&self.uid),
            user: globs("user", &self.user)?,
            group: globs("group", &self.group)?,
            exe: globs("exe", &self.exe)?,
            exe_sha256: exe_sha256
                .into_iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
            cgroup,
            container: globs("container", &self.container)?,
            comm: globs("comm", &self.comm)?,
            ci_project: globs("ci_project", &self.ci_project)?,
            ci_ref: globs("ci_ref", &self.ci_ref)?,
            ci_job: globs("ci_job", &self.ci_job)?,
        };
        if selector.is_empty() {
            return Err(format!(
                "workload {:?} selects nothing: set at least one of unit, uid, user, group, exe, exe_sha256, cgroup, container, comm, ci_project, ci_ref, ci_job",
                self.name.get_ref()
            ));
        }
        Ok(selector)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: Located<String>,
    pub description: Option<String>,
    pub workloads: Vec<Located<String>>,
    pub targets: Vec<Located<String>>,
    pub decision: Action,
    /// SQL targets: the statement kinds the rule is about.
    pub statements: Option<Located<Vec<StatementKind>>>,
    /// SQL targets: `schema.table` globs the rule is about.
    pub tables: Option<Located<Vec<String>>>,
    /// SQL targets: `schema.function` globs the rule is about.
    pub functions: Option<Located<Vec<String>>>,
    /// SQL targets: what an allow rule does with statements that do not
    /// parse; `deny` unless set.
    pub unparsed: Option<Located<Unparsed>>,
    /// `false`: the rule is rolled out in audit (what it would refuse is
    /// logged and passes); `true` unless set.
    pub enforce: Option<bool>,
    /// SQL targets: the role sessions admitted by this rule take.
    pub as_user: Option<Located<String>>,
    /// SQL targets: values this rule's workloads see masked.
    pub mask: Option<Vec<Located<MaskSpec>>>,
    /// SQL targets: `allow` lets statements use this rule's masked columns
    /// where the mask cannot follow them (the values leave unmasked).
    pub mask_expressions: Option<Located<Unparsed>>,
    /// `decision = "approve"`: who may say yes (`user`, `uid:N`,
    /// `group:NAME`, `webhook:NAME`).
    pub approvers: Option<Located<Vec<Located<String>>>>,
    pub min_approvals: Option<Located<u32>>,
    /// How long the client waits, e.g. `"5m"`.
    pub timeout: Option<Located<String>>,
    /// `"once"` or a duration such as `"30m"`.
    pub grant: Option<Located<String>>,
    /// `decision = "approve"`: a request without a stated reason is
    /// refused at once.
    pub require_reason: Option<Located<bool>>,
    /// `decision = "approve"`: a grant may be asked for up front
    /// (`interlock request`), for at most `max_duration`.
    pub requestable: Option<Located<bool>>,
    pub max_duration: Option<Located<String>>,
    /// SSH targets: exec command patterns, e.g. `"systemctl restart app*"`.
    pub commands: Option<Located<Vec<Located<String>>>>,
    /// SSH targets: whether the rule is about interactive shells.
    pub shell: Option<Located<bool>>,
    /// SSH targets: subsystems, e.g. `["sftp"]`.
    pub subsystems: Option<Located<Vec<String>>>,
    /// SSH targets: `host:port` destinations of `ssh -L`.
    pub forward: Option<Located<Vec<Located<String>>>>,
    /// SSH targets: the SSH users (as the client asked) the rule is for.
    pub users: Option<Located<Vec<String>>>,
    /// SSH targets: environment variables passed on (globs).
    pub env: Option<Located<Vec<String>>>,
    /// SSH targets: `false` refuses terminals.
    pub pty: Option<Located<bool>>,
    /// HTTP targets: request methods, e.g. `["GET", "HEAD"]`.
    pub methods: Option<Located<Vec<String>>>,
    /// HTTP targets: globs on the normalised path, e.g. `"/api/v1/**"`.
    pub paths: Option<Located<Vec<String>>>,
    /// HTTP targets: globs on the host the client named.
    pub hosts: Option<Located<Vec<String>>>,
    /// Kubernetes targets: kube-apiserver verbs, and `exec`, `attach`,
    /// `portforward`, `proxy`.
    pub verbs: Option<Located<Vec<String>>>,
    /// Kubernetes targets: `[group/]resource[/subresource]` globs, e.g.
    /// `"pods"`, `"pods/log"`, `"apps/deployments"`.
    pub resources: Option<Located<Vec<String>>>,
    /// Kubernetes targets: namespace globs.
    pub namespaces: Option<Located<Vec<String>>>,
    /// Kubernetes targets: object name globs.
    pub names: Option<Located<Vec<String>>>,
    /// Kubernetes targets, allow rules: the Secrets the rule allows come
    /// unmasked (their data is masked otherwise).
    pub reveal_secrets: Option<Located<bool>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unparsed {
    Allow,
    Deny,
}
