//! `interlock kube config`: a kubeconfig for jobs that use a kubernetes
//! target, which names the agent's CA and holds no credential.
use anyhow::{Result, bail};

/// A kubeconfig (JSON, which kubectl reads as it reads YAML) for a
/// kubernetes target: its server as the target names it, the agent's CA
/// (created now if the agent has not made it yet), and a placeholder
/// token in place of a credential.
/// Never the cluster's own CA, never `insecure-skip-tls-verify`.
pub fn kubeconfig(
    config: &crate::config::Config,
    target: &str,
    namespace: Option<&str>,
) -> Result<String> {
    use crate::policy::{Protocol, TargetAddress};
    let policy = &config.policy;
    let Some(id) = policy.target_id(target) else {
        bail!("no target {target:?} in the policy");
    };
    let target = policy.target(id);
    if target.protocol != Protocol::Kubernetes {
        bail!(
            "target {:?} is protocol = {:?}, not \"kubernetes\"",
            target.name,
            target.protocol.as_str()
        );
    }
    let server = match &target.address {
        TargetAddress::Socket(socket) => format!("https://{socket}"),
        TargetAddress::Host(host, port) => format!("https://{host}:{port}"),
        TargetAddress::Cidr(..) => bail!(
            "target {:?} is an address range; a kubeconfig needs one server",
            target.name
        ),
    };
    let ca_dir = config.agent.state_dir.join("ca");
    crate::tls::LocalCa::load_or_create(&ca_dir, &crate::tls::CaScope::of(config))?;
    let pem = crate::tls::LocalCa::read_cert(&ca_dir)?;
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(pem);
    let mut context = serde_json::json!({ "cluster": target.name, "user": "interlock" });
    if let Some(namespace) = namespace {
        context["namespace"] = namespace.into();
    }
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": target.name,
            "cluster": { "server": server, "certificate-authority-data": ca },
        }],
        // A placeholder (without any, kubectl asks for a user name): the
        // agent replaces whatever the client sends with what it holds.
        "users": [{ "name": "interlock", "user": { "token": "held-by-interlock" } }],
        "contexts": [{ "name": target.name, "context": context }],
        "current-context": target.name,
    });
    Ok(format!("{}\n", serde_json::to_string_pretty(&kubeconfig)?))
}
