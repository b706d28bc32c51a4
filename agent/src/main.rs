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
mod cli;
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

fn main() -> std::process::ExitCode {
    cli::main()
}
