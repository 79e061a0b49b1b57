//! The opt-in trace (`UCCL_TCPX_TRACE=[<category>,...:]<path prefix>`): every event the library
//! marks (`events.rs`, the one list) is kept with its CLOCK_MONOTONIC time and thread, and the
//! process writes them at exit to `<prefix>.<pid>.tsv` (`record.rs`), which the scripts of
//! `scripts/diag/` read (docs/TRACE.md). The categories (`flow`, `socket`, `host`, `device`,
//! `staging`; all when none is named) choose what is kept.
//!
//! The trace is the process's: the first engine whose configuration names one starts it, and it
//! runs until the process exits. Off, a site costs one relaxed load and a branch: `event!`
//! evaluates nothing else, so a site needs no guard of its own.

mod events;
mod record;
mod staged;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

pub use events::*;
pub use staged::{StagedChunk, StagedComm};

/// The categories being recorded; 0 while no trace runs.
static MASK: AtomicU32 = AtomicU32::new(0);
static STARTED: OnceLock<Setting> = OnceLock::new();
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Records `Event::$name { .. }` when its categories are on; the fields' expressions are
/// evaluated only while some trace runs.
macro_rules! event {
    ($name:ident { $($body:tt)* }) => {
        if $crate::trace::any_on() {
            $crate::trace::record($crate::trace::Event::$name { $($body)* });
        }
    };
}
pub(crate) use event;

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the host, so traces of the two
/// ends of a loopback transfer line up.
pub fn clock_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes one timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether any trace runs.
#[inline]
pub fn any_on() -> bool {
    MASK.load(Relaxed) != 0
}

/// Whether events of one of `categories` are recorded.
#[inline]
pub fn on(categories: u32) -> bool {
    MASK.load(Relaxed) & categories != 0
}

/// Keeps `event`, stamped now, when one of its categories is on.
pub fn record(event: Event) {
    if on(event.categories()) {
        record::push(clock_ns(), event);
    }
}

/// A fresh id for events to join on (a copy job, a staged chunk); never 0.
pub fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Relaxed) + 1
}

/// Tests: records `categories` from now on, for the rest of the test process, in memory only (no
/// file at exit); [`recorded`] reads the events back.
#[cfg(test)]
pub fn record_in_memory(categories: u32) {
    MASK.fetch_or(categories, Relaxed);
}

/// Tests: every event kept so far, with its time, by time.
#[cfg(test)]
pub fn recorded() -> Vec<(u64, Event)> {
    record::kept_events()
}

/// Tests: the kept events of comm `comm` whose label is one of `labels`, by time, as (time, label,
/// fields as the schema names them).
#[cfg(test)]
pub fn recorded_of_comm(
    comm: u64,
    labels: &[&str],
) -> Vec<(u64, &'static str, std::collections::HashMap<&'static str, u64>)> {
    let mut out = Vec::new();
    for (at, e) in recorded() {
        let schema = SCHEMA[e.index()];
        if !labels.contains(&schema.label) {
            continue;
        }
        let mut values = Vec::new();
        e.values(&mut values);
        let fields: std::collections::HashMap<_, _> = schema.fields.iter().copied().zip(values).collect();
        if fields.get("comm") == Some(&comm) {
            out.push((at, schema.label, fields));
        }
    }
    out
}

/// What `UCCL_TCPX_TRACE` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    pub prefix: String,
    pub categories: u32,
}

impl Setting {
    /// `<prefix>`, every category, or `<category>,...:<prefix>`. A head of lowercase words and
    /// commas before the first `:` names categories, each of which must exist.
    pub fn parse(raw: &str) -> Result<Setting, String> {
        let named = raw
            .split_once(':')
            .filter(|(head, _)| !head.is_empty() && head.chars().all(|c| c.is_ascii_lowercase() || c == ','));
        let (categories, prefix) = match named {
            None => (CATEGORIES.iter().fold(0, |m, (_, bit)| m | bit), raw),
            Some((head, prefix)) => {
                let mut mask = 0;
                for word in head.split(',').filter(|w| !w.is_empty()) {
                    let Some((_, bit)) = CATEGORIES.iter().find(|(name, _)| *name == word) else {
                        let known: Vec<&str> = CATEGORIES.iter().map(|(n, _)| *n).collect();
                        return Err(format!("unknown trace category `{word}` (known: {})", known.join(", ")));
                    };
                    mask |= bit;
                }
                (mask, prefix)
            }
        };
        if prefix.is_empty() || categories == 0 {
            return Err("expected `<path prefix>` or `<category>,...:<path prefix>`".into());
        }
        Ok(Setting { prefix: prefix.to_owned(), categories })
    }
}

/// Starts the process's trace, once: a later setting that differs is logged and ignored.
pub fn start(setting: &Setting) {
    let mut first = false;
    let running = STARTED.get_or_init(|| {
        first = true;
        setting.clone()
    });
    if first {
        record::write_at_exit(&setting.prefix);
        MASK.store(setting.categories, Relaxed);
        log::info!("tracing to {}.{}.tsv", setting.prefix, std::process::id());
    } else if running != setting {
        log::warn!("this process already traces to {:?}; {:?} is ignored", running.prefix, setting.prefix);
    }
}

/// Which end of which connection an event comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnTag {
    /// The handshake nonce, which both ends know.
    pub conn: u64,
    /// 1 on the end that dialed, 0 on the one that accepted.
    pub side: u64,
}

/// What a same-host GPU transfer's post did before its copies were queued.
#[derive(Clone, Copy, Debug, Default)]
pub struct DevicePost {
    /// When the call entered the connection, in CLOCK_MONOTONIC ns.
    pub at: u64,
    /// Asks the call waited for (once per region and token, or again for a window outside the grant).
    pub asks: u32,
    /// Time those asks took, in ns (the round trip and the mapping).
    pub ask_ns: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_setting_is_a_prefix_with_or_without_categories() {
        let all = Setting::parse("/tmp/t").unwrap();
        assert_eq!((all.prefix.as_str(), all.categories), ("/tmp/t", FLOW | SOCKET | HOST | DEVICE | STAGING));
        let some = Setting::parse("flow,socket:/tmp/a:b").unwrap();
        assert_eq!((some.prefix.as_str(), some.categories), ("/tmp/a:b", FLOW | SOCKET));
        // A head that is no list of words is part of the path.
        assert_eq!(Setting::parse("./x:1/t").unwrap().prefix, "./x:1/t");
        let err = Setting::parse("flow,sockets:/tmp/t").unwrap_err();
        assert!(err.contains("unknown trace category `sockets`") && err.contains("staging"), "{err}");
        assert!(Setting::parse("flow:").is_err());
        assert!(Setting::parse(",:/tmp/t").is_err(), "no category named");
    }

    #[test]
    fn ids_are_fresh_and_never_zero() {
        let (a, b) = (next_id(), next_id());
        assert!(a != 0 && b != 0 && a != b);
    }
}
