//! What MongoDB did not take before the process ended (recorded calls, operators' decisions),
//! kept in a local file and written at the next start, so a hung or unreachable database at
//! shutdown loses nothing. Each process writes a file of its own, one JSON line per record, named
//! as documents name them (a stored name, never a key); a process that connects to the same
//! database later claims every file by renaming it, writes what it holds (each usage document
//! carries its id, so a record written twice is stored once) and deletes it.
//!
//! One directory per database: records spilled for one database never reach another.

use std::fs;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::fingerprint::digest_name;
use crate::store::{StoredAdmission, UsageId, UsageRecord};

/// What a spill file's name ends with.
const EXTENSION: &str = "jsonl";
/// What a claimed file's name gets: a process that dies while writing one out leaves it behind,
/// and another takes it over once it is this old.
const CLAIMED: &str = "claimed";
const STALE_CLAIM: Duration = Duration::from_secs(60);

/// One line of a spill file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
enum Line {
  #[serde(rename_all = "camelCase")]
  Call {
    id: String,
    /// The stored name.
    api_key: String,
    timestamp: i64,
    tokens_used: u64,
    success: bool,
    error: Option<String>,
    response_time: f64,
  },
  Admission(StoredAdmission),
}

/// What spill files held.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Spilled {
  /// Calls, their `api_key` the stored name.
  pub calls: Vec<UsageRecord>,
  pub admissions: Vec<StoredAdmission>,
  /// Lines that could not be read (a file cut short, say): counted, not fatal.
  pub unreadable: usize,
}

/// The spill files of one database.
#[derive(Debug, Clone)]
pub struct Spill {
  dir: PathBuf,
  /// This process's own file.
  file: PathBuf,
}

/// The default directory: the system's temporary directory, which outlives the process.
pub fn default_dir() -> PathBuf {
  std::env::temp_dir().join("gemini-key-manager-spill")
}

impl Spill {
  /// The spill files under `base` for the database `db_name` at `uri`; this process writes
  /// `<writer>.jsonl`. The directory is named by a digest, so no credential of the URI shows.
  pub fn new(base: &Path, uri: &str, db_name: &str, writer: &str) -> Self {
    let dir = base.join(digest_name(&format!("{uri}\n{db_name}")));
    let file = dir.join(format!("{writer}.{EXTENSION}"));
    Self { dir, file }
  }

  /// Where this process spills.
  pub fn file(&self) -> &Path {
    &self.file
  }

  /// Appends `calls` (their `api_key` the stored name) and `admissions` to this process's file.
  /// Returns how many records it wrote.
  pub fn write(&self, calls: &[UsageRecord], admissions: &[StoredAdmission]) -> io::Result<usize> {
    if calls.is_empty() && admissions.is_empty() {
      return Ok(0);
    }
    fs::create_dir_all(&self.dir)?;
    let mut out = io::BufWriter::new(
      fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&self.file)?,
    );
    let lines = calls
      .iter()
      .map(|u| Line::Call {
        id: u.id.to_string(),
        api_key: u.api_key.clone(),
        timestamp: u.timestamp,
        tokens_used: u.tokens_used,
        success: u.success,
        error: u.error.clone(),
        response_time: u.response_time,
      })
      .chain(admissions.iter().cloned().map(Line::Admission));
    let mut written = 0;
    for line in lines {
      serde_json::to_writer(&mut out, &line)?;
      out.write_all(b"\n")?;
      written += 1;
    }
    out.flush()?;
    out.get_ref().sync_all()?;
    Ok(written)
  }

  /// Takes over every spill file of this database (this process's own included) and reads them.
  /// Call [`Claim::done`] once what they held is written, or drop the claim to leave them for
  /// the next try.
  pub fn claim(&self, claimer: &str) -> io::Result<Claim> {
    let mut claim = Claim {
      files: Vec::new(),
      spilled: Spilled::default(),
    };
    let entries = match fs::read_dir(&self.dir) {
      Ok(entries) => entries,
      Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(claim),
      Err(e) => return Err(e),
    };
    for entry in entries.flatten() {
      let path = entry.path();
      let name = entry.file_name().to_string_lossy().into_owned();
      let own_claim = name.ends_with(&format!(".{claimer}.{CLAIMED}"));
      let claimable = name.ends_with(&format!(".{EXTENSION}"))
        || (name.ends_with(&format!(".{CLAIMED}")) && stale(&path));
      let claimed = if own_claim {
        // Claimed by this process before and not written then: it is this one's again.
        path
      } else if claimable {
        let claimed = self.dir.join(format!("{name}.{claimer}.{CLAIMED}"));
        // Another process claimed it first: it is theirs.
        if fs::rename(&path, &claimed).is_err() {
          continue;
        }
        claimed
      } else {
        continue;
      };
      read_into(&claimed, &mut claim.spilled)?;
      claim.files.push(claimed);
    }
    Ok(claim)
  }
}

fn stale(path: &Path) -> bool {
  fs::metadata(path)
    .and_then(|m| m.modified())
    .ok()
    .and_then(|t| SystemTime::now().duration_since(t).ok())
    .is_some_and(|age| age >= STALE_CLAIM)
}

fn read_into(path: &Path, spilled: &mut Spilled) -> io::Result<()> {
  let file = io::BufReader::new(fs::File::open(path)?);
  for line in file.lines() {
    let line = line?;
    if line.trim().is_empty() {
      continue;
    }
    match serde_json::from_str::<Line>(&line) {
      Ok(Line::Call {
        id,
        api_key,
        timestamp,
        tokens_used,
        success,
        error,
        response_time,
      }) => match UsageId::parse(&id) {
        Some(id) => spilled.calls.push(UsageRecord {
          id,
          api_key,
          timestamp,
          tokens_used,
          success,
          error,
          response_time,
        }),
        None => spilled.unreadable += 1,
      },
      Ok(Line::Admission(a)) => spilled.admissions.push(a),
      Err(_) => spilled.unreadable += 1,
    }
  }
  Ok(())
}

/// Spill files taken over, and what they held.
#[derive(Debug)]
pub struct Claim {
  files: Vec<PathBuf>,
  pub spilled: Spilled,
}

impl Claim {
  pub fn is_empty(&self) -> bool {
    self.files.is_empty()
  }

  /// Deletes the files: what they held is written.
  pub fn done(self) -> io::Result<()> {
    for file in &self.files {
      fs::remove_file(file)?;
    }
    Ok(())
  }
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::key::Admission;
  use crate::store::UsageIds;

  fn call(ids: &UsageIds, n: u64) -> UsageRecord {
    UsageRecord {
      id: ids.next_id(),
      api_key: "sha256_0123".into(),
      timestamp: 1_800_000_000_000,
      tokens_used: n,
      success: n.is_multiple_of(2),
      error: (!n.is_multiple_of(2)).then(|| "503 overloaded".to_owned()),
      response_time: 12.5,
    }
  }

  #[test]
  fn what_one_process_spills_another_claims_once_and_deletes_when_written() {
    let base = std::env::temp_dir().join(format!("gkm-spill-test-{}", std::process::id()));
    let ids = UsageIds::new();
    let calls: Vec<_> = (0..3).map(|n| call(&ids, n)).collect();
    let admission = StoredAdmission {
      stored: "sha256_4567".into(),
      admission: Admission::Disabled,
      changed_at: 5,
      added: false,
      sealed: None,
      masked: "AIzaSyAB...wxyz".into(),
      project: None,
    };
    let a = Spill::new(&base, "mongodb://db", "rag_db", "writer-a");
    assert_eq!(a.write(&calls[..2], &[]).unwrap(), 2);
    assert_eq!(
      a.write(&calls[2..], std::slice::from_ref(&admission))
        .unwrap(),
      2
    );
    // Another database's spill directory holds none of it.
    let other = Spill::new(&base, "mongodb://db", "other_db", "writer-b");
    assert!(other.claim("b").unwrap().is_empty());
    let b = Spill::new(&base, "mongodb://db", "rag_db", "writer-b");
    let claim = b.claim("b").unwrap();
    assert_eq!(claim.spilled.calls, calls);
    assert_eq!(claim.spilled.admissions, vec![admission]);
    // Claimed: nobody else gets it, even before it is done; the claimer gets it again.
    assert!(a.claim("c").unwrap().is_empty());
    drop(claim);
    let claim = b.claim("b").unwrap();
    assert_eq!(claim.spilled.calls.len(), 3);
    claim.done().unwrap();
    assert!(b.claim("b").unwrap().is_empty());
    fs::remove_dir_all(&base).unwrap();
  }

  #[test]
  fn a_line_cut_short_is_counted_and_the_rest_read() {
    let base = std::env::temp_dir().join(format!("gkm-spill-cut-{}", std::process::id()));
    let ids = UsageIds::new();
    let s = Spill::new(&base, "u", "d", "w");
    s.write(&[call(&ids, 0)], &[]).unwrap();
    fs::OpenOptions::new()
      .append(true)
      .open(s.file())
      .unwrap()
      .write_all(b"{\"kind\":\"call\",\"id\":")
      .unwrap();
    let claim = s.claim("x").unwrap();
    assert_eq!(
      (claim.spilled.calls.len(), claim.spilled.unreadable),
      (1, 1)
    );
    fs::remove_dir_all(&base).unwrap();
  }
}
