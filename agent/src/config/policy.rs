//! The policy files' `[[target]]`, `[[workload]]` and `[[rule]]` tables,
//! built into a [`Policy`]: names resolved to ids, every cross-reference
//! and every field's protocol checked, each error at its file, line and
//! column.
use std::collections::HashMap;

use super::{
    ConfigError,
    file::{self, FileSpec, Located, SourceFile},
    secrets::{read_credential, read_secret_file},
};
use crate::policy::{
    ApprovalSpec, Approver, GrantSpec, NamedWorkload, Pattern, Policy, Protocol, Rule, Target,
    TargetAddress, TargetId, UpstreamTls,
};

/// Resolves names to ids and checks every cross-reference.
pub(super) fn build_policy(files: &[(SourceFile, FileSpec)]) -> Result<Policy, ConfigError> {
    let mut policy = Policy::default();
    let mut names = Names::default();
    for (source, spec) in files {
        for target in &spec.target {
            let id = TargetId(policy.targets.len());
            let name = unique_name(
                source,
                &target.get_ref().name,
                &mut names.targets,
                id,
                "target",
            )?;
            policy.targets.push(build_target(source, target, name)?);
        }
        for workload in &spec.workload {
            let name = unique_name(
                source,
                &workload.get_ref().name,
                &mut names.workloads,
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
            let name = unique_name(source, &rule.name, &mut names.rules, (), "rule")?;
            let rule = build_rule(source, located, name, &policy, &names)?;
            policy.rules.push(rule);
        }
    }
    Ok(policy)
}

/// Names seen so far, and what they stand for.
#[derive(Default)]
struct Names {
    targets: HashMap<String, TargetId>,
    workloads: HashMap<String, usize>,
    rules: HashMap<String, ()>,
}

/// One `[[target]]`.
fn build_target(
    source: &SourceFile,
    target: &Located<file::TargetSpec>,
    name: String,
) -> Result<Target, ConfigError> {
    let address = TargetAddress::parse(target.get_ref().address.get_ref())
        .map_err(|message| source.error_at(target.get_ref().address.span(), message))?;
    let protocol = *target.get_ref().protocol.get_ref();
    let spec = target.get_ref();
    let held = target_credential(source, target, &name, protocol)?;
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
    if let (Some(mask), Protocol::Tcp) = (spec.mask.as_ref().and_then(|m| m.first()), protocol) {
        return Err(source.error_at(
            mask.span(),
            "mask applies to protocol = \"postgres\" or \"ssh\" (a tcp target is copied as it is)",
        ));
    }
    // Each protocol masks what it can read: columns and text (postgres),
    // text (ssh), JSON values and text (http).
    let refused = spec.mask.iter().flatten().find_map(|mask| {
        let m = mask.get_ref();
        let why = match protocol {
            Protocol::Ssh if m.column.is_some() => {
                "an ssh target masks by pattern or regex (its output has no columns)"
            }
            Protocol::Postgres | Protocol::Ssh if m.json.is_some() => {
                "a json mask applies to http and kubernetes targets"
            }
            Protocol::Http | Protocol::Kubernetes if m.column.is_some() => {
                "an http target masks by json, pattern or regex (its answers have no columns)"
            }
            _ => return None,
        };
        Some((mask.span(), why))
    });
    if let Some((at, why)) = refused {
        return Err(source.error_at(at, why));
    }
    if let (Some(tls), Protocol::Tcp | Protocol::Ssh) = (&spec.tls, protocol) {
        return Err(source.error_at(
            tls.span(),
            "tls applies to protocol = \"postgres\" or \"http\"",
        ));
    }
    Ok(Target {
        name,
        protocol,
        address,
        credential: held.postgres,
        tls: spec
            .tls
            .as_ref()
            .map_or(UpstreamTls::default(), |t| *t.get_ref()),
        tls_ca_file: spec.tls_ca_file.clone(),
        masks,
        record: spec.record.unwrap_or_default(),
        ssh: held.ssh,
        http: held.http,
        client_identity: held.client_identity,
    })
}

/// What the agent holds for a target: a PostgreSQL credential, how it
/// logs in to an SSH server, or what it adds to HTTP requests.
#[derive(Default)]
struct HeldCredential {
    postgres: Option<crate::policy::Credential>,
    ssh: Option<std::sync::Arc<crate::policy::SshUpstream>>,
    http: Option<std::sync::Arc<crate::policy::HttpCredential>>,
    client_identity: Option<std::sync::Arc<crate::policy::ClientIdentity>>,
}

/// A target's credential: a password for PostgreSQL, a key, certificate
/// or password (and the server's key) for SSH, none for TCP.
fn target_credential(
    source: &SourceFile,
    target: &Located<file::TargetSpec>,
    name: &str,
    protocol: Protocol,
) -> Result<HeldCredential, ConfigError> {
    let spec = target.get_ref();
    Ok(match (&spec.credential, protocol) {
        (Some(credential), Protocol::Postgres) => HeldCredential {
            postgres: Some(read_credential(source, credential)?),
            ..Default::default()
        },
        (Some(credential), Protocol::Ssh) => HeldCredential {
            ssh: Some(std::sync::Arc::new(ssh_upstream(
                source, target, credential,
            )?)),
            ..Default::default()
        },
        (Some(credential), Protocol::Http | Protocol::Kubernetes) => {
            let client_identity = client_identity(source, credential)?;
            let spec = credential.get_ref();
            let has_header = spec.bearer_token_file.is_some()
                || spec.user.is_some()
                || spec.password_file.is_some()
                || spec.header.is_some()
                || spec.value_file.is_some();
            HeldCredential {
                // A client certificate may be the whole credential.
                http: (has_header || client_identity.is_none())
                    .then(|| http_credential(source, credential))
                    .transpose()?
                    .map(std::sync::Arc::new),
                client_identity: client_identity.map(std::sync::Arc::new),
                ..Default::default()
            }
        }
        // An HTTP target without one passes the client's own on.
        (None, Protocol::Http | Protocol::Kubernetes) => HeldCredential::default(),
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
                "a credential applies to protocol = \"postgres\", \"ssh\" or \"http\"",
            ));
        }
        (None, Protocol::Tcp) => HeldCredential::default(),
    })
}

/// An HTTP target's client certificate and key, if it has one.
fn client_identity(
    source: &SourceFile,
    located: &Located<file::CredentialSpec>,
) -> Result<Option<crate::policy::ClientIdentity>, ConfigError> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let spec = located.get_ref();
    let (cert, key) = match (&spec.client_certificate_file, &spec.client_key_file) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        _ => {
            return Err(source.error_at(
                located.span(),
                "client_certificate_file and client_key_file go together",
            ));
        }
    };
    let bad = |file: &Located<std::path::PathBuf>, what: &str| {
        source.error_at(
            file.span(),
            format!("{} is not {what}", file.get_ref().display()),
        )
    };
    // A regular file of sensible size: never a device read forever.
    let path = cert.get_ref();
    let read = std::fs::metadata(path)
        .and_then(|meta| {
            if meta.is_file() && meta.len() <= 1 << 20 {
                std::fs::read(path)
            } else {
                Err(std::io::Error::other("not a regular file of at most 1 MiB"))
            }
        })
        .map_err(|e| source.error_at(cert.span(), format!("{}: {e}", path.display())))?;
    let chain = CertificateDer::pem_slice_iter(&read)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad(cert, "a PEM certificate chain"))?;
    if chain.is_empty() {
        return Err(bad(cert, "a PEM certificate chain"));
    }
    let pem = read_secret_file(source, key.get_ref(), key.span(), "client_key_file")?;
    let key_der = PrivateKeyDer::from_pem_slice(pem.expose().as_bytes())
        .map_err(|_| bad(key, "a PEM private key"))?;
    Ok(Some(crate::policy::ClientIdentity {
        chain,
        key: key_der,
        config: std::sync::OnceLock::new(),
    }))
}

/// An HTTP target's credential: exactly one of a bearer token, a user and
/// password (basic), or a header and its value.
fn http_credential(
    source: &SourceFile,
    located: &Located<file::CredentialSpec>,
) -> Result<crate::policy::HttpCredential, ConfigError> {
    use crate::policy::HttpCredential;
    let spec = located.get_ref();
    let invalid = |message: String| source.error_at(located.span(), message);
    let secret = |file: &Located<std::path::PathBuf>, field| {
        read_secret_file(source, file.get_ref(), file.span(), field)
    };
    let credential = match (
        &spec.bearer_token_file,
        (&spec.user, &spec.password_file),
        (&spec.header, &spec.value_file),
    ) {
        (Some(token), (None, None), (None, None)) => {
            HttpCredential::bearer(secret(token, "bearer_token_file")?.expose())
        }
        (None, (Some(user), Some(password)), (None, None)) => {
            HttpCredential::basic(user, secret(password, "password_file")?.expose())
        }
        (None, (None, None), (Some(name), Some(value))) => {
            let header = http::HeaderName::from_bytes(name.get_ref().as_bytes()).map_err(|_| {
                source.error_at(
                    name.span(),
                    format!("{:?} is not a header name", name.get_ref()),
                )
            })?;
            HttpCredential::header(header, secret(value, "value_file")?.expose())
        }
        _ => {
            return Err(invalid(
                "an http credential is one of: bearer_token_file; user and password_file (basic); header and value_file".into(),
            ));
        }
    };
    credential.map_err(|why| invalid(format!("the credential cannot be sent: {why}")))
}

/// A rule field's globs (each written as `spell` makes it), or none.
fn globs(
    source: &SourceFile,
    field: &str,
    list: &Option<Located<Vec<String>>>,
    spell: fn(&str) -> String,
) -> Result<Vec<Pattern>, ConfigError> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    list.get_ref()
        .iter()
        .map(|glob| {
            Pattern::new(&spell(glob)).map_err(|e| {
                source.error_at(list.span(), format!("{field}: bad pattern {glob:?}: {e}"))
            })
        })
        .collect()
}

/// One `[[rule]]`, named `name`.
fn build_rule(
    source: &SourceFile,
    located: &Located<file::RuleSpec>,
    name: String,
    policy: &Policy,
    names: &Names,
) -> Result<Rule, ConfigError> {
    let rule = located.get_ref();
    let at = located.span();
    let workloads = resolve_names(
        source,
        at.clone(),
        &rule.workloads,
        &names.workloads,
        "workload",
    )?;
    let targets = resolve_names(source, at, &rule.targets, &names.targets, "target")?;
    let statements = rule
        .statements
        .as_ref()
        .map(|kinds| kinds.get_ref().iter().copied().collect());
    let tables = globs(source, "tables", &rule.tables, str::to_owned)?;
    // `tables = []` is no table at all (not any table, as an absent key).
    let no_tables = rule.tables.as_ref().is_some_and(|t| t.get_ref().is_empty());
    if let Some(list) = &rule.tables
        && no_tables
        && rule.decision != crate::policy::Action::Allow
    {
        return Err(source.error_at(
            list.span(),
            "tables = [] (statements that touch no table) applies to allow rules; a deny or approve rule names the tables it is about, or leaves the key out for any",
        ));
    }
    let functions = globs(source, "functions", &rule.functions, str::to_owned)?;
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
    let masks = rule_masks(source, rule)?;
    check_protocols(source, rule, targets.as_deref(), policy, &masks)?;
    let ssh = ssh_requests(source, rule)?;
    let http = http_requests(source, rule)?;
    let kube = kube_rules(source, rule)?;
    let approval = approval_spec(source, located)?;
    Ok(Rule {
        name,
        description: rule.description.clone(),
        workloads,
        targets,
        action: rule.decision,
        statements,
        tables,
        no_tables,
        enforce: rule.enforce.unwrap_or(true),
        functions,
        as_user: rule.as_user.as_ref().map(|u| u.get_ref().clone()),
        masks,
        allow_unparsed: matches!(
            rule.unparsed.as_ref().map(|u| *u.get_ref()),
            Some(file::Unparsed::Allow)
        ),
        approval,
        ssh,
        http,
        kube,
    })
}

/// The Kubernetes fields of a rule.
fn kube_rules(
    source: &SourceFile,
    rule: &file::RuleSpec,
) -> Result<crate::policy::kube::KubeRules, ConfigError> {
    const VERBS: [&str; 13] = [
        "get",
        "list",
        "watch",
        "create",
        "update",
        "patch",
        "delete",
        "deletecollection",
        "proxy",
        "exec",
        "attach",
        "portforward",
        "*",
    ];
    let verbs = rule.verbs.as_ref().map_or(Ok(Vec::new()), |list| {
        list.get_ref()
            .iter()
            .map(|verb| {
                let verb = verb.to_ascii_lowercase();
                if VERBS.contains(&verb.as_str()) {
                    Ok(verb)
                } else {
                    Err(source.error_at(
                        list.span(),
                        format!("verbs: {verb:?} is not one of {}", VERBS.join(", ")),
                    ))
                }
            })
            .collect::<Result<Vec<_>, _>>()
    })?;
    Ok(crate::policy::kube::KubeRules {
        verbs,
        resources: globs(source, "resources", &rule.resources, str::to_owned)?,
        resources_written: rule
            .resources
            .as_ref()
            .map(|r| r.get_ref().clone())
            .unwrap_or_default(),
        namespaces: globs(source, "namespaces", &rule.namespaces, str::to_owned)?,
        names: globs(source, "names", &rule.names, str::to_owned)?,
        reveal_secrets: rule.reveal_secrets.as_ref().is_some_and(|r| *r.get_ref()),
    })
}

/// The HTTP fields of a rule.
fn http_requests(
    source: &SourceFile,
    rule: &file::RuleSpec,
) -> Result<crate::policy::HttpRequests, ConfigError> {
    let methods = rule.methods.as_ref().map_or(Ok(Vec::new()), |list| {
        list.get_ref()
            .iter()
            .map(|m| {
                if !m.is_empty() && m.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-') {
                    Ok(m.to_ascii_uppercase())
                } else {
                    Err(source.error_at(list.span(), format!("methods: {m:?} is not a method")))
                }
            })
            .collect::<Result<Vec<_>, _>>()
    })?;
    let paths = globs(source, "paths", &rule.paths, str::to_owned)?;
    if let Some(list) = &rule.paths
        && let Some(bad) = list.get_ref().iter().find(|p| !p.starts_with('/'))
    {
        return Err(source.error_at(
            list.span(),
            format!("paths: {bad:?} must start with / (paths are matched whole)"),
        ));
    }
    Ok(crate::policy::HttpRequests {
        methods,
        paths,
        hosts: globs(source, "hosts", &rule.hosts, str::to_ascii_lowercase)?,
    })
}

/// A rule's masks, with their `mask_expressions`; on allow rules only.
fn rule_masks(
    source: &SourceFile,
    rule: &file::RuleSpec,
) -> Result<Vec<crate::policy::Mask>, ConfigError> {
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
    Ok(masks)
}

/// Fields about one protocol only make sense on rules for its targets.
fn check_protocols(
    source: &SourceFile,
    rule: &file::RuleSpec,
    targets: Option<&[TargetId]>,
    policy: &Policy,
    masks: &[crate::policy::Mask],
) -> Result<(), ConfigError> {
    let for_protocols =
        |fields: &[Option<std::ops::Range<usize>>], protocols: &[Protocol], what: &str| {
            let Some(at) = fields.iter().flatten().next() else {
                return Ok(());
            };
            let other = targets.and_then(|ids| {
                ids.iter()
                    .find(|id| !protocols.contains(&policy.target(**id).protocol))
            });
            match other {
                Some(id) => Err(source.error_at(
                    at.clone(),
                    format!("{what}; {:?} is not one", policy.target(*id).name),
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
    let mask_that = |picks: fn(&crate::policy::MaskSelects) -> bool| {
        rule.mask
            .iter()
            .flatten()
            .zip(masks)
            .find_map(|(spec, mask)| picks(&mask.selects).then(|| spec.span()))
    };
    use crate::policy::MaskSelects;
    for_protocols(
        &[mask_that(|s| matches!(s, MaskSelects::Json(_)))],
        &[Protocol::Http, Protocol::Kubernetes],
        "a json mask applies to http and kubernetes targets",
    )?;
    // A column mask cannot apply to an SSH target's output or an HTTP
    // answer: on a rule naming one, it would be dropped there, so it is
    // refused.
    for_protocols(
        &[mask_that(|s| matches!(s, MaskSelects::Column(_)))],
        &[Protocol::Postgres],
        "a column mask applies to postgres targets (SSH output and HTTP answers have no columns: mask them by pattern or regex)",
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
    for_protocols(
        &[
            rule.methods.as_ref().map(|c| c.span()),
            rule.paths.as_ref().map(|c| c.span()),
            rule.hosts.as_ref().map(|c| c.span()),
        ],
        &[Protocol::Http, Protocol::Kubernetes],
        "methods, paths and hosts apply to http and kubernetes targets",
    )?;
    for_protocols(
        &[
            rule.verbs.as_ref().map(|c| c.span()),
            rule.resources.as_ref().map(|c| c.span()),
            rule.namespaces.as_ref().map(|c| c.span()),
            rule.names.as_ref().map(|c| c.span()),
            rule.reveal_secrets.as_ref().map(|c| c.span()),
        ],
        &[Protocol::Kubernetes],
        "verbs, resources, namespaces, names and reveal_secrets apply to kubernetes targets",
    )?;
    if let Some(reveal) = &rule.reveal_secrets
        && rule.decision != crate::policy::Action::Allow
    {
        return Err(source.error_at(reveal.span(), "reveal_secrets applies to allow rules"));
    }
    Ok(())
}

/// The SSH fields of a rule.
fn ssh_requests(
    source: &SourceFile,
    rule: &file::RuleSpec,
) -> Result<crate::policy::SshRequests, ConfigError> {
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
        users: globs(source, "users", &rule.users, str::to_owned)?,
        env: globs(source, "env", &rule.env, str::to_owned)?,
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
    let Some(user) = credential.get_ref().user.clone() else {
        return Err(source.error_at(credential.span(), "an ssh credential needs user"));
    };
    Ok(crate::policy::SshUpstream {
        user,
        auth: ssh_auth(source, credential)?,
        host_key: ssh_host_key(source, target)?,
    })
}

/// How the agent logs in to an SSH server: a key (with its certificate),
/// or a password.
fn ssh_auth(
    source: &SourceFile,
    credential: &Located<file::CredentialSpec>,
) -> Result<crate::policy::SshAuth, ConfigError> {
    use crate::policy::SshAuth;
    let cred = credential.get_ref();
    Ok(match (&cred.private_key_file, &cred.password_file) {
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
    })
}

/// How the SSH server's key is checked: a known_hosts file, or a pinned
/// fingerprint.
fn ssh_host_key(
    source: &SourceFile,
    target: &Located<file::TargetSpec>,
) -> Result<crate::policy::HostKeyCheck, ConfigError> {
    use crate::policy::HostKeyCheck;
    let spec = target.get_ref();
    Ok(match (&spec.known_hosts, &spec.host_key_fingerprint) {
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
            rule.require_reason.as_ref().map(|r| r.span()),
            rule.requestable.as_ref().map(|r| r.span()),
            rule.max_duration.as_ref().map(|r| r.span()),
        ];
        return match stray.into_iter().flatten().next() {
            Some(at) => Err(source.error_at(
                at,
                "approvers, min_approvals, timeout, grant, require_reason, requestable and max_duration apply to decision = \"approve\"",
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
    let requestable = match (&rule.requestable, &rule.max_duration) {
        (Some(flag), Some(max)) if *flag.get_ref() => Some(duration("max_duration", max)?),
        (Some(flag), None) if *flag.get_ref() => {
            return Err(source.error_at(
                flag.span(),
                "requestable = true needs max_duration, the longest grant a request may ask for (e.g. \"1h\")",
            ));
        }
        (_, Some(max)) => {
            return Err(source.error_at(
                max.span(),
                "max_duration applies to requestable = true rules",
            ));
        }
        _ => None,
    };
    Ok(Some(std::sync::Arc::new(ApprovalSpec {
        approvers,
        min_approvals,
        timeout,
        grant,
        require_reason: rule.require_reason.as_ref().is_some_and(|r| *r.get_ref()),
        requestable,
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
