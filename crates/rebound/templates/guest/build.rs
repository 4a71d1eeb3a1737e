//! Links this package's binaries as Rebound guests: freestanding static executables (no C
//! runtime, no libc, not position-independent) loaded at 4 MiB, entered at the SDK's `_start`.
//! Given here rather than in `.cargo/config.toml` so that the guest builds the same from any
//! directory (`cargo build --manifest-path ...`), and so that dependencies' build scripts still
//! link as ordinary host programs.
fn main() {
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--image-base=0x400000",
        "-Wl,--build-id=none",
        "-Wl,-z,noexecstack",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
