//! Build script of every bundled guest: links its binaries as freestanding static executables
//! loaded at 4 MiB (`rebound_abi::IMAGE_BASE`), with the SDK runtime's `_start` and no C
//! runtime. Given here rather than in `.cargo/config.toml` so that they apply to the guests'
//! binaries only: build scripts of dependencies (smoltcp's `heapless`) run on the host and
//! link as ordinary programs.
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
