//! Command-line options (hand-parsed: a handful of flags does not justify a parser dependency).

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Write,
    Read,
    Send,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Write => "write",
            Op::Read => "read",
            Op::Send => "send",
        }
    }
}

pub struct Args {
    pub ops: Vec<Op>,
    pub sizes: Vec<usize>,
    pub iters: Option<usize>,
    /// Bytes per measurement when `iters` is not given.
    pub bytes: usize,
    pub depth: usize,
    pub channels: u16,
    pub anchor: bool,
}

const USAGE: &str = "usage: uccl-tcpx-bench [--ops write,read,send] [--sizes 4K,64K,1M,16M] [--iters N] \
[--bytes 512M] [--depth N] [--channels N] [--no-anchor]";

impl Args {
    pub fn parse(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut a = Args {
            ops: vec![Op::Write, Op::Read, Op::Send],
            sizes: vec![4 << 10, 64 << 10, 1 << 20, 16 << 20],
            iters: None,
            bytes: 512 << 20,
            depth: 4,
            channels: 2,
            anchor: true,
        };
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"));
            match flag.as_str() {
                "--ops" => a.ops = value()?.split(',').map(op).collect::<Result<_, _>>()?,
                "--sizes" => a.sizes = value()?.split(',').map(size).collect::<Result<_, _>>()?,
                "--iters" => a.iters = Some(number(&value()?)?),
                "--bytes" => a.bytes = size(&value()?)?,
                "--depth" => a.depth = number(&value()?)?,
                "--channels" => a.channels = number(&value()?)? as u16,
                "--no-anchor" => a.anchor = false,
                "-h" | "--help" => return Err(USAGE.into()),
                other => return Err(format!("unknown option {other}\n{USAGE}")),
            }
        }
        if a.ops.is_empty() || a.sizes.is_empty() || a.depth == 0 || a.channels == 0 || a.iters == Some(0) {
            return Err(format!("ops, sizes, depth, channels and iters must be non-empty / positive\n{USAGE}"));
        }
        Ok(a)
    }
}

fn op(s: &str) -> Result<Op, String> {
    match s {
        "write" => Ok(Op::Write),
        "read" => Ok(Op::Read),
        "send" => Ok(Op::Send),
        _ => Err(format!("unknown op {s:?} (write, read, send)")),
    }
}

fn number(s: &str) -> Result<usize, String> {
    s.parse().map_err(|_| format!("{s:?} is not a number"))
}

fn size(s: &str) -> Result<usize, String> {
    let (digits, unit) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    match number(digits)?.checked_mul(unit) {
        Some(0) | None => Err(format!("{s:?} is not a positive size")),
        Some(n) => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Args, String> {
        Args::parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn defaults_and_overrides() {
        let d = parse("").unwrap();
        assert_eq!(d.ops, vec![Op::Write, Op::Read, Op::Send]);
        assert!(d.anchor);
        let a = parse("--ops read,send --sizes 1K,2M,1G,7 --depth 2 --channels 4 --iters 9 --no-anchor").unwrap();
        assert_eq!(a.ops, vec![Op::Read, Op::Send]);
        assert_eq!(a.sizes, vec![1 << 10, 2 << 20, 1 << 30, 7]);
        assert_eq!((a.depth, a.channels, a.iters, a.anchor), (2, 4, Some(9), false));
    }

    #[test]
    fn rejects_bad_input() {
        for bad in
            ["--ops fly", "--sizes 0", "--sizes 4X", "--depth 0", "--iters", "--bogus", "--sizes 99999999999999999999G"]
        {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
