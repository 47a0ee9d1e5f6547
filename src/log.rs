//! Where the SPEC's log lines go. The core emits lines at a level; the embedding decides where they
//! end up (under Node, one JS function writes them all: see the N-API layer's `log`).

/// How much a line matters, and so where it is written: `console.log`, `console.warn` or
/// `console.error` (stdout, stderr, stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
  Info,
  Warn,
  Error,
}

/// Where log lines go. Every layer says its lines through one, whichever thread it is on.
pub trait Log: Send + Sync + std::fmt::Debug {
  /// Says `line` at `level`.
  fn line(&self, level: Level, line: &str);

  /// Says `line` at [`Level::Info`].
  fn info(&self, line: &str) {
    self.line(Level::Info, line);
  }

  /// Says `line` at [`Level::Warn`].
  fn warn(&self, line: &str) {
    self.line(Level::Warn, line);
  }

  /// Says `line` at [`Level::Error`].
  fn error(&self, line: &str) {
    self.line(Level::Error, line);
  }
}

/// Informational lines to stdout, warnings and errors to stderr, as `console.log`, `console.warn`
/// and `console.error` write them.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConsoleLog;

impl Log for ConsoleLog {
  fn line(&self, level: Level, line: &str) {
    match level {
      Level::Info => println!("{line}"),
      Level::Warn | Level::Error => eprintln!("{line}"),
    }
  }
}

/// Drops every line.
#[derive(Debug, Default, Clone, Copy)]
pub struct SilentLog;

impl Log for SilentLog {
  fn line(&self, _: Level, _: &str) {}
}

/// Keeps every line, for tests.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct CapturedLog(pub parking_lot::Mutex<Vec<String>>);

#[cfg(test)]
impl Log for CapturedLog {
  fn line(&self, _: Level, line: &str) {
    self.0.lock().push(line.to_owned());
  }
}
