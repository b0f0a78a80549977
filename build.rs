//! Link options for the `vm-activator` binary; the library and tests are untouched.

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        // Packed relative relocations (DT_RELR; glibc ≥ 2.36, i.e. Debian 12, the image's
        // base). A position-independent executable carries one relocation per pointer in
        // its read-only data: as RELA entries they were 0.96 MB, every page of which the
        // loader reads at start — a whole MiB of the idle process's RSS. As RELR they are
        // 12 KB. Rust's default linker here (its bundled lld) and GNU ld ≥ 2.38 take the
        // option; gold does not.
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
        // The functions a start, the warm path and shutdown run, laid out first in `.text`
        // (link/hot-text.ld, made by link/profile.sh): an idle process maps the
        // executable's code 64 KiB around every page it ran, and 2,000 functions spread
        // over 14 MB had it map 11 MiB. A script of `INSERT` commands adds to the
        // linker's own layout instead of replacing it; x86-64 only, where Rust links with
        // its bundled lld (checked against it; `link/check.sh` checks the result in CI).
        let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
        let layout = std::path::Path::new(&manifest).join("link/hot-text.ld");
        let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
        if arch == "x86_64" && layout.exists() {
            println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", layout.display());
        }
        println!("cargo:rerun-if-changed=link/hot-text.ld");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
