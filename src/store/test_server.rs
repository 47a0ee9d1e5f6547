//! A throwaway MongoDB wire-protocol server for tests: nx-27017 from `.venv-mongo` (see
//! shared/MONGO.md), in memory, on a free port, killed when dropped. A missing server fails the
//! test: a store test that passes without a database proves nothing.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

const STARTUP: Duration = Duration::from_secs(20);

/// A port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
  TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
    .and_then(|l| l.local_addr())
    .map(|a| a.port())
    .expect("a free local port")
}

/// A running nx-27017, killed and its files removed on drop.
pub struct TestServer {
  child: Child,
  port: u16,
  dir: PathBuf,
}

impl TestServer {
  /// Starts a server and waits until it accepts connections. Panics, saying what to do, when the
  /// server is not installed or does not come up.
  pub fn start() -> Self {
    let bin = Self::bin();
    let mut failures = Vec::new();
    // A port found free can be taken before the server binds it: try another.
    for _ in 0..3 {
      match Self::try_start(&bin, free_port()) {
        Ok(server) => return server,
        Err(why) => failures.push(why),
      }
    }
    panic!("nx-27017 did not start: {failures:#?}");
  }

  /// [`Self::start`] on a given port, for a server that comes up where a client already looks.
  pub fn start_on(port: u16) -> Self {
    Self::try_start(&Self::bin(), port)
      .unwrap_or_else(|why| panic!("nx-27017 did not start on {port}: {why}"))
  }

  fn bin() -> PathBuf {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-mongo/bin/nx-27017");
    assert!(
      bin.is_file(),
      "{} is missing: run `bash scripts/mongo-test-server.sh` to install the test MongoDB server",
      bin.display()
    );
    bin
  }

  fn try_start(bin: &Path, port: u16) -> Result<Self, String> {
    let dir = std::env::temp_dir().join(format!("gkm-nx-{}-{port}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let child = Command::new(bin)
      .args([
        "--db",
        "memory",
        "--host",
        "127.0.0.1",
        "-p",
        &port.to_string(),
      ])
      .arg("--log-file")
      .arg(dir.join("nx.log"))
      .arg("--pid-file")
      .arg(dir.join("nx.pid"))
      .stdin(Stdio::null())
      .stdout(Stdio::null())
      .stderr(Stdio::null())
      .spawn()
      .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
    let mut server = Self { child, port, dir };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + STARTUP;
    while Instant::now() < deadline {
      if let Ok(Some(status)) = server.child.try_wait() {
        return Err(format!("exited with {status}: {}", server.log()));
      }
      if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
        return Ok(server);
      }
      sleep(Duration::from_millis(50));
    }
    Err(format!(
      "no connection within {STARTUP:?}: {}",
      server.log()
    ))
  }

  fn log(&self) -> String {
    fs::read_to_string(self.dir.join("nx.log")).unwrap_or_default()
  }

  /// Freezes the server (SIGSTOP): connections stay open and nothing is answered, as a hung
  /// database does.
  pub fn hang(&self) {
    self.signal(libc::SIGSTOP);
  }

  /// Lets a frozen server go on (SIGCONT).
  pub fn resume(&self) {
    self.signal(libc::SIGCONT);
  }

  fn signal(&self, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(self.child.id()).expect("a pid");
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "signal {signal}");
  }

  /// The connection string for this server.
  pub fn uri(&self) -> String {
    format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
  }
}

impl Drop for TestServer {
  fn drop(&mut self) {
    // A frozen server does not die of SIGKILL until it is let go.
    self.resume();
    // Errors mean it already exited; either way it is gone.
    let _ = self.child.kill();
    let _ = self.child.wait();
    let _ = fs::remove_dir_all(&self.dir);
  }
}
