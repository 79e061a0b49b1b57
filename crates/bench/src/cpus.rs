//! CPU sets for `--cpus` and `--split-cores`: on one host, two processes that share every core
//! measure something two hosts never see (a receiver woken onto its sender's core copies data
//! still in that core's cache), so the loopback run can give each end its own half instead.

/// Parses a list like `0-7,12,14-15` (the form `taskset -c` takes).
pub fn parse(list: &str) -> Result<Vec<usize>, String> {
    let bad = || "expected CPU numbers and ranges like 0-7,12".to_string();
    let mut cpus = Vec::new();
    for part in list.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo.trim().parse().map_err(|_| bad())?, hi.trim().parse().map_err(|_| bad())?),
            None => {
                let n: usize = part.trim().parse().map_err(|_| bad())?;
                (n, n)
            }
        };
        if lo > hi || hi >= libc::CPU_SETSIZE as usize {
            return Err(bad());
        }
        cpus.extend(lo..=hi);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// The inverse of [`parse`], with runs folded into ranges.
pub fn format(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j { cpus[i].to_string() } else { format!("{}-{}", cpus[i], cpus[j]) });
        i = j + 1;
    }
    out.join(",")
}

/// The CPUs this process may run on.
pub fn allowed() -> Result<Vec<usize>, String> {
    // SAFETY: an all-zero cpu_set_t is an empty set; sched_getaffinity fills at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Err(format!("cannot read this process's CPU set: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: CPU_ISSET reads a bit of the set for an index below CPU_SETSIZE.
    Ok((0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect())
}

/// Restricts the calling thread, and every thread it starts afterwards, to `cpus`: called first
/// thing in `main`, that is the whole process.
pub fn pin(cpus: &[usize]) -> Result<(), String> {
    // SAFETY: an all-zero cpu_set_t is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: CPU_SET writes one bit of the set; `parse` and `allowed` keep indices below CPU_SETSIZE.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(format!("cannot run on CPUs {}: {}", format(cpus), std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `--split-cores`: the loopback server's CPUs and the client's.
#[derive(Debug)]
pub struct Split {
    pub server: Vec<usize>,
    pub client: Vec<usize>,
}

/// Splits `cpus` in two halves, the first for the server.
pub fn halves(cpus: &[usize]) -> Result<Split, String> {
    if cpus.len() < 2 {
        return Err(format!("--split-cores needs at least 2 CPUs, this process may use {}", format(cpus)));
    }
    let (server, client) = cpus.split_at(cpus.len() / 2);
    Ok(Split { server: server.to_vec(), client: client.to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_format_and_split() {
        assert_eq!(parse("0-3,8,10-11,2").unwrap(), [0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(format(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(format(&parse("5").unwrap()), "5");
        for bad in ["", "a", "3-1", "1-", "-1", "0-99999"] {
            assert!(parse(bad).unwrap_err().contains("ranges like 0-7,12"), "{bad:?}");
        }
        let h = halves(&parse("0-15").unwrap()).unwrap();
        assert_eq!((format(&h.server), format(&h.client)), ("0-7".to_string(), "8-15".to_string()));
        let h = halves(&[4, 9, 10]).unwrap();
        assert_eq!((h.server, h.client), (vec![4], vec![9, 10]));
        assert!(halves(&[3]).unwrap_err().contains("at least 2 CPUs"));
    }

    #[test]
    fn this_process_may_run_somewhere_and_pinning_to_that_set_works() {
        let mine = allowed().unwrap();
        assert!(!mine.is_empty());
        pin(&mine).unwrap();
        assert_eq!(allowed().unwrap(), mine);
    }
}
