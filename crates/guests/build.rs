//! Builds the guest programs in `guests/` (their own workspace: no_std, panic=abort, static,
//! linked at 4 MiB) with the same stable toolchain, so a plain `cargo build` of Rebound needs no
//! extra step. The ELF files land in OUT_DIR and are embedded by `src/lib.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

const GUESTS: &[&str] = &["demo", "testguest", "kv"];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .join("../..")
        .canonicalize()
        .expect("workspace root");
    let guests = root.join("guests");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let target_dir = out.join("target");

    for dir in [
        guests.clone(),
        root.join("crates/guest"),
        root.join("crates/abi"),
        // The guests' build script is the `rebound new` template's.
        root.join("crates/rebound/templates/guest"),
    ] {
        watch(&dir);
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guests)
        .args(["build", "--release", "--target-dir"])
        .arg(&target_dir);
    // The outer build's settings must not leak in: guests have their own flags
    // (guests/.cargo/config.toml) and are not linted or instrumented with the host crates.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_PKG_NAME",
    ] {
        cmd.env_remove(var);
    }
    for (k, _) in env::vars_os() {
        if k.to_string_lossy().starts_with("CARGO_PROFILE_") {
            cmd.env_remove(k);
        }
    }
    let status = cmd.status().expect("cannot run cargo to build the guests");
    assert!(
        status.success(),
        "building the guest programs in {} failed",
        guests.display()
    );

    for g in GUESTS {
        let src = target_dir.join("release").join(g);
        fs::copy(&src, out.join(format!("{g}.elf")))
            .unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
    }
}

fn watch(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.file_name().is_some_and(|n| n == "target") {
            continue;
        }
        if p.is_dir() {
            watch(&p);
        } else {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
}
