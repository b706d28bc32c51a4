//! Builds the kernel programs in `ebpf-programs/` with aya-build and leaves
//! the object in `OUT_DIR`, where `intercept::ebpf` embeds it.
//!
//! With `AYA_BUILD_SKIP=1`, or when `bpf-linker` is not installed, an empty
//! stub object is written instead so that `cargo check`, clippy and the unit
//! tests work anywhere; an agent built that way refuses to start and says why
//! (run `cargo xtask setup` to get the toolchain).
use std::{env, fs, path::PathBuf, process::Command};

const EBPF_PACKAGE: &str = "interlock-ebpf";

fn main() {
    println!("cargo:rerun-if-changed=../common/src");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let stub = out_dir.join(EBPF_PACKAGE);

    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let linker = Command::new("bpf-linker").arg("--version").output().is_ok();
    if skip || !linker {
        let why = if skip {
            "AYA_BUILD_SKIP is set"
        } else {
            "bpf-linker is not installed"
        };
        println!("cargo:warning={why}: building with a stub eBPF object (run `cargo xtask setup`)");
        fs::write(&stub, []).expect("write stub eBPF object");
        return;
    }

    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf-programs");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: EBPF_PACKAGE,
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .expect("building the eBPF programs (see `cargo xtask setup`)");
}
