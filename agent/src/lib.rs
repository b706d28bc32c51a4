//! `interlock`: the host agent (daemon) and its command-line interface.
//!
//! The data path, module by module (see ARCHITECTURE.md):
//! `intercept` (kernel redirect + original destination) → `workload` (who is
//! calling) → `proxy` (accept, decode) → `policy` (decide, pure) → upstream,
//! with `access` writing one line per connection. `config` loads files,
//! `daemon` wires it together, `admin` serves the admin socket.
mod access;
mod addr;
mod admin;
mod approvals;
pub mod cli;
mod config;
mod daemon;
mod demo;
mod intercept;
mod keyfile;
mod policy;
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
}
