//! HTTP requests as policy reads them: the method, the path and the host,
//! each in one spelling only.
//!
//! A server routes on its own reading of the path. If the agent read
//! `/api/../admin` or `/api/%2e%2e/admin` differently from the server, a
//! rule about `/admin/**` would not mean what the server does; so such
//! paths are refused (400) before any rule is consulted, and what is left
//! has one reading: no `.` or `..` segment, no empty segment, no encoded
//! `/`, `\` or `.`, no `;` parameters, upper-case escapes only, and no
//! escape of a character that needs none. The method must be written in
//! upper case (servers differ on `get`); the host is the URL's authority
//! or else the one `Host` header, without its port, in lower case, and
//! must be there (without it a server picks its default host).
use super::Pattern;

/// The HTTP fields of a rule. A rule with none of them is about every
/// request to its targets.
#[derive(Clone, Debug, Default)]
pub struct HttpRequests {
    /// Upper-case methods; empty: any.
    pub methods: Vec<String>,
    /// Globs on the normalised path (`*` within a segment, `**` across);
    /// empty: any.
    pub paths: Vec<Pattern>,
    /// Globs on the host name; empty: any.
    pub hosts: Vec<Pattern>,
}

impl HttpRequests {
    pub fn is_scoped(&self) -> bool {
        !self.methods.is_empty() || !self.paths.is_empty() || !self.hosts.is_empty()
    }

    /// Every field the rule sets matches the request.
    pub fn covers(&self, request: &HttpRequest) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| m == request.method))
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(&request.path)))
            && (self.hosts.is_empty() || self.hosts.iter().any(|h| h.matches(&request.host)))
    }
}

/// One request, read for policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// The path with its escapes decoded (never containing an encoded `/`).
    pub path: String,
    pub host: String,
    /// On a Kubernetes target: the request as kube-apiserver reads it.
    pub kube: Option<super::kube::KubeRequest>,
}

impl std::fmt::Display for HttpRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kube {
            Some(kube) if kube.is_resource => write!(f, "{kube}"),
            _ => write!(f, "{} {}", self.method, self.path),
        }
    }
}

/// Why a request cannot be read in one way only.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    #[error("the method {0:?} is not written in upper case")]
    Method(String),
    #[error("the path {0:?} cannot be read one way only ({1})")]
    Path(String, String),
    #[error("the host {0:?} is not a host name")]
    Host(String),
}

impl<'a> HttpRequest<'a> {
    /// Reads a request's method, path (without its query) and host.
    pub fn read(method: &'a str, path: &str, host: &str) -> Result<Self, Unreadable> {
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase() || b == b'-') {
            return Err(Unreadable::Method(method.to_owned()));
        }
        let path =
            canonical_path(path).map_err(|why| Unreadable::Path(path.to_owned(), why.into()))?;
        Ok(Self {
            method,
            path,
            host: host_name(host)?,
            kube: None,
        })
    }

    /// Also reads it as kube-apiserver would (a Kubernetes target).
    pub fn read_kube(
        method: &'a str,
        path: &str,
        query: Option<&str>,
        host: &str,
    ) -> Result<Self, Unreadable> {
        let mut request = Self::read(method, path, host)?;
        let kube = super::kube::read(method, &request.path, query)
            .map_err(|why| Unreadable::Path(path.to_owned(), why))?;
        request.kube = Some(kube);
        Ok(request)
    }
}

/// The host without its port, in lower case.
fn host_name(host: &str) -> Result<String, Unreadable> {
    let bad = || Unreadable::Host(host.to_owned());
    let name = if let Some(rest) = host.strip_prefix('[') {
        // An IPv6 literal: `[::1]:8443`.
        let (inside, after) = rest.split_once(']').ok_or_else(bad)?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return Err(bad());
        }
        inside
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return Err(bad()),
            None => host,
        }
    };
    let fine = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':');
    // No host at all: the server would pick its default, which a rule
    // about hosts cannot know.
    if name.is_empty() || !name.bytes().all(fine) {
        return Err(bad());
    }
    Ok(name.trim_end_matches('.').to_ascii_lowercase())
}

fn is_port(text: &str) -> bool {
    !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit())
}

/// The path decoded, if it has one reading only (see the module's words).
pub fn canonical_path(path: &str) -> Result<String, &'static str> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err("it does not start with /");
    };
    if !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a character that must be escaped");
    }
    if path.contains('\\') {
        return Err("a backslash");
    }
    if path.contains(';') {
        return Err("a ; parameter");
    }
    if path.contains("//") {
        return Err("an empty segment (//)");
    }
    if rest
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Err("a . or .. segment");
    }
    // Upper-case hex digits only (checked before).
    let digit = |b: u8| {
        if b.is_ascii_digit() {
            b - b'0'
        } else {
            b - b'A' + 10
        }
    };
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            decoded.push(bytes[i]);
            i += 1;
            continue;
        }
        let hex = bytes.get(i + 1..i + 3).ok_or("a cut escape")?;
        if !hex
            .iter()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(b))
        {
            return Err("an escape not in upper-case hex");
        }
        match digit(hex[0]) << 4 | digit(hex[1]) {
            b'/' | b'\\' | b'.' | b';' | 0 => return Err("an encoded / \\ . ; or NUL"),
            b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') => {
                return Err("an escape of a character that needs none");
            }
            byte => decoded.push(byte),
        }
        i += 3;
    }
    String::from_utf8(decoded).map_err(|_| "escapes that are not UTF-8")
}

/// For the fuzz target: a method, a path and a host, one a line. What is
/// read must have the one reading the module promises.
#[doc(hidden)]
pub fn fuzz(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(3, '\n');
    let (method, path, host) = (
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
    );
    // On a Kubernetes target, the query is read too.
    let (kube_path, query) = path
        .split_once('?')
        .map_or((path, None), |(p, q)| (p, Some(q)));
    if let Ok(read) = HttpRequest::read_kube(method, kube_path, query, host) {
        let kube = read.kube.as_ref().expect("read as Kubernetes");
        let _ = (read.to_string(), kube.resource_name());
        let rule = super::kube::KubeRules {
            verbs: vec!["get".into()],
            resources: vec![Pattern::new("pods/*").expect("a pattern")],
            resources_written: vec!["pods/*".into()],
            namespaces: vec![Pattern::new("ci-*").expect("a pattern")],
            names: Vec::new(),
            reveal_secrets: false,
        };
        let _ = rule.covers(kube);
    }
    let Ok(read) = HttpRequest::read(method, path, host) else {
        return;
    };
    let path = &read.path;
    assert!(path.starts_with('/'), "{path:?}");
    assert!(!path.contains("//"), "{path:?}");
    assert!(!path.split('/').any(|s| s == "." || s == ".."), "{path:?}");
    assert!(!path.contains(['\\', ';', '\0']), "{path:?}");
    assert!(!read.host.contains(['/', ' ', '@']), "{:?}", read.host);
    let rule = HttpRequests {
        methods: vec!["GET".into()],
        paths: vec![Pattern::new("/api/**").expect("a pattern")],
        hosts: vec![Pattern::new("*.internal").expect("a pattern")],
    };
    let _ = rule.covers(&read);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_spelling_of_a_path_is_read() {
        for (path, read) in [
            ("/", "/"),
            ("/api/v1/items", "/api/v1/items"),
            ("/api/v1/items/", "/api/v1/items/"),
            ("/files/my%20file", "/files/my file"),
            ("/caf%C3%A9", "/café"),
        ] {
            assert_eq!(canonical_path(path).as_deref(), Ok(read), "{path}");
        }
        for path in [
            "",
            "api",
            "*",
            "//admin",
            "/api//admin",
            "/api/../admin",
            "/api/./admin",
            "/..",
            "/api/%2e%2e/admin",
            "/api/%2E%2E/admin",
            "/api%2Fadmin",
            "/api%2fadmin",
            "/api%5Cadmin",
            "/api\\admin",
            "/api/..;/admin",
            "/admin;x=1",
            "/%61dmin",
            "/a%7e",
            "/a%7E",
            "/a%",
            "/a%2",
            "/a%zz",
            "/a%00",
            "/a%FF",
            "/a b",
            "/a\0b",
            "/caf\u{e9}",
        ] {
            assert!(
                canonical_path(path).is_err(),
                "{path:?} read as {:?}",
                canonical_path(path)
            );
        }
    }

    #[test]
    fn methods_and_hosts_are_read_one_way() {
        let read = |m, h| HttpRequest::read(m, "/", h);
        assert_eq!(
            read("GET", "API.Example.com:8443").unwrap().host,
            "api.example.com"
        );
        assert_eq!(read("GET", "[::1]:443").unwrap().host, "::1");
        assert_eq!(read("GET", "10.0.0.1").unwrap().host, "10.0.0.1");
        assert_eq!(read("GET", "example.com.").unwrap().host, "example.com");
        assert!(read("get", "x").is_err());
        assert!(read("Delete", "x").is_err());
        assert!(read("", "x").is_err());
        assert!(read("GET", "").is_err());
        assert!(read("GET", ":443").is_err());
        assert!(read("GET", "x:y").is_err());
        assert!(read("GET", "a b").is_err());
        assert!(read("GET", "a@b").is_err());
    }

    #[test]
    fn a_rule_covers_what_all_its_fields_match() {
        let rule = HttpRequests {
            methods: vec!["GET".into()],
            paths: vec![Pattern::new("/api/v1/*").unwrap()],
            hosts: vec![],
        };
        let request = |m, p| HttpRequest::read(m, p, "h").unwrap();
        assert!(rule.covers(&request("GET", "/api/v1/items")));
        assert!(!rule.covers(&request("POST", "/api/v1/items")));
        assert!(!rule.covers(&request("GET", "/api/v1/items/3")));
        assert!(!rule.covers(&request("GET", "/api/v2/items")));
        let deep = HttpRequests {
            paths: vec![Pattern::new("/admin/**").unwrap()],
            ..Default::default()
        };
        assert!(deep.covers(&request("DELETE", "/admin/users/3")));
        assert!(HttpRequests::default().covers(&request("PUT", "/x")));
    }
}
