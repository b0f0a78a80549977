//! Ports for servers that tests start as child processes (the activator binary,
//! Prometheus), which must be told their port before they bind it.
//!
//! The usual trick — bind port 0, read the port, close, hand it over — races: between
//! the close and the child's bind the kernel may give that port to anyone, and it does,
//! because port 0 is drawn from the *ephemeral* range, the same range every outgoing
//! connection's source port comes from. A test that opens hundreds of connections while
//! another starts a process hit it ("cannot listen on 127.0.0.1:35957: Address already
//! in use", a soak run of tests/delivery.rs). The ports handed out here lie below the
//! ephemeral range, where the kernel never picks on its own, so only another explicit
//! bind can take one: each process walks its own stretch of them, checking each with a
//! bind before handing it out.

use std::sync::atomic::{AtomicU32, Ordering};

/// Ports from here up to the start of the ephemeral range (above the test cluster's
/// 12379, 12380, 16443 and 20257).
const FIRST: u32 = 21_000;

/// The kernel's ephemeral range (`net.ipv4.ip_local_port_range`), Linux's default if it
/// cannot be read.
pub fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((parts.next()??, parts.next()??))
        })
        .unwrap_or((32_768, 60_999))
}

/// A port on 127.0.0.1 that nothing listens on now and that the kernel will not hand to
/// an outgoing connection or a bind of port 0.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let end = u32::from(ephemeral_range().0).max(FIRST + 1_000);
    let span = end - FIRST;
    // Each process starts somewhere else in the span, so concurrent test processes
    // (replicas started by one test, or two test binaries) rarely meet.
    let offset = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + (offset + n) % span;
        let Ok(port) = u16::try_from(port) else { continue };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range");
}
