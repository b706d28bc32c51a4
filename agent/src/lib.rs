//! `interlock`: the host agent (daemon) and its command-line interface.
//!
//! The data path, module by module (see ARCHITECTURE.md):
//! `intercept` (kernel redirect + original destination) → `workload` (who is
//! calling) → `proxy` (accept, decode) → `policy` (decide, pure) → upstream,
//! with `access` writing one line per connection. `config` loads files,
//! `daemon` wires it together, `admin` serves the admin socket, `metrics`
//! the Prometheus endpoint, `policy_source` pulls signed policy bundles.
mod access;
mod addr;
mod admin;
mod approvals;
pub mod cli;
mod config;
mod conn;
mod daemon;
mod demo;
mod intercept;
mod keyfile;
mod learn;
mod local_http;
mod masking;
mod metrics;
mod policy;
mod policy_source;
mod principal;
mod proxy;
mod sessions;
mod tls;
mod workload;

/// Entry points for the fuzz targets in `fuzz/`: parsers of bytes that come
/// from a workload or a server.
#[doc(hidden)]
pub mod fuzzing {
    /// PostgreSQL framing and the message fields the proxy reads.
    pub fn postgres_frames(data: &[u8]) {
        crate::proxy::postgres::fuzz::frames(data);
    }

    /// SQL analysis and name resolution.
    pub fn sql(data: &[u8]) {
        crate::proxy::postgres::fuzz::sql(data);
    }

    /// SFTP packets both ways and command output through the masks.
    pub fn ssh_channel(data: &[u8]) {
        crate::proxy::ssh::fuzz::channel(data);
    }

    /// SSH command lines through the shell parser and rule patterns.
    pub fn command_line(data: &[u8]) {
        crate::proxy::ssh::fuzz::command_line(data);
    }

    /// An HTTP request's method, path and host as policy reads them, and
    /// a response body through the scrub of the held credential and the
    /// Secret masks and value patterns, a terminal's WebSocket stream and
    /// a port-forward's SPDY read in pieces.
    pub fn http_request(data: &[u8]) {
        crate::policy::fuzz_http_request(data);
        crate::proxy::http::fuzz_scrub(data);
        crate::masking::json::fuzz(data);
        crate::proxy::websocket::fuzz(data);
        crate::proxy::spdy::fuzz(data);
    }

    /// A configuration file through the loader, and a policy bundle's
    /// envelope (from a fleet's source): errors, never a panic.
    pub fn config(data: &[u8]) {
        let _ = crate::config::Config::from_text("fuzz.toml", &String::from_utf8_lossy(data));
        // RFC 8032 test 1: the seed corpus has a bundle signed with its key.
        let key = "ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";
        let trusted = crate::config::bundle::TrustedKey::parse(key).expect("a valid key");
        let _ = crate::config::bundle::open(data, &[trusted]);
    }

    #[cfg(test)]
    mod tests {
        /// Every target's seed corpus goes through its entry point on
        /// every test run.
        #[test]
        fn the_seed_corpus_passes() {
            let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
            for (target, run) in [
                ("postgres_frames", super::postgres_frames as fn(&[u8])),
                ("sql", super::sql),
                ("ssh_channel", super::ssh_channel),
                ("command_line", super::command_line),
                ("http_request", super::http_request),
                ("config", super::config),
            ] {
                let mut seen = 0;
                for entry in std::fs::read_dir(corpus.join(target)).unwrap() {
                    run(&std::fs::read(entry.unwrap().path()).unwrap());
                    seen += 1;
                }
                assert!(seen > 0, "{target} has seeds");
            }
        }
    }
}
