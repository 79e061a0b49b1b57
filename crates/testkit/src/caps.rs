//! Lowering the calling thread's effective capabilities, so that a test run as root meets file
//! modes and the kernel's ptrace check as an unprivileged process would. The raw `capset` call
//! changes the calling thread alone (threads it starts afterwards inherit the set).

pub const CAP_DAC_OVERRIDE: u32 = 1;
pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_SYS_PTRACE: u32 = 19;

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: two data words.
const VERSION_3: u32 = 0x2008_0522;

fn get() -> std::io::Result<[Data; 2]> {
    let mut header = Header { version: VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: a version 3 header and the two data words that version reads and writes.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if rc == 0 { Ok(data) } else { Err(std::io::Error::last_os_error()) }
}

/// Whether `cap` is in the calling thread's effective set.
pub fn effective(cap: u32) -> std::io::Result<bool> {
    Ok(get()?[(cap / 32) as usize].effective & (1 << (cap % 32)) != 0)
}

/// Clears `caps` from the calling thread's effective set.
pub fn drop_effective(caps: &[u32]) -> std::io::Result<()> {
    let mut data = get()?;
    for &cap in caps {
        data[(cap / 32) as usize].effective &= !(1 << (cap % 32));
    }
    let mut header = Header { version: VERSION_3, pid: 0 };
    // SAFETY: as for capget; the kernel only reads the data words, and lowering the effective set
    // within the permitted one is always allowed.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}
