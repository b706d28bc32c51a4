//! Configuration and policy files, format v1 (docs/POLICY.md).
//!
//! One main file (`[agent]` plus any `[[target]]`, `[[workload]]`, `[[rule]]`)
//! and optionally a `policy_dir` of `*.toml` files with more of the latter
//! three. Every error names its file, line and column; nothing half-loaded is
//! ever returned, so a bad reload leaves the running policy untouched.
mod file;
mod settings;

pub use settings::{
    AgentSettings, ApprovalSettings, CgroupSetting, DEFAULT_ADMIN_SOCKET, DEFAULT_CONFIG_PATH, Mode,
};

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use crate::policy::{
    ApprovalSpec, Approver, Credential, GrantSpec, NamedWorkload, Pattern, Policy, Protocol, Rule,
    Secret, Target, TargetAddress, TargetId, UpstreamTls,
};
use file::{FileSpec, Located, SourceFile};

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
}

/// A fully loaded configuration: agent settings and a validated policy.
#[derive(Clone, Debug)]
pub struct Config {
    pub agent: AgentSettings,
    pub sessions: crate::sessions::SessionSettings,
    /// Where ended sessions are shipped; none keeps them local.
    pub shipper: Option<crate::sessions::ShipperSettings>,
    pub approvals: ApprovalSettings,
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

    /// Loads a configuration held in memory (the embedded demo); `name` is
    /// what errors call it.
    pub fn from_text(name: &str, text: &str) -> Result<Self, ConfigError> {
        Self::from_main(SourceFile::new(PathBuf::from(name), text.to_owned()))
    }

    fn from_main(main: SourceFile) -> Result<Self, ConfigError> {
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

        let mut files = vec![(main, main_spec)];
        if let Some(dir) = &agent.policy_dir {
            for path in policy_files(dir)? {
                let source = SourceFile::read(&path)?;
                let spec = source.parse()?;
                if let Some(agent) = &spec.agent {
                    return Err(source.error_at(agent.span(), "[agent] belongs in the main configuration file, not in the policy directory"));
                }
                if let Some(span) = spec
                    .sessions
                    .as_ref()
                    .map(|s| s.span())
                    .or(spec.shipper.as_ref().map(|s| s.span()))
                    .or(spec.approvals.as_ref().map(|s| s.span()))
                {
                    return Err(source.error_at(span, "[sessions], [shipper] and [approvals] belong in the main configuration file, not in the policy directory"));
                }
                files.push((source, spec));
            }
        }
        let policy = build_policy(&files)?;
        let sources = files.into_iter().map(|(source, _)| source.path).collect();
        Ok(Self {
            agent,
            sessions,
            shipper,
            approvals,
            policy,
            sources,
        })
    }
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

/// Reads a target's password file.
fn read_credential(
    source: &SourceFile,
    spec: &Located<file::CredentialSpec>,
) -> Result<Credential, ConfigError> {
    let Some(file) = &spec.get_ref().password_file else {
        return Err(source.error_at(spec.span(), "a postgres credential needs password_file"));
    };
    let (path, at) = (file.get_ref(), file.span());
    Ok(Credential {
        user: spec.get_ref().user.clone(),
        password: read_secret_file(source, path, at, "password_file")?,
    })
}

thread_local! {
    /// The uid that must own secret files: root, whom the agent runs as.
    /// Unit tests run unprivileged: theirs is the user running them.
    static SECRET_OWNER: u32 = if cfg!(test) {
        nix::unistd::geteuid().as_raw()
    } else {
        0
    };
}

/// Reads a secret from a file. It must be a regular file owned by root and
/// readable by its owner only (0600 or stricter); the secret itself is never
/// put in an error or a log.
fn read_secret_file(
    source: &SourceFile,
    path: &Path,
    at: std::ops::Range<usize>,
    field: &str,
) -> Result<Secret, ConfigError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| source.error_at(at.clone(), format!("{field} {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(source.error_at(
            at,
            format!("{field} {} is not a regular file", path.display()),
        ));
    }
    if meta.mode() & 0o077 != 0 || meta.uid() != SECRET_OWNER.with(|owner| *owner) {
        return Err(source.error_at(
            at,
            format!(
                "{field} {} must be owned by root with mode 0600 (it is uid {}, mode {:04o})",
                path.display(),
                meta.uid(),
                meta.mode() & 0o7777
            ),
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| source.error_at(at.clone(), format!("{field} {}: {e}", path.display())))?;
    let secret = text.trim_end_matches(['\n', '\r']).to_owned();
    if secret.is_empty() {
        return Err(source.error_at(at, format!("{field} {} is empty", path.display())));
    }
    Ok(Secret::new(secret))
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

/// Resolves names to indices and checks every cross-reference.
fn build_policy(files: &[(SourceFile, FileSpec)]) -> Result<Policy, ConfigError> {
    let mut policy = Policy::default();
    let mut target_ids: HashMap<String, TargetId> = HashMap::new();
    let mut workload_ids: HashMap<String, usize> = HashMap::new();
    let mut rule_names: HashMap<String, ()> = HashMap::new();

    for (source, spec) in files {
        for target in &spec.target {
            let name = unique_name(
                source,
                &target.get_ref().name,
                &mut target_ids,
                TargetId(policy.targets.len()),
                "target",
            )?;
            let address = TargetAddress::parse(target.get_ref().address.get_ref())
                .map_err(|message| source.error_at(target.get_ref().address.span(), message))?;
            let protocol = *target.get_ref().protocol.get_ref();
            let spec = target.get_ref();
            let (credential, ssh) = match (&spec.credential, protocol) {
                (Some(credential), Protocol::Postgres) => {
                    (Some(read_credential(source, credential)?), None)
                }
                (Some(credential), Protocol::Ssh) => (
                    None,
                    Some(std::sync::Arc::new(ssh_upstream(
                        source, target, credential,
                    )?)),
                ),
                (None, Protocol::Postgres | Protocol::Ssh) => {
                    return Err(source.error_at(
                        target.span(),
                        format!(
                            "{} target {name:?} needs a [target.credential] (user, and {})",
                            protocol.as_str(),
                            if protocol == Protocol::Ssh {
                                "private_key_file or password_file"
                            } else {
                                "password_file"
                            }
                        ),
                    ));
                }
                (Some(credential), Protocol::Tcp) => {
                    return Err(source.error_at(
                        credential.span(),
                        "a credential applies to protocol = \"postgres\" or \"ssh\"",
                    ));
                }
                (None, Protocol::Tcp) => (None, None),
            };
            let host_key_fields = [
                spec.known_hosts.as_ref().map(|k| k.span()),
                spec.host_key_fingerprint.as_ref().map(|k| k.span()),
            ];
            if let (Some(at), false) = (
                host_key_fields.into_iter().flatten().next(),
                protocol == Protocol::Ssh,
            ) {
                return Err(source.error_at(
                    at,
                    "known_hosts and host_key_fingerprint apply to protocol = \"ssh\"",
                ));
            }
            let masks = compile_masks(source, spec.mask.as_deref())?;
            if let (Some(mask), Protocol::Tcp) =
                (spec.mask.as_ref().and_then(|m| m.first()), protocol)
            {
                return Err(source.error_at(
                    mask.span(),
                    "mask applies to protocol = \"postgres\" or \"ssh\" (a tcp target is copied as it is)",
                ));
            }
            if let (Some(mask), Protocol::Ssh) = (
                spec.mask
                    .as_ref()
                    .and_then(|m| m.iter().find(|m| m.get_ref().column.is_some())),
                protocol,
            ) {
                return Err(source.error_at(
                    mask.span(),
                    "an ssh target masks by pattern or regex (its output has no columns)",
                ));
            }
            if let (Some(tls), Protocol::Tcp | Protocol::Ssh) = (&spec.tls, protocol) {
                return Err(source.error_at(tls.span(), "tls applies to protocol = \"postgres\""));
            }
            policy.targets.push(Target {
                name,
                protocol,
                address,
                credential,
                tls: spec
                    .tls
                    .as_ref()
                    .map_or(UpstreamTls::default(), |t| *t.get_ref()),
                tls_ca_file: spec.tls_ca_file.clone(),
                masks,
                record: spec.record.unwrap_or_default(),
                ssh,
            });
        }
        for workload in &spec.workload {
            let name = unique_name(
                source,
                &workload.get_ref().name,
                &mut workload_ids,
                policy.workloads.len(),
                "workload",
            )?;
            let selector = workload
                .get_ref()
                .selector()
                .map_err(|message| source.error_at(workload.span(), message))?;
            policy.workloads.push(NamedWorkload { name, selector });
        }
    }

    // Rules may name targets and workloads from any file, so they come last.
    for (source, spec) in files {
        for located in &spec.rule {
            let rule = located.get_ref();
            let name = unique_name(source, &rule.name, &mut rule_names, (), "rule")?;
            let at = located.span();
            let workloads = resolve_names(
                source,
                at.clone(),
                &rule.workloads,
                &workload_ids,
                "workload",
            )?;
            let targets = resolve_names(source, at, &rule.targets, &target_ids, "target")?;
            let statements = rule
                .statements
                .as_ref()
                .map(|kinds| kinds.get_ref().iter().copied().collect());
            let globs = |field: &str, list: &Option<Located<Vec<String>>>| match list {
                None => Ok(Vec::new()),
                Some(list) => list
                    .get_ref()
                    .iter()
                    .map(|t| {
                        Pattern::new(t).map_err(|e| {
                            source.error_at(list.span(), format!("{field}: bad pattern {t:?}: {e}"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>(),
            };
            let tables = globs("tables", &rule.tables)?;
            let functions = globs("functions", &rule.functions)?;
            if let Some(role) = &rule.as_user
                && (rule.decision != crate::policy::Action::Allow || role.get_ref().is_empty())
            {
                return Err(source.error_at(role.span(), "as_user names a role, on an allow rule"));
            }
            if let Some(unparsed) = &rule.unparsed
                && rule.decision != crate::policy::Action::Allow
            {
                return Err(source.error_at(
                    unparsed.span(),
                    "unparsed applies to allow rules (unparsed statements are denied anyway)",
                ));
            }
            let mut masks = compile_masks(source, rule.mask.as_deref())?;
            if let Some(setting) = &rule.mask_expressions {
                if rule.mask.as_ref().is_none_or(|m| m.is_empty()) {
                    return Err(source.error_at(
                        setting.span(),
                        "mask_expressions applies to a rule with masks",
                    ));
                }
                let allowed = *setting.get_ref() == file::Unparsed::Allow;
                for mask in &mut masks {
                    mask.expressions_allowed = allowed;
                }
            }
            if let Some(mask) = rule.mask.as_ref().and_then(|m| m.first())
                && rule.decision != crate::policy::Action::Allow
            {
                return Err(source.error_at(
                    mask.span(),
                    "mask applies to allow rules (a denied statement returns nothing)",
                ));
            }
            // Fields about one protocol only make sense on rules for its
            // targets.
            let for_protocols =
                |fields: &[Option<std::ops::Range<usize>>], protocols: &[Protocol], what: &str| {
                    let Some(at) = fields.iter().flatten().next() else {
                        return Ok(());
                    };
                    let other = targets.as_ref().and_then(|ids| {
                        ids.iter()
                            .find(|id| !protocols.contains(&policy.targets[id.0].protocol))
                    });
                    match other {
                        Some(id) => Err(source.error_at(
                            at.clone(),
                            format!("{what}; {:?} is not one", policy.targets[id.0].name),
                        )),
                        None => Ok(()),
                    }
                };
            for_protocols(
                &[
                    rule.statements.as_ref().map(|s| s.span()),
                    rule.tables.as_ref().map(|t| t.span()),
                    rule.functions.as_ref().map(|t| t.span()),
                    rule.as_user.as_ref().map(|u| u.span()),
                ],
                &[Protocol::Postgres],
                "statements, tables, functions and as_user apply to postgres targets",
            )?;
            for_protocols(
                &[rule.mask.as_ref().and_then(|m| m.first()).map(|m| m.span())],
                &[Protocol::Postgres, Protocol::Ssh],
                "mask applies to postgres and ssh targets",
            )?;
            // A column mask cannot apply to an SSH target's output: on a
            // rule naming one, it would be dropped there, so it is refused.
            let column_mask = rule
                .mask
                .iter()
                .flatten()
                .zip(&masks)
                .find_map(|(spec, mask)| (!mask.selects.is_free_text()).then(|| spec.span()));
            for_protocols(
                &[column_mask],
                &[Protocol::Postgres],
                "a column mask applies to postgres targets (SSH output has no columns: mask it by pattern or regex)",
            )?;
            for_protocols(
                &[
                    rule.commands.as_ref().map(|c| c.span()),
                    rule.shell.as_ref().map(|c| c.span()),
                    rule.subsystems.as_ref().map(|c| c.span()),
                    rule.forward.as_ref().map(|c| c.span()),
                    rule.users.as_ref().map(|c| c.span()),
                    rule.env.as_ref().map(|c| c.span()),
                    rule.pty.as_ref().map(|c| c.span()),
                ],
                &[Protocol::Ssh],
                "commands, shell, subsystems, forward, users, env and pty apply to ssh targets",
            )?;
            let ssh = ssh_requests(source, rule)?;
            let approval = approval_spec(source, located)?;
            policy.rules.push(Rule {
                name,
                description: rule.description.clone(),
                workloads,
                targets,
                action: rule.decision,
                statements,
                tables,
                functions,
                as_user: rule.as_user.as_ref().map(|u| u.get_ref().clone()),
                masks,
                allow_unparsed: matches!(
                    rule.unparsed.as_ref().map(|u| *u.get_ref()),
                    Some(file::Unparsed::Allow)
                ),
                approval,
                ssh,
            });
        }
    }
    Ok(policy)
}

/// The SSH fields of a rule.
fn ssh_requests(
    source: &SourceFile,
    rule: &file::RuleSpec,
) -> Result<crate::policy::SshRequests, ConfigError> {
    let globs = |field: &str, list: &Option<Located<Vec<String>>>| {
        list.as_ref().map_or(Ok(Vec::new()), |l| {
            l.get_ref()
                .iter()
                .map(|g| {
                    Pattern::new(g).map_err(|e| {
                        source.error_at(l.span(), format!("{field}: bad pattern {g:?}: {e}"))
                    })
                })
                .collect()
        })
    };
    let commands = rule
        .commands
        .as_ref()
        .map(|list| {
            list.get_ref()
                .iter()
                .map(|c| {
                    crate::policy::CommandPattern::new(c.get_ref())
                        .map_err(|m| source.error_at(c.span(), format!("commands: {m}")))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let forward = rule.forward.as_ref().map_or(Ok(Vec::new()), |list| {
        list.get_ref()
            .iter()
            .map(|entry| {
                let text = entry.get_ref();
                let bad = || {
                    source.error_at(
                        entry.span(),
                        format!("forward: {text:?} is not host:port (the host may be a glob)"),
                    )
                };
                let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
                let port: u16 = port.parse().map_err(|_| bad())?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                Ok((Pattern::new(host).map_err(|_| bad())?, port))
            })
            .collect::<Result<Vec<_>, ConfigError>>()
    })?;
    if let Some(shell) = rule.shell.as_ref().filter(|s| !*s.get_ref()) {
        return Err(source.error_at(
            shell.span(),
            "shell = true makes a rule about interactive shells; leave it out otherwise",
        ));
    }
    if let (Some(forward), false) = (&rule.forward, rule.decision == crate::policy::Action::Allow) {
        return Err(source.error_at(
            forward.span(),
            "forward applies to allow rules (forwarding is refused unless allowed)",
        ));
    }
    Ok(crate::policy::SshRequests {
        commands,
        shell: rule.shell.as_ref().is_some_and(|s| *s.get_ref()),
        subsystems: rule
            .subsystems
            .as_ref()
            .map(|s| s.get_ref().clone())
            .unwrap_or_default(),
        forward,
        users: globs("users", &rule.users)?,
        env: globs("env", &rule.env)?,
        pty: rule.pty.as_ref().map(|p| *p.get_ref()),
    })
}

/// The upstream side of an SSH target: its credential and how its host
/// key is checked.
fn ssh_upstream(
    source: &SourceFile,
    target: &Located<file::TargetSpec>,
    credential: &Located<file::CredentialSpec>,
) -> Result<crate::policy::SshUpstream, ConfigError> {
    use crate::policy::{HostKeyCheck, SshAuth};
    let spec = target.get_ref();
    let cred = credential.get_ref();
    let auth = match (&cred.private_key_file, &cred.password_file) {
        (Some(key_file), None) => {
            let text = read_secret_file(
                source,
                key_file.get_ref(),
                key_file.span(),
                "private_key_file",
            )?;
            let key = russh::keys::decode_secret_key(text.expose(), None).map_err(|e| {
                source.error_at(
                    key_file.span(),
                    format!(
                        "private_key_file {}: not an unencrypted OpenSSH private key ({e})",
                        key_file.get_ref().display()
                    ),
                )
            })?;
            let certificate = cred
                .certificate_file
                .as_ref()
                .map(|file| {
                    russh::keys::load_openssh_certificate(file.get_ref())
                        .map(Box::new)
                        .map_err(|e| {
                            source.error_at(
                                file.span(),
                                format!("certificate_file {}: {e}", file.get_ref().display()),
                            )
                        })
                })
                .transpose()?;
            SshAuth::Key {
                key: std::sync::Arc::new(key),
                certificate,
            }
        }
        (None, Some(password_file)) => {
            if let Some(cert) = &cred.certificate_file {
                return Err(
                    source.error_at(cert.span(), "certificate_file goes with private_key_file")
                );
            }
            SshAuth::Password(read_secret_file(
                source,
                password_file.get_ref(),
                password_file.span(),
                "password_file",
            )?)
        }
        _ => {
            return Err(source.error_at(
                credential.span(),
                "an ssh credential has one of private_key_file or password_file",
            ));
        }
    };
    let host_key = match (&spec.known_hosts, &spec.host_key_fingerprint) {
        (Some(file), None) => {
            std::fs::metadata(file.get_ref()).map_err(|e| {
                source.error_at(
                    file.span(),
                    format!("known_hosts {}: {e}", file.get_ref().display()),
                )
            })?;
            HostKeyCheck::KnownHosts(file.get_ref().clone())
        }
        (None, Some(fingerprint)) => {
            let text = fingerprint.get_ref();
            if !text.starts_with("SHA256:") || text.len() < 20 {
                return Err(source.error_at(
                    fingerprint.span(),
                    format!("host_key_fingerprint {text:?} is not \"SHA256:...\" as ssh-keygen -l prints it"),
                ));
            }
            HostKeyCheck::Fingerprint(text.clone())
        }
        _ => {
            return Err(source.error_at(
                target.span(),
                "an ssh target names the server's key: known_hosts (a file) or host_key_fingerprint (\"SHA256:...\"), one of them",
            ));
        }
    };
    Ok(crate::policy::SshUpstream {
        user: cred.user.clone(),
        auth,
        host_key,
    })
}

/// How long a client waits for an answer unless the rule says.
pub const DEFAULT_APPROVAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// The approval fields of a rule: required on `decision = "approve"`,
/// refused anywhere else.
fn approval_spec(
    source: &SourceFile,
    located: &Located<file::RuleSpec>,
) -> Result<Option<std::sync::Arc<ApprovalSpec>>, ConfigError> {
    let rule = located.get_ref();
    if rule.decision != crate::policy::Action::Approve {
        let stray = [
            rule.approvers.as_ref().map(|a| a.span()),
            rule.min_approvals.as_ref().map(|m| m.span()),
            rule.timeout.as_ref().map(|t| t.span()),
            rule.grant.as_ref().map(|g| g.span()),
        ];
        return match stray.into_iter().flatten().next() {
            Some(at) => Err(source.error_at(
                at,
                "approvers, min_approvals, timeout and grant apply to decision = \"approve\"",
            )),
            None => Ok(None),
        };
    }
    let Some(list) = rule.approvers.as_ref().filter(|a| !a.get_ref().is_empty()) else {
        return Err(source.error_at(
            located.span(),
            "decision = \"approve\" needs approvers (user, \"uid:N\", \"group:NAME\" or \"webhook:NAME\")",
        ));
    };
    let approvers = list
        .get_ref()
        .iter()
        .map(|a| {
            Approver::parse(a.get_ref())
                .map_err(|m| source.error_at(a.span(), format!("approvers: {m}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let min_approvals = match &rule.min_approvals {
        None => 1,
        Some(n) if *n.get_ref() == 0 => {
            return Err(source.error_at(n.span(), "min_approvals must be at least 1"));
        }
        Some(n) => *n.get_ref(),
    };
    let duration = |field: &str, text: &Located<String>| {
        humantime::parse_duration(text.get_ref())
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                source.error_at(
                    text.span(),
                    format!(
                        "{field}: {:?} is not a duration such as \"5m\" or \"30m\"",
                        text.get_ref()
                    ),
                )
            })
    };
    let timeout = match &rule.timeout {
        None => DEFAULT_APPROVAL_TIMEOUT,
        Some(text) => duration("timeout", text)?,
    };
    let grant = match &rule.grant {
        None => GrantSpec::Once,
        Some(text) if text.get_ref() == "once" => GrantSpec::Once,
        Some(text) => GrantSpec::For(duration("grant (\"once\" or a duration)", text)?),
    };
    Ok(Some(std::sync::Arc::new(ApprovalSpec {
        approvers,
        min_approvals,
        timeout,
        grant,
    })))
}

/// Compiles `mask = [...]`; an error points at the entry.
fn compile_masks(
    source: &SourceFile,
    specs: Option<&[Located<crate::policy::MaskSpec>]>,
) -> Result<Vec<crate::policy::Mask>, ConfigError> {
    specs
        .unwrap_or_default()
        .iter()
        .map(|spec| {
            spec.get_ref()
                .compile()
                .map_err(|message| source.error_at(spec.span(), format!("mask: {message}")))
        })
        .collect()
}

fn unique_name<T>(
    source: &SourceFile,
    name: &Located<String>,
    seen: &mut HashMap<String, T>,
    value: T,
    kind: &str,
) -> Result<String, ConfigError> {
    let text = name.get_ref();
    if text.is_empty() || text == "*" {
        return Err(source.error_at(name.span(), format!("{text:?} cannot be a {kind} name")));
    }
    if seen.insert(text.clone(), value).is_some() {
        return Err(source.error_at(name.span(), format!("{kind} {text:?} is defined twice")));
    }
    Ok(text.clone())
}

/// `["*"]` means any; otherwise every name must be defined somewhere.
fn resolve_names<T: Copy>(
    source: &SourceFile,
    rule_at: std::ops::Range<usize>,
    names: &[Located<String>],
    ids: &HashMap<String, T>,
    kind: &str,
) -> Result<Option<Vec<T>>, ConfigError> {
    if names.is_empty() {
        return Err(source.error_at(
            rule_at,
            format!("a rule must name at least one {kind} (or \"*\")"),
        ));
    }
    if names.iter().any(|n| n.get_ref() == "*") {
        return Ok(None);
    }
    names
        .iter()
        .map(|n| {
            ids.get(n.get_ref()).copied().ok_or_else(|| {
                source.error_at(n.span(), format!("unknown {kind} {:?}", n.get_ref()))
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

#[cfg(test)]
mod tests;
