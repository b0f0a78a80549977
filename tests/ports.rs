//! The ports tests hand to child processes (`fake_kube::ports`): below the kernel's
//! ephemeral range, so no outgoing connection can hold one when the child binds it — the
//! cause of a soak failure ("Address already in use" for an activator's admin port while
//! tests/delivery.rs opened hundreds of connections).

use fake_kube::ports::{ephemeral_range, free_port};

#[test]
fn ports_are_below_the_ephemeral_range_distinct_and_bindable() {
    let (low, _) = ephemeral_range();
    let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
    let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
    assert_eq!(distinct.len(), ports.len(), "each call hands out another port");
    for port in &ports {
        assert!(*port < low, "{port} is outside the ephemeral range from {low}");
        std::net::TcpListener::bind(("127.0.0.1", *port)).expect("bindable");
    }
}

/// What the old way did wrong, deterministically: a port read from a bind of port 0
/// is one the kernel also gives outgoing connections, so a client can hold it when
/// the child process binds.
#[test]
fn a_port_from_bind_zero_is_one_the_kernel_hands_out() {
    let (low, high) = ephemeral_range();
    let old = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert!((low..=high).contains(&old), "{old} in {low}-{high}");
    // An outgoing connection's source port comes from the same range.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
    let source = client.local_addr().unwrap().port();
    assert!((low..=high).contains(&source), "{source} in {low}-{high}");
    assert!(free_port() < low);
}
