//! A one-line progress bar on stderr, drawn only on a terminal and only once a run has taken more
//! than a second (short runs and logs stay clean).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    total: usize,
    done: usize,
    start: Instant,
    enabled: bool,
    drawn: bool,
    label: String,
}

impl Progress {
    pub fn new(total: usize) -> Progress {
        Progress {
            total: total.max(1),
            done: 0,
            start: Instant::now(),
            enabled: std::io::stderr().is_terminal(),
            drawn: false,
            label: String::new(),
        }
    }

    pub fn step(&mut self, label: &str) {
        self.done = (self.done + 1).min(self.total);
        self.label = label.to_string();
        self.draw();
    }

    fn draw(&mut self) {
        if !self.enabled || self.start.elapsed() < Duration::from_secs(1) {
            return;
        }
        const WIDTH: usize = 30;
        let filled = WIDTH * (self.done - 1) / self.total;
        let bar: String = (0..WIDTH).map(|i| if i < filled { '#' } else { '.' }).collect();
        let mut err = std::io::stderr();
        let _ = write!(err, "\r\x1b[2K[{bar}] {}/{} {}", self.done, self.total, self.label);
        let _ = err.flush();
        self.drawn = true;
    }

    /// Erases the bar so that a result line prints cleanly; the next step draws it again.
    pub fn clear(&mut self) {
        if self.drawn {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
            self.drawn = false;
        }
    }

    pub fn redraw(&mut self) {
        self.draw();
    }

    pub fn finish(&mut self) {
        self.clear();
    }
}
