//! Tells the connection task the moment the network comes back: a link going up, an
//! address or a route appearing (rtnetlink multicast groups). Without it a reconnect waits
//! out its backoff while the car is already back in coverage.
//!
//! Hand-written on `libc` rather than a netlink crate: it only needs to know *that*
//! something appeared, not what, which is one socket, one bind and a header walk.

use std::sync::Arc;
use tokio::sync::Notify;

/// Starts the watcher thread; returns false (and the agent relies on its backoff alone) if
/// the kernel or the sandbox gives no netlink socket.
pub fn start(notify: Arc<Notify>) -> bool {
    let fd = match open() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::debug!("no netlink route socket ({e}): reconnects follow the backoff only");
            return false;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("netwatch".into())
        .spawn(move || watch(fd, &notify));
    spawned.is_ok()
}

fn open() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_nl is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr.nl_groups = (libc::RTMGRP_LINK
        | libc::RTMGRP_IPV4_IFADDR
        | libc::RTMGRP_IPV4_ROUTE
        | libc::RTMGRP_IPV6_IFADDR
        | libc::RTMGRP_IPV6_ROUTE) as u32;
    // SAFETY: `addr` is a valid sockaddr_nl of the size given.
    let rc = unsafe {
        libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn watch(fd: std::os::fd::OwnedFd, notify: &Notify) {
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // SAFETY: `buf` is valid for `buf.len()` bytes.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // Overrun (a burst of events): something changed anyway.
                Some(libc::ENOBUFS) => notify.notify_one(),
                Some(libc::EINTR) => {}
                _ => {
                    tracing::debug!("netlink watcher stops: {e}");
                    return;
                }
            }
            continue;
        }
        if appeared(&buf[..n as usize]) {
            notify.notify_one();
        }
    }
}

/// Whether the datagram announces a link that is up, a new address or a new route.
pub fn appeared(mut msg: &[u8]) -> bool {
    const HDR: usize = 16; // struct nlmsghdr
    const IFF_UP_RUNNING: u32 = (libc::IFF_UP | libc::IFF_RUNNING) as u32;
    let mut any = false;
    while msg.len() >= HDR {
        let len = u32::from_ne_bytes([msg[0], msg[1], msg[2], msg[3]]) as usize;
        let kind = u16::from_ne_bytes([msg[4], msg[5]]);
        if len < HDR || len > msg.len() {
            break;
        }
        let body = &msg[HDR..len];
        any |= match kind {
            libc::RTM_NEWADDR | libc::RTM_NEWROUTE => true,
            // struct ifinfomsg: family, pad, type (u16), index (i32), flags (u32).
            libc::RTM_NEWLINK if body.len() >= 12 => {
                let flags = u32::from_ne_bytes([body[8], body[9], body[10], body[11]]);
                flags & IFF_UP_RUNNING == IFF_UP_RUNNING
            }
            _ => false,
        };
        msg = &msg[len.next_multiple_of(4).min(msg.len())..];
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nlmsg(kind: u16, body: &[u8]) -> Vec<u8> {
        let len = 16 + body.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(body);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    fn ifinfo(flags: u32) -> Vec<u8> {
        let mut b = vec![0u8; 8];
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&[0; 4]);
        b
    }

    #[test]
    fn a_link_up_or_a_new_route_counts_a_link_down_does_not() {
        let up = (libc::IFF_UP | libc::IFF_RUNNING) as u32;
        assert!(appeared(&nlmsg(libc::RTM_NEWLINK, &ifinfo(up))));
        assert!(!appeared(&nlmsg(
            libc::RTM_NEWLINK,
            &ifinfo(libc::IFF_UP as u32)
        )));
        assert!(!appeared(&nlmsg(libc::RTM_DELROUTE, &[0; 12])));
        let mut two = nlmsg(libc::RTM_DELADDR, &[0; 8]);
        two.extend(nlmsg(libc::RTM_NEWROUTE, &[0; 12]));
        assert!(appeared(&two));
        assert!(!appeared(&[1, 2, 3]), "a short datagram is ignored");
    }
}
