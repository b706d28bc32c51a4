//! `interlock`: the host agent (daemon) and its command-line interface;
//! the modules are in the library (`lib.rs`).
fn main() -> std::process::ExitCode {
    interlock::cli::main()
}
