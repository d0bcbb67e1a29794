//! Progress on stderr while a run goes: a live line (indicatif) when stderr is a terminal,
//! plain status lines otherwise, so stdout carries only the report and stays clean when piped.

use std::io::IsTerminal as _;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// The live display; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    pub(crate) fn new(quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{spinner} {elapsed:>4} [{bar:30}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self { bar }
    }

    /// A status line that stays (printed above the live line).
    pub(crate) fn line(&self, text: impl AsRef<str>) {
        match &self.bar {
            Some(bar) => bar.println(text.as_ref()),
            None => eprintln!("{}", text.as_ref()),
        }
    }

    /// Starts a phase of `length` ticks (e.g. tenths of a second).
    pub(crate) fn phase(&self, length: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(length);
            bar.set_position(0);
        }
    }

    /// Updates the live line.
    pub(crate) fn update(&self, position: u64, message: String) {
        if let Some(bar) = &self.bar {
            bar.set_position(position);
            bar.set_message(message);
        }
    }

    /// Removes the live line.
    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
