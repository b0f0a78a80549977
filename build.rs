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
    }
    println!("cargo:rerun-if-changed=build.rs");
}
