//! Ports for child processes that cannot bind port 0 and report what they got (etcd, Postgres).

/// A port free on 127.0.0.1 now, for a child process to bind soon, chosen below the range the
/// kernel hands out for port 0 (`/proc/sys/net/ipv4/ip_local_port_range`): a process binding
/// port 0 in the meantime (every `serve --listen HOST:0`) cannot take it first.
pub fn free_port() -> std::io::Result<u16> {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_start.max(10_001));
    // A start that differs between processes and calls, so concurrent callers spread out.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut rng = crate::rng::Rng::new(u64::from(nanos) ^ u64::from(std::process::id()) << 32);
    let span = usize::from(high - low);
    for _ in 0..200 {
        let port = low + rng.below(span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    // A crowded range: the kernel's choice.
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_free_port_is_below_the_ephemeral_range_and_bindable() {
        let port = super::free_port().unwrap();
        assert!(port >= 10_000);
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    }
}
