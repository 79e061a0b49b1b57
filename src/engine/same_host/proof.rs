//! The proof that a same-host peer is the process it claims to be, before any of its memory is
//! read with `process_vm_readv`.
//!
//! Why a proof: a peer names a process id in its ProcessHello. Taken on its word, a peer could name
//! another process of ours (same user, so the kernel lets us read it) and have us copy that
//! process's memory into a region it may then read back: we would be its confused deputy. So the
//! peer also names its end of our control connection as a descriptor number, and we check with the
//! kernel's own records that the process holds that very socket:
//!
//! - our netns's TCP table (`/proc/self/net/tcp`, `tcp6`) lists the established socket whose local
//!   address is our peer's address and whose remote address is ours: on one host and network
//!   namespace that 4-tuple is one connection, so its inode is the peer's end of ours;
//! - `/proc/<pid>/fd/<fd>` must link to `socket:[<inode>]` (reading it needs the same ptrace
//!   permission as copying, in its read mode: where the kernel refuses that link, the probe says
//!   whether it refuses the copy too, and the refusal is the kernel's, not a failed claim);
//! - the process is pinned with a pidfd before that check and found alive after it, so the pid
//!   named the same process throughout and cannot be swapped for a reused one later.
//!
//! Other proofs considered: a nonce that the peer writes into its own memory at an address it
//! announces, which we read back, proves only that someone could put those bytes into that process;
//! a peer holding a write capability into another engine's region (all-to-all deployments hand
//! every agent everyone's) could plant it there. `SO_PEERCRED` needs a Unix socket, and binding a
//! second connection to this one needs a channel-binding step of its own. `pidfd_getfd` on the
//! announced descriptor proves the same as the fd link but is refused by common container seccomp
//! profiles. A process the peer passed its socket to (`SCM_RIGHTS`) passes too: that takes the
//! receiving process's cooperation.
//!
//! What the proof is for, and what it is not: it keeps a peer from steering our reads into a third
//! process. It grants the peer nothing: we only ever read the peer's memory (see `process.rs`),
//! and whether we may at all is the kernel's ptrace decision.
//!
//! The identity and the copy are told apart: the kernel may refuse `process_vm_readv` (its ptrace
//! attach check, which Yama's scope 1 denies between siblings) while the fd link, which needs only
//! the read-level check, proved who the peer is. Such a peer is still proven ([`Proven::readable`]
//! says the copy is refused).

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};

use std::sync::Arc;

use super::peers;
use super::process::PeerProcess;

/// Why a peer's claim did not make it a readable process.
#[derive(Debug)]
pub enum Refusal {
    /// The claim did not check out (a lying or confused peer, or a connection that left the host).
    Unproven(String),
    /// The claim checked out, but the kernel does not let us read the process (EPERM under ptrace
    /// rules or Yama, ENOSYS without pidfds or process_vm_readv, ESRCH when it exited).
    Kernel(std::io::Error),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Unproven(why) => write!(f, "the peer's process claim did not check out: {why}"),
            Refusal::Kernel(e) => write!(f, "the kernel refuses to let this process read the peer's memory: {e}"),
        }
    }
}

impl Refusal {
    /// Logs why the network path carries this connection's host memory: a failed claim every time
    /// (it may be an attack), a kernel refusal once per process and reason (a host policy that
    /// holds for every peer).
    pub fn log(&self, peer: SocketAddr) {
        static LOGGED: parking_lot::Mutex<Vec<i32>> = parking_lot::Mutex::new(Vec::new());
        match self {
            Refusal::Unproven(_) => log::warn!("same-host peer {peer}: {self}; host memory takes the network path"),
            Refusal::Kernel(e) => {
                let code = e.raw_os_error().unwrap_or(0);
                let mut logged = LOGGED.lock();
                if !logged.contains(&code) {
                    logged.push(code);
                    log::warn!(
                        "same-host peer {peer}: {self}; host memory between processes of this host takes the \
                         network path (logged once; EPERM: ptrace rules such as kernel.yama.ptrace_scope, or a peer of \
                         another user)"
                    );
                }
            }
        }
    }
}

/// A peer whose process claim checked out.
#[derive(Debug)]
pub struct Proven {
    /// The handle every connection of ours to that process shares (`peers.rs`).
    pub process: Arc<PeerProcess>,
    /// Whether the kernel lets us copy out of the process; its refusal (EPERM, ENOSYS, ESRCH)
    /// otherwise.
    pub readable: std::io::Result<()>,
}

/// Checks that process `pid` holds the peer's end of `control` as descriptor `fd`, and whether we
/// may read its memory.
pub fn prove(pid: u32, fd: u32, control: &TcpStream) -> Result<Proven, Refusal> {
    let io = |what: &str, e: std::io::Error| Refusal::Unproven(format!("{what}: {e}"));
    let ours = control.local_addr().map_err(|e| io("control socket address", e))?;
    let theirs = control.peer_addr().map_err(|e| io("control socket peer", e))?;
    if normalize(ours) == normalize(theirs) {
        return Err(Refusal::Unproven("the control connection is connected to itself".into()));
    }
    // Pinned first: if the pid still names this process after the check, it did throughout.
    let process = PeerProcess::open(pid).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSYS) | Some(libc::EPERM) => Refusal::Kernel(e),
        _ => io(&format!("process {pid}"), e),
    })?;
    let inode = peer_socket_inode(theirs, ours)?;
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).map_err(|e| {
        // The link needs ptrace access in read mode, so a process the kernel will not let us read
        // (not dumpable, another user) fails here before the probe: that is the kernel's refusal,
        // a host policy, not a claim that failed.
        if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM))
            && let Err(refused) = process.probe()
        {
            return Refusal::Kernel(refused);
        }
        io(&format!("fd {fd} of {pid}"), e)
    })?;
    let want = format!("socket:[{inode}]");
    if link.as_os_str() != want.as_str() {
        return Err(Refusal::Unproven(format!(
            "fd {fd} of process {pid} is {}, not the peer's end of this connection ({want})",
            link.display()
        )));
    }
    process.alive().map_err(|e| io(&format!("process {pid}"), e))?;
    let readable = process.probe();
    Ok(Proven { process: peers::shared(process), readable })
}

/// The inode of the established socket of this network namespace bound to `local` and connected to
/// `remote`.
fn peer_socket_inode(local: SocketAddr, remote: SocketAddr) -> Result<u64, Refusal> {
    let (local, remote) = (normalize(local), normalize(remote));
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let Ok(file) = std::fs::File::open(table) else { continue };
        for line in BufReader::new(file).lines().skip(1).map_while(Result::ok) {
            if let Some(inode) = match_line(&line, local, remote) {
                return Ok(inode);
            }
        }
    }
    Err(Refusal::Unproven(format!(
        "no established socket {local} -> {remote} in this network namespace: the peer's end is elsewhere"
    )))
}

/// A TCP table line's inode when it is an established socket from `local` to `remote`.
fn match_line(line: &str, local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    const ESTABLISHED: &str = "01";
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (l, r, state, inode) = (fields.get(1)?, fields.get(2)?, fields.get(3)?, fields.get(9)?);
    if *state != ESTABLISHED || parse_addr(l)? != local || parse_addr(r)? != remote {
        return None;
    }
    inode.parse().ok().filter(|&i| i != 0)
}

/// `HEXADDR:HEXPORT` as the kernel prints it: the address as 32-bit words in host byte order.
fn parse_addr(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok().map(u32::to_ne_bytes);
    let ip = match addr.len() {
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
    Some(normalize(SocketAddr::new(ip, port)))
}

/// IPv4-mapped IPv6 addresses as IPv4, so a v6 socket's view matches a v4 socket's.
fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn table_lines_parse_in_host_byte_order() {
        let v4 = "   3: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000  0 4242 1 0";
        let (l, r) = ("127.0.0.1:8080".parse().unwrap(), "127.0.0.1:50000".parse().unwrap());
        if cfg!(target_endian = "little") {
            assert_eq!(match_line(v4, l, r), Some(4242));
            assert_eq!(match_line(v4, r, l), None, "the other direction is our own socket");
            assert_eq!(match_line(&v4.replace(" 01 ", " 06 "), l, r), None, "TIME_WAIT is no connection");
            let mapped =
                "0: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:C350 01 0:0 0:0 0 0 0 77";
            assert_eq!(match_line(mapped, l, r), Some(77), "v4-mapped v6 matches the v4 view");
        }
        assert_eq!(parse_addr("zz:1F90"), None);
        assert_eq!(parse_addr("0100007F"), None);
    }

    /// A connection inside this process: we hold both ends, so we are the "peer" of either.
    fn connection() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (theirs, _) = listener.accept().unwrap();
        (ours, theirs)
    }

    #[test]
    fn the_process_holding_the_peer_end_is_proven() {
        let (ours, theirs) = connection();
        let me = std::process::id();
        let fd = u32::try_from(theirs.as_raw_fd()).unwrap();
        let proven = prove(me, fd, &ours).unwrap();
        assert_eq!(proven.process.pid(), me);
        proven.readable.unwrap();
    }

    /// Another process holding the peer's end (inherited as its descriptor 3) is proven too.
    #[test]
    fn another_process_holding_the_peer_end_is_proven() {
        use std::os::unix::process::CommandExt;
        let (ours, theirs) = connection();
        let raw = theirs.as_raw_fd();
        let mut command = std::process::Command::new("sleep");
        command.arg("30");
        // SAFETY: dup2 and fcntl are async-signal-safe and touch only the child's descriptor
        // table. The duplicate at 3 does not inherit close-on-exec; where the socket already is
        // 3, dup2 does nothing and the flag is cleared instead, or the child would lose it.
        unsafe {
            command.pre_exec(move || {
                let rc = if raw == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(raw, 3) };
                if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
            })
        };
        let mut child = command.spawn().unwrap();
        drop(theirs);
        let proven = prove(child.id(), 3, &ours);
        let refused_fd = prove(child.id(), 4, &ours);
        child.kill().unwrap();
        child.wait().unwrap();
        let proven = proven.unwrap();
        assert_eq!(proven.process.pid(), child.id());
        // Our own child: neither the ptrace rules nor Yama's scope 1 refuse its parent (scope 2
        // and 3 refuse all but privileged tracers).
        let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").unwrap_or_default();
        if scope.trim().parse::<u32>().is_ok_and(|s| s >= 2) {
            eprintln!("Yama ptrace scope {}: the copy may be refused", scope.trim());
        } else {
            proven.readable.unwrap();
        }
        assert!(matches!(refused_fd, Err(Refusal::Unproven(_))), "{refused_fd:?}");
    }

    #[test]
    fn a_peer_lying_about_its_process_or_socket_is_refused() {
        let (ours, theirs) = connection();
        let me = std::process::id();
        let fd = u32::try_from(theirs.as_raw_fd()).unwrap();
        // Our own end is not the peer's end.
        let own = u32::try_from(ours.as_raw_fd()).unwrap();
        assert!(matches!(prove(me, own, &ours), Err(Refusal::Unproven(_))));
        // Another connection's socket is not this one's.
        let (_, other) = connection();
        let other_fd = u32::try_from(other.as_raw_fd()).unwrap();
        assert!(matches!(prove(me, other_fd, &ours), Err(Refusal::Unproven(_))));
        // Another process does not hold our peer's socket at that number (sockets are close-on-exec).
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let lie = prove(child.id(), fd, &ours);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(matches!(lie, Err(Refusal::Unproven(_))), "{lie:?}");
        // A process that does not exist.
        assert!(matches!(prove(child.id(), fd, &ours), Err(Refusal::Unproven(_))));
        // Once the peer end is gone, nothing is proven any more.
        drop(theirs);
        assert!(prove(me, fd, &ours).is_err());
    }
}
