//! The container image, built and started without a registry or a container runtime:
//! `deploy/image/build.sh` builds it with buildah and unpacks its root filesystem into
//! `target/image/rootfs`; here its entrypoint runs from that root filesystem — `chroot`,
//! as the image's user, the root mounted read-only, in a mount namespace of its own, as a
//! container runtime would start it — against the real kube-apiserver of `../shared/k8s`,
//! and gets an event for a VM. And the image holds what `deploy/Dockerfile` describes.
//!
//! Skipped with a message where the image was not built (CI builds it first, and
//! `CI=true` turns its absence into a failure), where this is not root (chroot and mounts
//! need it), and where the Kubernetes bundle is absent.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use support::binary::Activator;
use support::real_kube::{RealKube, Timings};

fn image_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/image")
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The built image's folder, or `None` (with the reason printed) where it cannot be used.
fn built_image() -> Option<PathBuf> {
    let dir = image_dir();
    if !dir.join("rootfs/usr/local/bin/vm-activator").is_file() {
        assert!(!in_ci(), "CI must build the image first (deploy/image/build.sh)");
        eprintln!("skipped: no image in target/image (run deploy/image/build.sh, as root, with buildah)");
        return None;
    }
    // /proc/self belongs to the effective user.
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1) != 0 {
        assert!(!in_ci(), "CI runs as root");
        eprintln!("skipped: starting the image with chroot needs root");
        return None;
    }
    Some(dir)
}

/// The final stage of deploy/Dockerfile: each directive's arguments, by directive.
fn dockerfile_final_stage() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/Dockerfile")).unwrap();
    let from = text.rfind("\nFROM ").expect("a FROM");
    text[from..]
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .map(|(d, rest)| (d.to_string(), rest.trim().to_string()))
        .collect()
}

fn directive(stage: &[(String, String)], name: &str) -> String {
    stage
        .iter()
        .find(|(d, _)| d == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("deploy/Dockerfile's final stage has no {name}"))
}

#[test]
fn the_image_holds_what_the_dockerfile_describes() {
    let Some(dir) = built_image() else { return };
    let stage = dockerfile_final_stage();
    let inspect: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("inspect.json")).unwrap()).unwrap();
    let config = &inspect["OCIv1"]["config"];
    // USER, ENTRYPOINT, EXPOSE: the same values.
    assert_eq!(config["User"], directive(&stage, "USER"), "{config}");
    let entrypoint: Value = serde_json::from_str(&directive(&stage, "ENTRYPOINT")).unwrap();
    assert_eq!(config["Entrypoint"], entrypoint, "{config}");
    let mut exposed: Vec<String> = directive(&stage, "EXPOSE")
        .split_whitespace()
        .map(|p| format!("{p}/tcp"))
        .collect();
    exposed.sort();
    let mut ports: Vec<String> = config["ExposedPorts"]
        .as_object()
        .expect("exposed ports")
        .keys()
        .cloned()
        .collect();
    ports.sort();
    assert_eq!(ports, exposed);
    // COPY: the dist binary where the Dockerfile puts it, the one the entrypoint runs.
    let copy = directive(&stage, "COPY");
    assert!(
        copy.contains("/target/dist/vm-activator"),
        "the Dockerfile copies the dist binary: {copy}"
    );
    let dest = copy.split_whitespace().last().unwrap();
    assert_eq!(entrypoint[0], dest);
    let rootfs = dir.join("rootfs");
    let binary = std::fs::read(rootfs.join(dest.trim_start_matches('/'))).expect("the binary in the image");
    let dist =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dist/vm-activator")).expect("dist binary");
    assert!(binary == dist, "the image's binary is target/dist/vm-activator");
    // FROM gcr.io/distroless/cc-debian12:nonroot: what that base provides, here from
    // Debian 12's packages — glibc and its loader, libgcc, CA certificates, time zones,
    // the nonroot user and its group, a sticky /tmp — and nothing to run but the binary.
    assert!(
        directive(&stage, "FROM").starts_with("gcr.io/distroless/cc-debian12:nonroot"),
        "the Dockerfile's base changed: update deploy/image/build.sh with it"
    );
    for file in [
        "lib64/ld-linux-x86-64.so.2",
        "lib/x86_64-linux-gnu/libc.so.6",
        "lib/x86_64-linux-gnu/libm.so.6",
        "lib/x86_64-linux-gnu/libgcc_s.so.1",
        "etc/ssl/certs/ca-certificates.crt",
        "usr/share/zoneinfo/Europe/Berlin",
        "etc/services",
        "etc/nsswitch.conf",
    ] {
        assert!(rootfs.join(file).exists(), "the image has /{file}");
    }
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains("nonroot:x:65532:65532:"), "{passwd}");
    let group = std::fs::read_to_string(rootfs.join("etc/group")).unwrap();
    assert!(group.contains("nonroot:x:65532:"), "{group}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(rootfs.join("tmp")).unwrap().permissions().mode() & 0o7777,
        0o1777
    );
    for shell in ["bin/sh", "bin/bash", "usr/bin/sh", "bin/busybox"] {
        assert!(!rootfs.join(shell).exists(), "no shell in the image: /{shell}");
    }
    let size = std::fs::read_to_string(dir.join("size.txt")).unwrap();
    println!("image size: {}", size.replace('\n', " "));
}

/// The command that starts the image's entrypoint as a container runtime would: a mount
/// namespace of its own, the root filesystem bound read-only with `/proc`, `/dev` and the
/// configuration (`conf`, at `/etc/vm-activator`) mounted into it, then `chroot` as the
/// image's user.
fn launcher(rootfs: &Path, mnt: &Path, conf: &Path, user: &str, entrypoint: &str) -> Vec<String> {
    let script = r#"set -e
root=$1 mnt=$2 conf=$3 user=$4 entry=$5; shift 5
mount --bind "$root" "$mnt"
mount -o remount,bind,ro "$mnt"
mount -t proc proc "$mnt/proc"
mount --rbind /dev "$mnt/dev"
mount --bind -o ro "$conf" "$mnt/etc/vm-activator"
exec chroot --userspec="$user" "$mnt" "$entry" "$@""#;
    [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(
        [rootfs, mnt, conf]
            .iter()
            .map(|p| p.to_str().expect("UTF-8 paths").to_string()),
    )
    .chain([user.to_string(), entrypoint.to_string()])
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_starts_read_only_as_non_root_and_delivers_an_event_on_the_real_api_server() {
    let Some(dir) = built_image() else { return };
    let Some(kube) = RealKube::start(Timings::default()).await else {
        return;
    };
    let stage = dockerfile_final_stage();
    let user = directive(&stage, "USER");
    let entrypoint: Value = serde_json::from_str(&directive(&stage, "ENTRYPOINT")).unwrap();
    let rootfs = dir.join("rootfs");
    // Mount points a container runtime makes; the image itself need not have them.
    for point in ["proc", "dev", "etc/vm-activator"] {
        std::fs::create_dir_all(rootfs.join(point)).unwrap();
    }
    let scratch = tempfile::tempdir().unwrap();
    let (mnt, conf) = (scratch.path().join("root"), scratch.path().join("conf"));
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(&conf).unwrap();
    kube.write_activator_files(&conf, "/etc/vm-activator");
    use std::os::unix::fs::PermissionsExt;
    for path in [scratch.path().to_path_buf(), conf.clone()] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for file in ["kubeconfig", "config.yaml"] {
        std::fs::set_permissions(conf.join(file), std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    kube.create_vm(
        "imaged",
        json!({"vm-activator.io/enabled": "true"}),
        json!({"vm-activator.io/port": "8080", "vm-activator.io/readiness": "http:/healthz"}),
        json!({}),
    )
    .await;
    let launcher = launcher(
        &rootfs,
        &mnt,
        &conf,
        &user,
        entrypoint[0].as_str().expect("an entrypoint"),
    );
    let activator = Activator::spawn_via(
        &launcher,
        &["--config", "/etc/vm-activator/config.yaml", "--auth", "none"],
    )
    .await;
    activator.wait_status("/readyz", 200, Duration::from_secs(30)).await;

    // Who and where it runs: the image's user, its own root, read-only.
    let pid = activator.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let gid_line = status.lines().find(|l| l.starts_with("Gid:")).unwrap();
    let (uid, gid) = user.split_once(':').unwrap();
    assert!(uid_line.split_whitespace().skip(1).all(|id| id == uid), "{uid_line}");
    assert!(gid_line.split_whitespace().skip(1).all(|id| id == gid), "{gid_line}");
    let root = std::fs::read_link(format!("/proc/{pid}/root")).unwrap();
    assert_eq!(root, mnt, "the process's root is the image's root filesystem");
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let own_root = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .expect("its root in its mountinfo");
    let options = own_root.split_whitespace().nth(5).unwrap();
    assert!(
        options.split(',').any(|o| o == "ro"),
        "root mounted read-only: {own_root}"
    );
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(exe.ends_with("usr/local/bin/vm-activator"), "{}", exe.display());

    // An event for a halted VM: started through the real API server (as the
    // ServiceAccount the shipped RBAC binds), held, delivered by the guest.
    let path = format!("/{}/imaged", kube.namespace());
    let response = activator.send(&path, "from-the-image").await;
    assert_eq!(response.status(), 202, "{:?}", response.text().await);
    assert_eq!(kube.guest_events("imaged"), vec!["from-the-image".to_string()]);
    assert_eq!(kube.vm("imaged").await.unwrap()["spec"]["runStrategy"], "Always");
    // Bad input from inside the image, too: a clear error, nothing started.
    let response = activator.send(&format!("/{}/no-such-vm", kube.namespace()), "x").await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "unknown_vm");
    println!(
        "image: started as {user} from {} (read-only root), /readyz 200, event 202",
        rootfs.display()
    );
}
