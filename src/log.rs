//! Where the SPEC's log lines go. The core emits lines; the embedding decides where they end up.

pub trait Log: Send + Sync {
  fn info(&self, line: &str);
  fn warn(&self, line: &str);
}

/// Informational lines to stdout and warnings to stderr, like `console.log` and `console.warn`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConsoleLog;

impl Log for ConsoleLog {
  fn info(&self, line: &str) {
    println!("{line}");
  }

  fn warn(&self, line: &str) {
    eprintln!("{line}");
  }
}

/// Drops every line.
#[derive(Debug, Default, Clone, Copy)]
pub struct SilentLog;

impl Log for SilentLog {
  fn info(&self, _: &str) {}
  fn warn(&self, _: &str) {}
}

/// Keeps every line, for tests.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct CapturedLog(pub parking_lot::Mutex<Vec<String>>);

#[cfg(test)]
impl Log for CapturedLog {
  fn info(&self, line: &str) {
    self.0.lock().push(line.to_owned());
  }

  fn warn(&self, line: &str) {
    self.0.lock().push(line.to_owned());
  }
}
