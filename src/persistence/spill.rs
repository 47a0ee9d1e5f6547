//! What MongoDB did not take before the process ended (recorded calls, key documents, the quota
//! budgets' counts, operators' decisions), kept in a local file and written at the next start, so
//! a hung or unreachable database at shutdown loses nothing. Each process writes a file of its
//! own, one JSON line per record, named as documents name them (a stored name, never a key); a
//! process that connects to the same database later claims every file by renaming it, writes what
//! it holds (each usage document carries its id, so a record written twice is stored once; a key
//! document is merged with the stored one, see [`merge_key`], and a budget likewise, see
//! [`merge_budget`], so writing either twice changes nothing) and deletes it.
//!
//! One directory per database: records spilled for one database never reach another.

use std::fs;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::core::clock::Millis;
use crate::core::quota::LimitType;
use crate::core::snapshot::{
  BudgetRecord, KeyRecord, RestRecord, UsageId, UsageRecord, WindowRecord,
};
use crate::store::fingerprint::digest_name;
use crate::store::StoredAdmission;

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
  #[serde(rename_all = "camelCase")]
  Key {
    /// The stored name.
    api_key: String,
    is_active: bool,
    last_used: i64,
    rpm: WindowLine,
    rpd: WindowLine,
    tpm: WindowLine,
    error_count: u32,
    last_error: Option<String>,
    last_error_time: Option<i64>,
    spilled_at: i64,
  },
  #[serde(rename_all = "camelCase")]
  Budget {
    /// The stored name of its subject.
    subject: String,
    project: Option<String>,
    model: String,
    rpm: WindowLine,
    rpd: WindowLine,
    tpm: WindowLine,
    rest: RestLine,
  },
}

/// A budget's rest, as [`RestRecord`]; the window by the name documents give it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
enum RestLine {
  Clear,
  Until { until: i64, window: Option<String> },
  NoQuota,
}

impl From<RestRecord> for RestLine {
  fn from(r: RestRecord) -> Self {
    match r {
      RestRecord::Clear => RestLine::Clear,
      RestRecord::Until { until, window } => RestLine::Until {
        until,
        window: window.map(|w| w.as_str().to_owned()),
      },
      RestRecord::NoQuota => RestLine::NoQuota,
    }
  }
}

impl RestLine {
  /// The rest it says; `None` when it names a window there is not.
  fn record(self) -> Option<RestRecord> {
    Some(match self {
      RestLine::Clear => RestRecord::Clear,
      RestLine::Until { until, window } => RestRecord::Until {
        until,
        window: match window {
          Some(name) => Some(LimitType::parse(&name)?),
          None => None,
        },
      },
      RestLine::NoQuota => RestRecord::NoQuota,
    })
  }
}

impl From<&BudgetRecord> for Line {
  fn from(b: &BudgetRecord) -> Self {
    Line::Budget {
      subject: b.subject.clone(),
      project: b.project.clone(),
      model: b.model.clone(),
      rpm: b.rpm.into(),
      rpd: b.rpd.into(),
      tpm: b.tpm.into(),
      rest: b.rest.into(),
    }
  }
}

/// One window of a key document, as [`WindowRecord`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WindowLine {
  current: u64,
  limit: u64,
  reset_time: i64,
}

impl From<WindowRecord> for WindowLine {
  fn from(w: WindowRecord) -> Self {
    Self {
      current: w.current,
      limit: w.limit,
      reset_time: w.reset_time,
    }
  }
}

impl From<WindowLine> for WindowRecord {
  fn from(w: WindowLine) -> Self {
    Self {
      current: w.current,
      limit: w.limit,
      reset_time: w.reset_time,
    }
  }
}

impl From<&SpilledKey> for Line {
  fn from(k: &SpilledKey) -> Self {
    let r = &k.record;
    Line::Key {
      api_key: r.api_key.clone(),
      is_active: r.is_active,
      last_used: r.last_used,
      rpm: r.rpm.into(),
      rpd: r.rpd.into(),
      tpm: r.tpm.into(),
      error_count: r.error_count,
      last_error: r.last_error.clone(),
      last_error_time: r.last_error_time,
      spilled_at: k.spilled_at,
    }
  }
}

/// A key document the database did not take: the key's state (named as documents name it, never
/// by the key) and when it was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpilledKey {
  pub record: KeyRecord,
  pub spilled_at: Millis,
}

/// A spilled key document merged with what the database holds for the same key (`stored`, both
/// as they stand at `now`), as a reconnect merges the pool with the database: every open window
/// counts the larger of the two, so a count the database took meanwhile is never lowered; health
/// and errors are the spilled ones, unless the stored document says the key was used or failed
/// after the spill was taken (another process's word, newer).
pub fn merge_key(spilled: &SpilledKey, stored: Option<&KeyRecord>, now: Millis) -> KeyRecord {
  let ours = spilled.record.clone().at(now);
  let Some(theirs) = stored.map(|s| s.clone().at(now)) else {
    return ours;
  };
  let newer = theirs.last_used > spilled.spilled_at
    || theirs
      .last_error_time
      .is_some_and(|t| t > spilled.spilled_at);
  let larger = |a: WindowRecord, b: WindowRecord| if b.current > a.current { b } else { a };
  let health = if newer { &theirs } else { &ours };
  KeyRecord {
    api_key: ours.api_key.clone(),
    is_active: health.is_active,
    last_used: ours.last_used.max(theirs.last_used),
    rpm: larger(ours.rpm, theirs.rpm),
    rpd: larger(ours.rpd, theirs.rpd),
    tpm: larger(ours.tpm, theirs.tpm),
    error_count: health.error_count,
    last_error: health.last_error.clone(),
    last_error_time: health.last_error_time,
  }
}

/// A spilled budget merged with another record of the same budget (`other`: what the database
/// holds, or another spill's), both as they stand at `now`: every open window counts the larger
/// of the two, and the rest is the one that holds longer (no quota at all over any rest).
pub fn merge_budget(
  spilled: &BudgetRecord,
  other: Option<&BudgetRecord>,
  now: Millis,
) -> BudgetRecord {
  let ours = spilled.clone().at(now);
  let Some(theirs) = other.map(|o| o.clone().at(now)) else {
    return ours;
  };
  let larger = |a: WindowRecord, b: WindowRecord| if b.current > a.current { b } else { a };
  let rest = match (ours.rest, theirs.rest) {
    (RestRecord::NoQuota, _) | (_, RestRecord::NoQuota) => RestRecord::NoQuota,
    (RestRecord::Until { until: a, .. }, RestRecord::Until { until: b, .. }) if b > a => {
      theirs.rest
    }
    (RestRecord::Clear, rest) => rest,
    (rest, _) => rest,
  };
  BudgetRecord {
    rpm: larger(ours.rpm, theirs.rpm),
    rpd: larger(ours.rpd, theirs.rpd),
    tpm: larger(ours.tpm, theirs.tpm),
    rest,
    project: ours.project.clone().or(theirs.project),
    ..ours
  }
}

/// What a spill holds, in words for a log line: `3 recorded calls, the state of 2 keys, the counts
/// of 2 quota budgets and 1 operator decision`; the kinds with none left out (`nothing` when all
/// are).
pub fn describe(calls: usize, keys: usize, budgets: usize, admissions: usize) -> String {
  let plural = |n: usize| if n == 1 { "" } else { "s" };
  let parts: Vec<String> = [
    (calls > 0).then(|| format!("{calls} recorded call{}", plural(calls))),
    (keys > 0).then(|| format!("the state of {keys} key{}", plural(keys))),
    (budgets > 0).then(|| format!("the counts of {budgets} quota budget{}", plural(budgets))),
    (admissions > 0).then(|| format!("{admissions} operator decision{}", plural(admissions))),
  ]
  .into_iter()
  .flatten()
  .collect();
  match parts.as_slice() {
    [] => "nothing".to_owned(),
    [one] => one.clone(),
    [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
  }
}

/// What spill files held.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Spilled {
  /// Calls, their `api_key` the stored name.
  pub calls: Vec<UsageRecord>,
  /// Key documents, their `api_key` the stored name.
  pub keys: Vec<SpilledKey>,
  /// Budget documents, their subject the stored name.
  pub budgets: Vec<BudgetRecord>,
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

  /// Appends `calls` and `keys` (their `api_key` the stored name) and `admissions` to this
  /// process's file. Returns how many records it wrote.
  pub fn write(
    &self,
    calls: &[UsageRecord],
    keys: &[SpilledKey],
    budgets: &[BudgetRecord],
    admissions: &[StoredAdmission],
  ) -> io::Result<usize> {
    if calls.is_empty() && keys.is_empty() && budgets.is_empty() && admissions.is_empty() {
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
      .chain(keys.iter().map(Line::from))
      .chain(budgets.iter().map(Line::from))
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
      Ok(Line::Key {
        api_key,
        is_active,
        last_used,
        rpm,
        rpd,
        tpm,
        error_count,
        last_error,
        last_error_time,
        spilled_at,
      }) => spilled.keys.push(SpilledKey {
        record: KeyRecord {
          api_key,
          is_active,
          last_used,
          rpm: rpm.into(),
          rpd: rpd.into(),
          tpm: tpm.into(),
          error_count,
          last_error,
          last_error_time,
        },
        spilled_at,
      }),
      Ok(Line::Budget {
        subject,
        project,
        model,
        rpm,
        rpd,
        tpm,
        rest,
      }) => match rest.record() {
        Some(rest) => spilled.budgets.push(BudgetRecord {
          subject,
          project,
          model,
          rpm: rpm.into(),
          rpd: rpd.into(),
          tpm: tpm.into(),
          rest,
        }),
        None => spilled.unreadable += 1,
      },
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
mod tests;
