//! The kinds of value a knob takes: how each reads a variable's text, what it says it expected
//! when the text is wrong, and how the reference page (docs/CONFIG.md) shows its values and
//! default. The table of knobs itself is in `config.rs`.

use std::fmt::Display;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::error::Error;
use crate::proto::AuthKey;

/// Why a value was refused; it becomes the message of an invalid-parameter error naming the variable.
pub(crate) enum Reject {
    /// `environment variable NAME="value" is invalid: expected ...`
    Expected(String),
    /// `environment variable NAME="value": ...`, where what went wrong is not the value's form.
    Because(String),
}

pub(crate) trait Kind {
    type Out;
    /// The value of a set variable (trimmed, never empty).
    fn parse(&self, raw: &str) -> Result<Self::Out, Reject>;
    /// The values the knob takes, for the reference page.
    fn values(&self) -> String;
    /// A value as the reference page shows it (a constant default).
    fn show(&self, value: &Self::Out) -> String;
}

pub(crate) fn bad(name: &str, value: &str, expected: &str) -> Error {
    Error::invalid(format!("environment variable {name}={value:?} is invalid: expected {expected}"))
}

/// The knob `name` as `get` has it, else `default()`.
pub(crate) fn read<K: Kind>(
    get: &impl Fn(&str) -> Option<String>,
    name: &str,
    kind: &K,
    default: impl FnOnce() -> K::Out,
) -> crate::error::Result<K::Out> {
    let Some(raw) = get(name) else { return Ok(default()) };
    kind.parse(&raw).map_err(|why| match why {
        Reject::Expected(expected) => bad(name, &raw, &expected),
        Reject::Because(why) => Error::invalid(format!("environment variable {name}={raw:?}: {why}")),
    })
}

/// An integer in `min..=max`.
pub(crate) struct Int<T>(pub T, pub T);

impl<T: FromStr + PartialOrd + Display + Copy> Kind for Int<T> {
    type Out = T;
    fn parse(&self, raw: &str) -> Result<T, Reject> {
        match raw.parse::<T>() {
            Ok(v) if v >= self.0 && v <= self.1 => Ok(v),
            _ => Err(Reject::Expected(format!("an integer in {}..={}", self.0, self.1))),
        }
    }
    fn values(&self) -> String {
        format!("{}–{}", self.0, self.1)
    }
    fn show(&self, value: &T) -> String {
        value.to_string()
    }
}

/// `0` or `1`.
pub(crate) struct Flag;

impl Kind for Flag {
    type Out = bool;
    fn parse(&self, raw: &str) -> Result<bool, Reject> {
        Int(0u8, 1).parse(raw).map(|v| v == 1)
    }
    fn values(&self) -> String {
        "0 or 1".into()
    }
    fn show(&self, value: &bool) -> String {
        u8::from(*value).to_string()
    }
}

/// A byte count in `min..=max`, in [`parse_bytes`]'s notation.
pub(crate) struct Size(pub u32, pub u32);

impl Kind for Size {
    type Out = u32;
    fn parse(&self, raw: &str) -> Result<u32, Reject> {
        match parse_bytes(raw) {
            Some(v) if (self.0 as u64..=self.1 as u64).contains(&v) => Ok(v as u32),
            _ => {
                Err(Reject::Expected(format!("a size in {}..={} bytes (K, M and G suffixes allowed)", self.0, self.1)))
            }
        }
    }
    fn values(&self) -> String {
        format!("{}–{} bytes", show_bytes(self.0 as u64), show_bytes(self.1 as u64))
    }
    fn show(&self, value: &u32) -> String {
        show_bytes(*value as u64)
    }
}

/// A duration in whole milliseconds, `min..=max`.
pub(crate) struct Millis(pub u64, pub u64);

impl Kind for Millis {
    type Out = Duration;
    fn parse(&self, raw: &str) -> Result<Duration, Reject> {
        Int(self.0, self.1).parse(raw).map(Duration::from_millis)
    }
    fn values(&self) -> String {
        format!("{}–{} ms", self.0, self.1)
    }
    fn show(&self, value: &Duration) -> String {
        value.as_millis().to_string()
    }
}

/// A duration in whole microseconds, `0..=max`.
pub(crate) struct Micros(pub u64);

impl Kind for Micros {
    type Out = Duration;
    fn parse(&self, raw: &str) -> Result<Duration, Reject> {
        Int(0, self.0).parse(raw).map(Duration::from_micros)
    }
    fn values(&self) -> String {
        format!("0–{} µs", self.0)
    }
    fn show(&self, value: &Duration) -> String {
        value.as_micros().to_string()
    }
}

/// One of a few names, in any case; `note` follows the list of names in the message.
pub(crate) struct Choice<T: 'static>(pub &'static [(&'static str, T)], pub &'static str);

impl<T: Copy + PartialEq> Kind for Choice<T> {
    type Out = T;
    fn parse(&self, raw: &str) -> Result<T, Reject> {
        let lower = raw.to_ascii_lowercase();
        match self.0.iter().find(|(name, _)| *name == lower) {
            Some((_, v)) => Ok(*v),
            None => Err(Reject::Expected(format!("{}{}", one_of(self.0.iter().map(|(n, _)| *n)), self.1))),
        }
    }
    fn values(&self) -> String {
        self.0.iter().map(|(name, _)| format!("`{name}`")).collect::<Vec<_>>().join(", ")
    }
    fn show(&self, value: &T) -> String {
        self.0.iter().find(|(_, v)| v == value).map(|(name, _)| format!("`{name}`")).unwrap_or_default()
    }
}

/// "a, b or c"
fn one_of<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.concat(),
    }
}

/// Unset is `None`; a set variable is the inner kind's value.
pub(crate) struct Opt<K>(pub K);

impl<K: Kind> Kind for Opt<K> {
    type Out = Option<K::Out>;
    fn parse(&self, raw: &str) -> Result<Self::Out, Reject> {
        self.0.parse(raw).map(Some)
    }
    fn values(&self) -> String {
        self.0.values()
    }
    fn show(&self, value: &Self::Out) -> String {
        value.as_ref().map_or_else(|| "unset".into(), |v| self.0.show(v))
    }
}

/// Any text; the string says what it names.
pub(crate) struct Text(pub &'static str);

impl Kind for Text {
    type Out = String;
    fn parse(&self, raw: &str) -> Result<String, Reject> {
        Ok(raw.to_owned())
    }
    fn values(&self) -> String {
        self.0.into()
    }
    fn show(&self, value: &String) -> String {
        format!("`{value}`")
    }
}

/// What `UCCL_TCPX_TRACE` asks for (`trace::Setting`).
pub(crate) struct TraceSetting;

impl Kind for TraceSetting {
    type Out = crate::trace::Setting;
    fn parse(&self, raw: &str) -> Result<Self::Out, Reject> {
        crate::trace::Setting::parse(raw).map_err(Reject::Because)
    }
    fn values(&self) -> String {
        "`[category,...:]path prefix`".into()
    }
    fn show(&self, value: &Self::Out) -> String {
        format!("`{}`", value.prefix)
    }
}

/// A file's path.
pub(crate) struct FilePath;

impl Kind for FilePath {
    type Out = PathBuf;
    fn parse(&self, raw: &str) -> Result<PathBuf, Reject> {
        Ok(PathBuf::from(raw))
    }
    fn values(&self) -> String {
        "path".into()
    }
    fn show(&self, value: &PathBuf) -> String {
        format!("`{}`", value.display())
    }
}

pub(crate) struct Ip;

impl Kind for Ip {
    type Out = IpAddr;
    fn parse(&self, raw: &str) -> Result<IpAddr, Reject> {
        raw.parse().map_err(|_| Reject::Expected("an IPv4 or IPv6 address".into()))
    }
    fn values(&self) -> String {
        "IPv4 or IPv6 address".into()
    }
    fn show(&self, value: &IpAddr) -> String {
        value.to_string()
    }
}

/// A comma-separated list of 1 to `.0` indices below `.0`; duplicates are allowed (they weight
/// an entry).
pub(crate) struct Indices(pub usize);

impl Kind for Indices {
    type Out = Vec<usize>;
    fn parse(&self, raw: &str) -> Result<Vec<usize>, Reject> {
        let max = self.0;
        let list: Option<Vec<usize>> =
            raw.split(',').map(|d| d.trim().parse::<usize>().ok().filter(|d| *d < max)).collect();
        match list {
            Some(list) if !list.is_empty() && list.len() <= max => Ok(list),
            _ => Err(Reject::Expected(format!("a comma-separated list of 1..={max} device indices below {max}"))),
        }
    }
    fn values(&self) -> String {
        format!("comma list of indices below {}", self.0)
    }
    fn show(&self, value: &Vec<usize>) -> String {
        value.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
    }
}

/// A comma-separated list of at most `max` items of a type read from text; `expected` describes it.
pub(crate) struct List<T> {
    pub max: usize,
    pub expected: &'static str,
    pub values: &'static str,
    pub item: std::marker::PhantomData<T>,
}

impl<T: FromStr> Kind for List<T> {
    type Out = Vec<T>;
    fn parse(&self, raw: &str) -> Result<Vec<T>, Reject> {
        let list: Result<Vec<T>, _> = raw.split(',').map(str::parse).collect();
        match list {
            Ok(list) if list.len() <= self.max => Ok(list),
            _ => Err(Reject::Expected(format!("a comma-separated list of up to {} {}", self.max, self.expected))),
        }
    }
    fn values(&self) -> String {
        self.values.into()
    }
    fn show(&self, value: &Vec<T>) -> String {
        if value.is_empty() { "none".into() } else { format!("{} entries", value.len()) }
    }
}

/// `LO-HI` (sizes, LO below HI) or `0` for none.
pub(crate) struct Band;

impl Kind for Band {
    type Out = Option<(u64, u64)>;
    fn parse(&self, raw: &str) -> Result<Self::Out, Reject> {
        if raw == "0" {
            return Ok(None);
        }
        let band = raw.split_once('-').and_then(|(lo, hi)| Some((parse_bytes(lo.trim())?, parse_bytes(hi.trim())?)));
        match band {
            Some((lo, hi)) if lo < hi => Ok(Some((lo, hi))),
            _ => Err(Reject::Expected("LO-HI with LO below HI (K, M and G suffixes allowed), or 0".into())),
        }
    }
    fn values(&self) -> String {
        "`LO-HI` sizes, or 0".into()
    }
    fn show(&self, value: &Self::Out) -> String {
        value.map_or_else(|| "0".into(), |(lo, hi)| format!("{}-{}", show_bytes(lo), show_bytes(hi)))
    }
}

/// A file holding a key, as `openssl rand -hex 32 > key` or `head -c 32 /dev/urandom > key` writes
/// it. A file other users may read is refused, as ssh refuses such private keys: the key opens this
/// engine's memory to whoever holds it.
pub(crate) struct KeyFile;

impl Kind for KeyFile {
    type Out = AuthKey;
    fn parse(&self, path: &str) -> Result<AuthKey, Reject> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let file = std::fs::File::open(path).map_err(|e| Reject::Because(format!("cannot open the key file: {e}")))?;
        let meta = file.metadata().map_err(|e| Reject::Because(format!("cannot stat the key file: {e}")))?;
        let mode = meta.permissions().mode();
        if mode & 0o007 != 0 {
            return Err(Reject::Because(format!(
                "the key file is accessible to other users (mode {:o}); chmod o-rwx it",
                mode & 0o777
            )));
        }
        let mut bytes = Vec::new();
        // One byte past the largest key tells a too-long file from a key of exactly the limit.
        let limit = crate::proto::auth::MAX_KEY_LEN as u64 + 2;
        file.take(limit)
            .read_to_end(&mut bytes)
            .map_err(|e| Reject::Because(format!("cannot read the key file: {e}")))?;
        if bytes.ends_with(b"\n") {
            bytes.pop();
            if bytes.ends_with(b"\r") {
                bytes.pop();
            }
        }
        AuthKey::new(&bytes).map_err(|why| Reject::Because(format!("the file holds {why}")))
    }
    fn values(&self) -> String {
        "path".into()
    }
    fn show(&self, _: &AuthKey) -> String {
        "a key".into()
    }
}

/// A byte count: digits, optionally with a K, M or G suffix (binary units, either case), e.g.
/// "512K", "1M", "1048576". `None` for anything else and for counts beyond `u64`. The one size
/// notation of the library's knobs and the benchmark's flags.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let (digits, unit) = match text.as_bytes().last() {
        Some(b'k' | b'K') => (&text[..text.len() - 1], 1u64 << 10),
        Some(b'm' | b'M') => (&text[..text.len() - 1], 1 << 20),
        Some(b'g' | b'G') => (&text[..text.len() - 1], 1 << 30),
        _ => (text, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(unit)
}

/// A byte count in [`parse_bytes`]'s notation, with the largest suffix that divides it.
pub(crate) fn show_bytes(bytes: u64) -> String {
    match bytes {
        0 => "0".into(),
        b if b.is_multiple_of(1 << 30) => format!("{}G", b >> 30),
        b if b.is_multiple_of(1 << 20) => format!("{}M", b >> 20),
        b if b.is_multiple_of(1 << 10) => format!("{}K", b >> 10),
        b => b.to_string(),
    }
}

/// One row of the reference page.
pub(crate) struct Doc {
    pub name: &'static str,
    pub default: String,
    pub values: String,
    pub meaning: &'static str,
}

/// The reference page: `intro`, then a table per section.
pub(crate) fn render(intro: &str, sections: &[(&str, Vec<Doc>)]) -> String {
    let mut out = String::from(intro);
    for (title, rows) in sections {
        out.push_str(&format!("\n## {title}\n\n| variable | default | values | meaning |\n|---|---|---|---|\n"));
        for row in rows {
            let cell = |s: &str| s.replace('|', "\\|");
            out.push_str(&format!(
                "| `{}` | {} | {} | {} |\n",
                row.name,
                cell(&row.default),
                cell(&row.values),
                cell(row.meaning)
            ));
        }
    }
    out
}
