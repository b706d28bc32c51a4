//! `interlock`: the host agent (daemon) and its command-line interface;
//! the modules are in the library (`lib.rs`).
fn main() -> std::process::ExitCode {
    fewer_malloc_arenas();
    interlock::cli::main()
}

/// glibc gives each thread that meets contention an arena of its own (up
/// to 8 per core), and each keeps what it once held: the commit, index
/// and sled threads' arenas held the agent's RSS ~15 MB above what two
/// arenas need, at the same throughput (docs/BENCHMARKS.md, HTTP). Set
/// before any thread starts.
fn fewer_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; no thread runs yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
