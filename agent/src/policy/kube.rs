//! Kubernetes API requests as kube-apiserver reads them: the attributes
//! its authorizers decide on (verb, API group, version, resource,
//! subresource, namespace, name), derived by the rules of its
//! `RequestInfoFactory` (k8s.io/apiserver, endpoints/request), so a rule
//! means what RBAC would. On top of them, what runs a process or reaches
//! one is its own verb whatever the transport: `exec`, `attach`,
//! `portforward` on pods (WebSocket GET and SPDY POST alike), and `proxy`.
use super::Pattern;

/// What a request is, for policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KubeRequest {
    /// A resource request (`/api/…`, `/apis/…` with a resource), else a
    /// non-resource one (discovery, `/version`, `/healthz`).
    pub is_resource: bool,
    /// kube-apiserver's verb (`get`, `list`, `watch`, `create`, `update`,
    /// `patch`, `delete`, `deletecollection`, `proxy`), or for what runs
    /// in or reaches a pod, `exec`, `attach`, `portforward`.
    pub verb: String,
    pub group: String,
    pub version: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
}

impl KubeRequest {
    /// `group/resource/subresource`, as rules name it: `pods`,
    /// `pods/exec`, `apps/deployments`, `apps/deployments/scale`.
    pub fn resource_name(&self) -> String {
        let mut name = String::new();
        if !self.group.is_empty() {
            name.push_str(&self.group);
            name.push('/');
        }
        name.push_str(&self.resource);
        if !self.subresource.is_empty() {
            name.push('/');
            name.push_str(&self.subresource);
        }
        name
    }
}

impl std::fmt::Display for KubeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.is_resource {
            return write!(f, "{} (not a resource)", self.verb);
        }
        write!(f, "{} {}", self.verb, self.resource_name())?;
        if !self.name.is_empty() {
            write!(f, " {:?}", self.name)?;
        }
        if !self.namespace.is_empty() {
            write!(f, " in namespace {:?}", self.namespace)?;
        }
        Ok(())
    }
}

/// Reads a request as kube-apiserver does. `path` is the path as sent
/// (already in canonical form), `query` the raw query string.
pub fn read(method: &str, path: &str, query: Option<&str>) -> Result<KubeRequest, String> {
    let mut request = KubeRequest {
        verb: method.to_ascii_lowercase(),
        ..Default::default()
    };
    let trimmed = path.trim_matches('/');
    let mut parts: Vec<&str> = if trimmed.is_empty() {
        Vec::new()
    } else {
        trimmed.split('/').collect()
    };
    // Fewer than three parts, or another prefix: a non-resource request.
    if parts.len() < 3 || !matches!(parts[0], "api" | "apis") {
        return Ok(request);
    }
    let prefix = parts.remove(0);
    if prefix == "apis" {
        if parts.len() < 3 {
            return Ok(request);
        }
        request.group = parts.remove(0).to_owned();
    }
    request.is_resource = true;
    request.version = parts.remove(0).to_owned();
    if matches!(parts.first(), Some(&("proxy" | "watch"))) {
        if parts.len() < 2 {
            return Err("unable to determine kind and namespace from the URL".into());
        }
        request.verb = parts.remove(0).to_owned();
    } else {
        request.verb = match method {
            "POST" => "create",
            "GET" | "HEAD" => "get",
            "PUT" => "update",
            "PATCH" => "patch",
            "DELETE" => "delete",
            _ => "",
        }
        .to_owned();
    }
    if parts.first() == Some(&"namespaces") && parts.len() > 1 {
        request.namespace = parts[1].to_owned();
        // A namespace's own subresources stay the namespace's.
        if parts.len() > 2 && !matches!(parts[2], "status" | "finalize") {
            parts.drain(..2);
        }
    }
    if parts.len() >= 3 && request.verb != "proxy" {
        request.subresource = parts[2].to_owned();
    }
    if parts.len() >= 2 {
        request.name = parts[1].to_owned();
    }
    if let Some(resource) = parts.first() {
        request.resource = (*resource).to_owned();
    }
    if request.name.is_empty() && request.verb == "get" {
        // Go's strconv.ParseBool, and apiserver's fallback when it fails:
        // anything but a false is a watch.
        let watch = query_value(query, "watch").is_some_and(|v| {
            !(matches!(v.as_str(), "0" | "f" | "F") || v.eq_ignore_ascii_case("false"))
        });
        request.verb = if watch { "watch" } else { "list" }.to_owned();
        if let Some(selector) = query_value(query, "fieldSelector")
            && let Some(name) = exact_name(&selector)?
        {
            request.name = name;
        }
    }
    if request.name.is_empty() && request.verb == "delete" {
        request.verb = "deletecollection".to_owned();
    }
    // What runs in, or reaches, a process is its own verb.
    if request.group.is_empty()
        && request.resource == "pods"
        && matches!(
            request.subresource.as_str(),
            "exec" | "attach" | "portforward"
        )
    {
        request.verb = request.subresource.clone();
    }
    if request.subresource == "proxy" {
        request.verb = "proxy".to_owned();
    }
    Ok(request)
}

/// The first value of a query parameter, form-decoded (`%20`, `+`) as
/// Go's `url.ParseQuery` decodes it.
fn query_value(query: Option<&str>, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(name, _)| name == key)
        .map(|(_, value)| value.into_owned())
}

/// The name a field selector requires exactly, as kube-apiserver finds it:
/// the first term `metadata.name=x` or `metadata.name==x`, if x is a valid
/// path segment. A selector with escapes (`\,`) is refused rather than
/// read differently from the server.
fn exact_name(selector: &str) -> Result<Option<String>, String> {
    if selector.contains('\\') {
        return Err(format!("a field selector with escapes ({selector:?})"));
    }
    let Some(value) = selector.split(',').find_map(|term| {
        term.strip_prefix("metadata.name==")
            .or_else(|| term.strip_prefix("metadata.name="))
    }) else {
        return Ok(None);
    };
    let valid = !value.is_empty() && value != "." && value != ".." && !value.contains(['/', '%']);
    Ok(valid.then(|| value.to_owned()))
}

/// The Kubernetes fields of a rule. A rule with none of them (and no
/// `paths`) is about every request to its targets.
#[derive(Clone, Debug, Default)]
pub struct KubeRules {
    pub verbs: Vec<String>,
    /// `[group/]resource[/subresource]` globs.
    pub resources: Vec<Pattern>,
    /// Resources written out in full (`nodes/proxy`): a glob never covers
    /// what only a name may (see [`NAMED_ONLY`]).
    pub resources_written: Vec<String>,
    pub namespaces: Vec<Pattern>,
    pub names: Vec<Pattern>,
    /// An allow rule with `reveal_secrets = true`: the Secrets it allows
    /// come unmasked.
    pub reveal_secrets: bool,
}

/// Resources a rule covers only by naming them: a kubelet's proxy runs
/// commands in any pod of its node.
pub const NAMED_ONLY: [&str; 1] = ["nodes/proxy"];

impl KubeRules {
    pub fn is_scoped(&self) -> bool {
        !self.verbs.is_empty()
            || !self.resources.is_empty()
            || !self.namespaces.is_empty()
            || !self.names.is_empty()
    }

    /// Every field the rule sets matches; a rule about resources is never
    /// about a non-resource request.
    pub fn covers(&self, request: &KubeRequest) -> bool {
        let resource = request.resource_name();
        let named_only = request.is_resource && NAMED_ONLY.contains(&resource.as_str());
        if !self.is_scoped() {
            return !named_only;
        }
        if !request.is_resource {
            return false;
        }
        (self.verbs.is_empty() || self.verbs.iter().any(|v| *v == request.verb || v == "*"))
            && (self.resources.is_empty() && !named_only
                || if named_only {
                    self.resources_written.contains(&resource)
                } else {
                    self.resources.iter().any(|p| p.matches(&resource))
                })
            && (self.namespaces.is_empty()
                || self
                    .namespaces
                    .iter()
                    .any(|p| p.matches(&request.namespace)))
            && (self.names.is_empty() || self.names.iter().any(|p| p.matches(&request.name)))
    }
}

/// What every client reads to find its way (kube-apiserver's
/// `system:discovery` role): allowed on an admitted connection.
pub fn is_discovery(method: &str, path: &str, request: &KubeRequest) -> bool {
    if request.is_resource || !matches!(method, "GET" | "HEAD") {
        return false;
    }
    matches!(
        path,
        "/api"
            | "/apis"
            | "/healthz"
            | "/livez"
            | "/readyz"
            | "/version"
            | "/version/"
            | "/openapi"
    ) || ["/api/", "/apis/", "/openapi/"]
        .iter()
        .any(|prefix| path.starts_with(prefix))
}

/// method, URL, verb, group, version, namespace, resource, subresource,
/// name: kube-apiserver's `TestGetAPIRequestInfo` cases and its edge cases.
#[cfg(test)]
type Case = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);

#[cfg(test)]
#[rustfmt::skip]
const CASES: &[Case] = &[
    ("GET", "/api/v1/namespaces", "list", "", "v1", "", "namespaces", "", ""),
    ("GET", "/api/v1/namespaces/other", "get", "", "v1", "other", "namespaces", "", "other"),
    ("GET", "/api/v1/namespaces/other/pods", "list", "", "v1", "other", "pods", "", ""),
    ("GET", "/api/v1/namespaces/other/pods/foo", "get", "", "v1", "other", "pods", "", "foo"),
    ("HEAD", "/api/v1/namespaces/other/pods/foo", "get", "", "v1", "other", "pods", "", "foo"),
    ("GET", "/api/v1/pods", "list", "", "v1", "", "pods", "", ""),
    ("HEAD", "/api/v1/pods", "list", "", "v1", "", "pods", "", ""),
    ("GET", "/api/v1/namespaces/other/pods/foo", "get", "", "v1", "other", "pods", "", "foo"),
    ("GET", "/api/v1/namespaces/other/pods", "list", "", "v1", "other", "pods", "", ""),
    // Special verbs.
    ("GET", "/api/v1/proxy/namespaces/other/pods/foo", "proxy", "", "v1", "other", "pods", "", "foo"),
    ("GET", "/api/v1/proxy/namespaces/other/pods/foo/subpath/not/a/subresource", "proxy", "", "v1", "other", "pods", "", "foo"),
    ("GET", "/api/v1/watch/pods", "watch", "", "v1", "", "pods", "", ""),
    ("GET", "/api/v1/pods?watch=true", "watch", "", "v1", "", "pods", "", ""),
    ("GET", "/api/v1/pods?watch=false", "list", "", "v1", "", "pods", "", ""),
    ("GET", "/api/v1/pods?watch=1", "watch", "", "v1", "", "pods", "", ""),
    ("GET", "/api/v1/pods?watch=0", "list", "", "v1", "", "pods", "", ""),
    ("GET", "/api/v1/pods?watch=yes", "watch", "", "v1", "", "pods", "", ""),
    ("GET", "/api/v1/watch/namespaces/other/pods", "watch", "", "v1", "other", "pods", "", ""),
    // Subresources.
    ("GET", "/api/v1/namespaces/other/pods/foo/proxy/subpath", "proxy", "", "v1", "other", "pods", "proxy", "foo"),
    ("PUT", "/api/v1/namespaces/other/finalize", "update", "", "v1", "other", "namespaces", "finalize", "other"),
    ("PUT", "/api/v1/namespaces/other/status", "update", "", "v1", "other", "namespaces", "status", "other"),
    ("GET", "/api/v1/namespaces/other/pods/foo/log", "get", "", "v1", "other", "pods", "log", "foo"),
    // Verbs by method.
    ("POST", "/api/v1/namespaces/other/pods", "create", "", "v1", "other", "pods", "", ""),
    ("PUT", "/api/v1/namespaces/other/pods/foo", "update", "", "v1", "other", "pods", "", "foo"),
    ("PATCH", "/api/v1/namespaces/other/pods/foo", "patch", "", "v1", "other", "pods", "", "foo"),
    ("DELETE", "/api/v1/namespaces/other/pods/foo", "delete", "", "v1", "other", "pods", "", "foo"),
    ("DELETE", "/api/v1/namespaces/other/pods", "deletecollection", "", "v1", "other", "pods", "", ""),
    // Groups.
    ("GET", "/apis/extensions/v1beta1/namespaces/other/extensions", "list", "extensions", "v1beta1", "other", "extensions", "", ""),
    ("GET", "/apis/extensions/v1beta1/extensions", "list", "extensions", "v1beta1", "", "extensions", "", ""),
    ("PATCH", "/apis/apps/v1/namespaces/ci/deployments/web", "patch", "apps", "v1", "ci", "deployments", "", "web"),
    ("PUT", "/apis/apps/v1/namespaces/ci/deployments/web/scale", "update", "apps", "v1", "ci", "deployments", "scale", "web"),
    // A name from an exact field selector.
    ("GET", "/api/v1/namespaces/other/pods?fieldSelector=metadata.name%3Dfoo", "list", "", "v1", "other", "pods", "", "foo"),
    ("GET", "/api/v1/namespaces/other/pods?fieldSelector=metadata.name==foo", "list", "", "v1", "other", "pods", "", "foo"),
    ("GET", "/api/v1/namespaces/other/pods?fieldSelector=metadata.name%3Dfoo,status.phase%3DRunning", "list", "", "v1", "other", "pods", "", "foo"),
    ("GET", "/api/v1/namespaces/other/pods?fieldSelector=status.phase%3DRunning,metadata.name%3Dfoo", "list", "", "v1", "other", "pods", "", "foo"),
    ("GET", "/api/v1/namespaces/other/pods?fieldSelector=metadata.name!%3Dfoo", "list", "", "v1", "other", "pods", "", ""),
    ("GET", "/api/v1/namespaces/other/pods?fieldSelector=metadata.name%3D..", "list", "", "v1", "other", "pods", "", ""),
    ("GET", "/api/v1/pods?watch=true&fieldSelector=metadata.name%3Dfoo", "watch", "", "v1", "", "pods", "", "foo"),
    // What runs in, or reaches, a pod: one verb whatever the transport.
    ("GET", "/api/v1/namespaces/ci/pods/web/exec", "exec", "", "v1", "ci", "pods", "exec", "web"),
    ("POST", "/api/v1/namespaces/ci/pods/web/exec", "exec", "", "v1", "ci", "pods", "exec", "web"),
    ("POST", "/api/v1/namespaces/ci/pods/web/attach", "attach", "", "v1", "ci", "pods", "attach", "web"),
    ("GET", "/api/v1/namespaces/ci/pods/web/portforward", "portforward", "", "v1", "ci", "pods", "portforward", "web"),
    ("GET", "/api/v1/nodes/n1/proxy/run/ci/web/c", "proxy", "", "v1", "", "nodes", "proxy", "n1"),
    ("POST", "/api/v1/nodes/n1/proxy/exec/ci/web/c", "proxy", "", "v1", "", "nodes", "proxy", "n1"),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Cases from kube-apiserver's own `TestGetAPIRequestInfo` and its
    /// edge cases, as (method, URL, verb, group, version, namespace,
    /// resource, subresource, name).
    #[test]
    fn requests_read_as_kube_apiserver_reads_them() {
        let cases = CASES;
        for &(method, url, verb, group, version, namespace, resource, subresource, name) in cases {
            let (path, query) = url
                .split_once('?')
                .map_or((url, None), |(p, q)| (p, Some(q)));
            let read = read(method, path, query).unwrap();
            assert!(read.is_resource, "{method} {url}");
            assert_eq!(
                (
                    read.verb.as_str(),
                    read.group.as_str(),
                    read.version.as_str(),
                    read.namespace.as_str(),
                    read.resource.as_str(),
                    read.subresource.as_str(),
                    read.name.as_str()
                ),
                (verb, group, version, namespace, resource, subresource, name),
                "{method} {url}"
            );
        }
        for (method, path) in [
            ("GET", "/"),
            ("GET", "/api"),
            ("GET", "/api/v1"),
            ("GET", "/apis"),
            ("GET", "/apis/apps"),
            ("GET", "/apis/apps/v1"),
            ("GET", "/version"),
            ("GET", "/healthz/ping"),
            ("GET", "/other/v1/pods/x"),
        ] {
            let read = read(method, path, None).unwrap();
            assert!(!read.is_resource, "{path}");
            assert_eq!(read.verb, method.to_ascii_lowercase());
        }
        assert!(read("GET", "/api/v1/proxy", None).is_err());
        assert!(
            read(
                "GET",
                "/api/v1/pods",
                Some("fieldSelector=metadata.name%3Da%5C,b")
            )
            .is_err()
        );
    }

    #[test]
    fn rules_cover_as_rbac_does() {
        let rule = |verbs: &[&str], resources: &[&str], namespaces: &[&str]| KubeRules {
            verbs: verbs.iter().map(|v| v.to_string()).collect(),
            resources: resources.iter().map(|r| Pattern::new(r).unwrap()).collect(),
            resources_written: resources.iter().map(|r| r.to_string()).collect(),
            namespaces: namespaces
                .iter()
                .map(|n| Pattern::new(n).unwrap())
                .collect(),
            names: Vec::new(),
            reveal_secrets: false,
        };
        let request = |method, path| read(method, path, None).unwrap();
        let reads = rule(&["get", "list", "watch"], &["pods", "pods/log"], &["ci"]);
        assert!(reads.covers(&request("GET", "/api/v1/namespaces/ci/pods")));
        assert!(reads.covers(&request("GET", "/api/v1/namespaces/ci/pods/web/log")));
        assert!(!reads.covers(&request("GET", "/api/v1/namespaces/prod/pods")));
        assert!(!reads.covers(&request("GET", "/api/v1/namespaces/ci/secrets")));
        assert!(!reads.covers(&request("GET", "/api/v1/namespaces/ci/pods/web/exec")));
        assert!(!reads.covers(&request("DELETE", "/api/v1/namespaces/ci/pods/web")));
        assert!(!reads.covers(&request("GET", "/api")), "not a resource");
        let everything = rule(&["*"], &["*", "*/*", "*/*/*"], &[]);
        assert!(everything.covers(&request("POST", "/api/v1/namespaces/ci/pods/web/exec")));
        assert!(
            !everything.covers(&request("GET", "/api/v1/nodes/n1/proxy/run/ci/web/c")),
            "nodes/proxy only by name"
        );
        let kubelet = rule(&["proxy"], &["nodes/proxy"], &[]);
        assert!(kubelet.covers(&request("POST", "/api/v1/nodes/n1/proxy/exec/ci/web/c")));
        let deployments = rule(&["patch"], &["apps/deployments"], &["ci"]);
        assert!(deployments.covers(&request(
            "PATCH",
            "/apis/apps/v1/namespaces/ci/deployments/web"
        )));
        assert!(!deployments.covers(&request(
            "PATCH",
            "/apis/apps/v1/namespaces/ci/deployments/web/scale"
        )));
    }

    #[test]
    fn discovery_is_what_clients_read_to_find_their_way() {
        for path in [
            "/api",
            "/api/v1",
            "/apis",
            "/apis/apps/v1",
            "/version",
            "/openapi/v2",
        ] {
            assert!(
                is_discovery("GET", path, &read("GET", path, None).unwrap()),
                "{path}"
            );
        }
        let pods = "/api/v1/namespaces/ci/pods";
        assert!(!is_discovery(
            "GET",
            pods,
            &read("GET", pods, None).unwrap()
        ));
        assert!(!is_discovery(
            "POST",
            "/api",
            &read("POST", "/api", None).unwrap()
        ));
    }
}
