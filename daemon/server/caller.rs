//! Who is at the other end of a connection: the local user that owns the
//! client's socket, for the namespaces only some users may pull
//! (credentials or `private = true`).
//!
//! For TCP the kernel lists every socket of this network namespace with
//! its owner in `/proc/net/tcp` and `/proc/net/tcp6`: the client's own
//! socket is the row whose local address is the connection's peer address
//! and whose remote address is ours. The uid there is shown as seen from
//! the reader's user namespace: under systemd's `PrivateUsers=yes` root and
//! the service's own user keep their ids and every other user reads as
//! 65534 (nobody). `/proc/self/net` is read rather than `/proc/net`, which
//! `ProcSubset=pid` hides.
//!
//! A client that is not on this host (no such row) has no local user and
//! is never allowed.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::OnceCell;

use crate::config::ServerSettings;

/// The two ends of a client connection, and the owner of the client's
/// socket once looked up (at most once per connection).
pub struct Caller {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    uid: OnceCell<Option<u32>>,
}

impl Caller {
    pub fn new(peer: SocketAddr, local: SocketAddr) -> Caller {
        Caller {
            peer,
            local,
            uid: OnceCell::new(),
        }
    }

    /// The uid owning the client's socket, `None` when it is not a socket
    /// of this host. Read off the async threads.
    pub async fn uid(&self) -> Option<u32> {
        *self
            .uid
            .get_or_init(|| async {
                let (peer, local) = (self.peer, self.local);
                tokio::task::spawn_blocking(move || socket_owner(peer, local))
                    .await
                    .unwrap_or(None)
            })
            .await
    }

    /// Whether the client may pull private namespaces under `s`.
    pub async fn allowed(&self, s: &ServerSettings) -> bool {
        let Some(uid) = self.uid().await else {
            return false;
        };
        if s.allowed_uids.contains(&uid) {
            return true;
        }
        if s.allowed_gids.is_empty() {
            return false;
        }
        let groups = tokio::task::spawn_blocking(move || GROUPS.of(uid))
            .await
            .unwrap_or_default();
        groups.iter().any(|g| s.allowed_gids.contains(g))
    }
}

/// The owner of the local socket whose address is `client` and whose
/// peer is `server`, from `/proc/self/net/tcp{,6}`.
fn socket_owner(client: SocketAddr, server: SocketAddr) -> Option<u32> {
    ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .iter()
        .find_map(|path| {
            let table = std::fs::read_to_string(path).ok()?;
            owner_in(&table, client, server)
        })
}

/// The uid column of the row of `table` (the text of `/proc/net/tcp` or
/// `tcp6`) whose local address is `client` and remote address `server`.
/// IPv4 addresses mapped into IPv6 compare as IPv4.
pub fn owner_in(table: &str, client: SocketAddr, server: SocketAddr) -> Option<u32> {
    let (client, server) = (canonical(client), canonical(server));
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local = canonical(parse_address(fields.get(1)?)?);
        let remote = canonical(parse_address(fields.get(2)?)?);
        (local == client && remote == server)
            .then(|| fields.get(7)?.parse().ok())
            .flatten()
    })
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// `0100007F:1F90` (IPv4) or 32 hex digits then the port (IPv6): the
/// address is the kernel's in-memory bytes printed as native-endian
/// 32-bit words, the port a plain hexadecimal number.
fn parse_address(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Group memberships by uid, from the system's user database, kept a
/// minute (the database is not read for every connection).
struct Groups {
    known: Mutex<HashMap<u32, (Instant, Vec<u32>)>>,
}

static GROUPS: std::sync::LazyLock<Groups> = std::sync::LazyLock::new(|| Groups {
    known: Mutex::default(),
});

/// How long a user's groups are trusted.
const GROUPS_TTL: Duration = Duration::from_secs(60);

/// Users whose groups are kept at most.
const GROUPS_KEPT: usize = 256;

impl Groups {
    /// The primary and supplementary groups of `uid` (blocking).
    fn of(&self, uid: u32) -> Vec<u32> {
        if let Some((at, groups)) = self.known.lock().get(&uid) {
            if at.elapsed() < GROUPS_TTL {
                return groups.clone();
            }
        }
        let groups = lookup_groups(uid);
        let mut known = self.known.lock();
        if known.len() >= GROUPS_KEPT {
            known.retain(|_, (at, _)| at.elapsed() < GROUPS_TTL);
            if known.len() >= GROUPS_KEPT {
                known.clear();
            }
        }
        known.insert(uid, (Instant::now(), groups.clone()));
        groups
    }
}

fn lookup_groups(uid: u32) -> Vec<u32> {
    use nix::unistd::{getgrouplist, Uid, User};
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return Vec::new();
    };
    let Ok(name) = std::ffi::CString::new(user.name.as_bytes()) else {
        return vec![user.gid.as_raw()];
    };
    match getgrouplist(&name, user.gid) {
        Ok(groups) => groups.iter().map(|g| g.as_raw()).collect(),
        Err(_) => vec![user.gid.as_raw()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows as the kernel prints them: a listener, the daemon's end of a
    /// connection, and the client's end owned by a user that systemd's
    /// `PrivateUsers=yes` shows as 65534.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1694 00000000:0000 0A 00000000:00000000 00:00000000 00000000   998        0 1082 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1694 0100007F:D431 01 00000000:00000000 00:00000000 00000000   998        0 2001 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:D431 0100007F:1694 01 00000000:00000000 00:00000000 00000000 65534        0 2002 1 0000000000000000 20 4 30 10 -1
   3: 0200007F:D432 0100007F:1694 01 00000000:00000000 00:00000000 00000000     0        0 2003 1 0000000000000000 20 4 30 10 -1
";

    /// `::1` port 5780 to `::1` port 40000 (owned by root), and an IPv4
    /// client seen through a dual-stack socket.
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:9C40 00000000000000000000000001000000:1694 01 00000000:00000000 00:00000000 00000000     0        0 3001 1 0000000000000000 20 4 30 10 -1
   1: 0000000000000000FFFF00000100007F:9C41 0000000000000000FFFF00000100007F:1694 01 00000000:00000000 00:00000000 00000000  1000        0 3002 1 0000000000000000 20 4 30 10 -1
";

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_client_socket_row_gives_its_owner() {
        let server = a("127.0.0.1:5780");
        // 0xD431 = 54321: the client's row, not the daemon's own end.
        assert_eq!(owner_in(TCP, a("127.0.0.1:54321"), server), Some(65534));
        // Another client address, same port number.
        assert_eq!(owner_in(TCP, a("127.0.0.2:54322"), server), Some(0));
        assert_eq!(owner_in(TCP, a("127.0.0.1:54322"), server), None);
        // A dual-stack listener sees IPv4 clients as mapped addresses.
        assert_eq!(
            owner_in(
                TCP,
                a("[::ffff:127.0.0.1]:54321"),
                a("[::ffff:127.0.0.1]:5780")
            ),
            Some(65534)
        );
    }

    #[test]
    fn ipv6_rows() {
        let server = a("[::1]:5780");
        assert_eq!(owner_in(TCP6, a("[::1]:40000"), server), Some(0));
        assert_eq!(
            owner_in(TCP6, a("127.0.0.1:40001"), a("127.0.0.1:5780")),
            Some(1000)
        );
        assert_eq!(owner_in(TCP6, a("[::1]:40001"), server), None);
    }

    #[test]
    fn garbage_is_no_owner() {
        let c = a("127.0.0.1:1");
        assert_eq!(owner_in("", c, c), None);
        assert_eq!(owner_in("header\n0: zz:zz yy:yy", c, c), None);
        assert_eq!(
            owner_in("header\n0: 0100007F:0001 0100007F:0001", c, c),
            None
        );
    }

    #[tokio::test]
    async fn a_real_loopback_connection_is_owned_by_this_process_user() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(server).await.unwrap();
        let (_conn, peer) = listener.accept().await.unwrap();
        let caller = Caller::new(peer, server);
        assert_eq!(caller.uid().await, Some(nix::unistd::getuid().as_raw()));
        let me = nix::unistd::getuid().as_raw();
        let only_me = ServerSettings {
            allowed_uids: vec![me],
            allowed_gids: Vec::new(),
            ..Default::default()
        };
        assert!(caller.allowed(&only_me).await);
        let nobody = ServerSettings {
            allowed_uids: vec![me.wrapping_add(1)],
            allowed_gids: Vec::new(),
            ..Default::default()
        };
        assert!(!caller.allowed(&nobody).await);
        let my_group = ServerSettings {
            allowed_uids: Vec::new(),
            allowed_gids: vec![nix::unistd::getgid().as_raw()],
            ..Default::default()
        };
        assert!(caller.allowed(&my_group).await);
        // Not a local socket at all.
        let remote = Caller::new(a("192.0.2.1:1234"), server);
        assert_eq!(remote.uid().await, None);
        assert!(!remote.allowed(&only_me).await);
    }
}
