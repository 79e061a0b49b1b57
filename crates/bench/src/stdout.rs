//! The report's text on stdout. `println!` panics once the reader closed the pipe (`| head`); here the
//! run instead goes on to its end (its server child and connections close as usual) printing nothing
//! more.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once stdout's reader went away.
static GONE: AtomicBool = AtomicBool::new(false);

/// Writes `text` to stdout, unless its reader went away.
pub(crate) fn say(text: std::fmt::Arguments<'_>) {
    if GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    match out.write_fmt(text).and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => GONE.store(true, Ordering::Relaxed),
        Err(e) => {
            eprintln!("uccl-tcpx-bench: cannot write to stdout: {e}");
            std::process::exit(1)
        }
    }
}

/// `println!` through [`say`].
macro_rules! sayln {
    ($($arg:tt)*) => { $crate::stdout::say(format_args!("{}\n", format_args!($($arg)*))) };
}
pub(crate) use sayln;
