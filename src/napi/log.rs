//! The one writer of log lines. Every line of every pool, whichever thread says it, is queued here
//! in the order it was said and handed to one JS function, `(level, line) => void` (lib/index.js
//! writes it with `console.log`, `console.warn` or `console.error`), so that the lines of Rust and
//! of the JS face come out in one order. A line said on the JS thread is written at once; one said
//! on another thread (the MongoDB writer, the router) wakes the JS thread, which writes it after the
//! lines queued before it. Without a JS function (the addon used bare), lines go to stdout and
//! stderr directly.

use std::cell::Cell;
use std::collections::VecDeque;
use std::ffi::c_void;
use std::ptr;
use std::thread::{self, ThreadId};

use napi::bindgen_prelude::{Env, Function, JsValue, ToNapiValue};
use napi::sys;
use napi_derive::napi;
use parking_lot::Mutex;

use crate::log::{ConsoleLog, Level, Log};
use crate::napi::errors::BindingError;

/// The JS function lines are handed to, on the thread that set it.
struct Sink {
  env: sys::napi_env,
  function: sys::napi_ref,
  thread: ThreadId,
  /// Wakes `thread` to write what other threads queued.
  wake: sys::napi_threadsafe_function,
}

// SAFETY: `env` and `function` are used only on `thread` (checked before each use); N-API allows
// calls of `wake` from any thread, and `SINK`'s lock keeps them from racing its release.
unsafe impl Send for Sink {}

/// The function lines go to, if JS set one.
static SINK: Mutex<Option<Sink>> = Mutex::new(None);
/// Lines said and not yet written, in order.
static QUEUE: Mutex<VecDeque<(Level, String)>> = Mutex::new(VecDeque::new());

thread_local! {
  /// Set while the JS thread writes the queue: a line said meanwhile (by the sink's own call back
  /// into the addon) is written by the same loop, after the one being written.
  static WRITING: Cell<bool> = const { Cell::new(false) };
}

/// The pools' log under Node: every line through [`SINK`].
#[derive(Debug, Default, Clone, Copy)]
pub struct JsLog;

impl Log for JsLog {
  fn line(&self, level: Level, line: &str) {
    let sink = SINK.lock();
    let Some(s) = sink.as_ref() else {
      drop(sink);
      return ConsoleLog.line(level, line);
    };
    QUEUE.lock().push_back((level, line.to_owned()));
    if s.thread == thread::current().id() {
      drop(sink);
      write_queued();
    } else {
      // SAFETY: `wake` is live while it is in `SINK`, whose lock is held. A failed call (the
      // environment is closing) leaves the line queued; `clear_sink` writes it out.
      unsafe {
        sys::napi_call_threadsafe_function(
          s.wake,
          ptr::null_mut(),
          sys::ThreadsafeFunctionCallMode::nonblocking,
        );
      }
    }
  }
}

/// A promise's value that writes the queued lines before it reaches JS: a caller that awaits the
/// promise, and then says something itself, sees what was logged on the way first.
pub struct AfterLog<T>(pub T);

impl<T: ToNapiValue> ToNapiValue for AfterLog<T> {
  unsafe fn to_napi_value(env: sys::napi_env, value: Self) -> napi::Result<sys::napi_value> {
    write_queued();
    // SAFETY: as the caller's.
    unsafe { T::to_napi_value(env, value.0) }
  }
}

/// The level as the JS function receives it.
#[napi(string_enum = "lowercase")]
pub enum LogLevel {
  Info,
  Warn,
  Error,
}

impl From<Level> for LogLevel {
  fn from(level: Level) -> Self {
    match level {
      Level::Info => Self::Info,
      Level::Warn => Self::Warn,
      Level::Error => Self::Error,
    }
  }
}

/// Writes every line from now on with `sink(level, line)`, on this thread: lib/index.js sets it
/// when loaded, and a later call on the same thread replaces it. The first JS thread to set one
/// writes the lines of every thread (a worker's call is ignored while it does).
#[napi(ts_args_type = "sink: (level: LogLevel, line: string) => void")]
pub fn set_log_sink(env: Env, sink: Function<(LogLevel, String), ()>) -> napi::Result<()> {
  let here = thread::current().id();
  let replacing = match SINK.lock().as_ref() {
    Some(s) if s.thread != here => return Ok(()),
    current => current.is_some(),
  };
  let raw_env = env.raw();
  let mut function = ptr::null_mut();
  let mut wake = ptr::null_mut();
  // SAFETY: this call's environment, on its JS thread; the name is a JS string made here.
  unsafe {
    check(
      sys::napi_create_reference(raw_env, sink.raw(), 1, &mut function),
      "napi_create_reference",
    )?;
    let name = ToNapiValue::to_napi_value(raw_env, "gemini-key-manager log")?;
    check(
      sys::napi_create_threadsafe_function(
        raw_env,
        ptr::null_mut(),
        ptr::null_mut(),
        name,
        0,
        1,
        ptr::null_mut(),
        None,
        ptr::null_mut(),
        Some(write_woken),
        &mut wake,
      ),
      "napi_create_threadsafe_function",
    )?;
    // Lines waiting to be written must not keep the process alive.
    check(
      sys::napi_unref_threadsafe_function(raw_env, wake),
      "napi_unref_threadsafe_function",
    )?;
    if !replacing {
      check(
        sys::napi_add_env_cleanup_hook(raw_env, Some(clear_sink), ptr::null_mut()),
        "napi_add_env_cleanup_hook",
      )?;
    }
  }
  let sink = Sink {
    env: raw_env,
    function,
    thread: here,
    wake,
  };
  if let Some(old) = SINK.lock().replace(sink) {
    // SAFETY: the sink it replaces is this thread's.
    unsafe {
      sys::napi_delete_reference(old.env, old.function);
      sys::napi_release_threadsafe_function(old.wake, sys::ThreadsafeFunctionReleaseMode::abort);
    }
  }
  write_queued();
  Ok(())
}

/// Writes the lines other threads queued now: lib/index.js calls it when the process exits, as
/// the wake-up may not come before.
#[napi]
pub fn flush_log() {
  write_queued();
}

fn check(status: sys::napi_status, what: &'static str) -> napi::Result<()> {
  match status {
    sys::Status::napi_ok => Ok(()),
    status => Err(BindingError::NapiCall { what, status })?,
  }
}

/// Writes the queue out, in order, when on the sink's thread; elsewhere (or while the loop below
/// runs) the lines wait for it.
fn write_queued() {
  let target = match SINK.lock().as_ref() {
    Some(s) if s.thread == thread::current().id() => (s.env, s.function),
    _ => return,
  };
  if WRITING.with(|w| w.replace(true)) {
    return;
  }
  loop {
    let Some((level, line)) = QUEUE.lock().pop_front() else {
      break;
    };
    // SAFETY: on the sink's thread, whose environment and reference `target` are.
    if unsafe { call_sink(target, level, &line) }.is_err() {
      ConsoleLog.line(level, &line);
    }
  }
  WRITING.with(|w| w.set(false));
}

/// Calls the sink with one line. A sink that throws loses that line to stderr: the exception is
/// cleared, so that it does not surface in whatever call happened to log.
///
/// # Safety
/// On the thread of `env`, which `function` belongs to.
unsafe fn call_sink(
  (env, function): (sys::napi_env, sys::napi_ref),
  level: Level,
  line: &str,
) -> Result<(), sys::napi_status> {
  let ok = |status| match status {
    sys::Status::napi_ok => Ok(()),
    status => Err(status),
  };
  unsafe {
    let mut scope = ptr::null_mut();
    ok(sys::napi_open_handle_scope(env, &mut scope))?;
    let called = (|| {
      let mut sink = ptr::null_mut();
      ok(sys::napi_get_reference_value(env, function, &mut sink))?;
      let mut global = ptr::null_mut();
      ok(sys::napi_get_global(env, &mut global))?;
      let level = LogLevel::to_napi_value(env, level.into())
        .map_err(|_| sys::Status::napi_generic_failure)?;
      let line = String::to_napi_value(env, line.to_owned())
        .map_err(|_| sys::Status::napi_generic_failure)?;
      let mut result = ptr::null_mut();
      ok(sys::napi_call_function(
        env,
        global,
        sink,
        2,
        [level, line].as_ptr(),
        &mut result,
      ))
    })();
    if called.is_err() {
      let mut pending = false;
      if sys::napi_is_exception_pending(env, &mut pending) == sys::Status::napi_ok && pending {
        let mut exception = ptr::null_mut();
        sys::napi_get_and_clear_last_exception(env, &mut exception);
      }
    }
    sys::napi_close_handle_scope(env, scope);
    called
  }
}

/// The wake-up's call on the JS thread.
unsafe extern "C" fn write_woken(
  _env: sys::napi_env,
  _js_callback: sys::napi_value,
  _context: *mut c_void,
  _data: *mut c_void,
) {
  write_queued();
}

/// The sink's environment is going away (and its wake-up with it): lines from now on go to stdout
/// and stderr, those still queued first.
unsafe extern "C" fn clear_sink(_: *mut c_void) {
  let sink = SINK.lock().take();
  if let Some(sink) = sink {
    // SAFETY: run by the sink's environment as it is torn down, on its thread.
    unsafe { sys::napi_delete_reference(sink.env, sink.function) };
  }
  for (level, line) in QUEUE.lock().drain(..) {
    ConsoleLog.line(level, &line);
  }
}
