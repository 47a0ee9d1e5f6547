use super::*;
use crate::core::key::Admission;
use crate::core::quota::LimitType;
use crate::core::snapshot::UsageIds;
use crate::store::unique_name;

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

const NOW: Millis = 1_800_000_001_000;

/// A key document whose windows count `n` and end at `reset`.
fn record(n: u64, reset: Millis) -> KeyRecord {
  let w = |limit| WindowRecord {
    current: n,
    limit,
    reset_time: reset,
  };
  KeyRecord {
    api_key: "sha256_0123".into(),
    is_active: true,
    last_used: 1_800_000_000_000,
    rpm: w(30),
    rpd: w(200),
    tpm: w(1_000_000),
    error_count: 0,
    last_error: None,
    last_error_time: None,
  }
}

#[test]
fn a_spilled_key_document_merged_with_the_stored_one_loses_no_count_and_no_newer_word() {
  // The close the database did not take: 12 calls since the last write, then a deactivation.
  let spilled = SpilledKey {
    record: KeyRecord {
      is_active: false,
      error_count: 5,
      last_error: Some("API_KEY_INVALID".into()),
      last_error_time: Some(1_800_000_000_400),
      ..record(12, NOW + 50_000)
    },
    spilled_at: 1_800_000_000_500,
  };
  // What the database took before: fewer calls, the key healthy.
  let stored = record(4, NOW + 50_000);
  let merged = merge_key(&spilled, Some(&stored), NOW);
  assert_eq!((merged.rpm.current, merged.rpd.current), (12, 12));
  assert_eq!(
    (merged.is_active, merged.error_count),
    (false, 5),
    "the spilled word is the latest"
  );
  // Another process wrote more since, and used the key after the spill: its counts and its
  // word stand; the spill lowers nothing.
  let newer = KeyRecord {
    last_used: 1_800_000_000_900,
    ..record(40, NOW + 50_000)
  };
  let merged = merge_key(&spilled, Some(&newer), NOW);
  assert_eq!(merged.rpd.current, 40);
  assert_eq!(
    (merged.is_active, merged.error_count, merged.last_used),
    (true, 0, 1_800_000_000_900)
  );
  // A window that ended since counts nothing; no stored document: the spilled one as it is now.
  let old = SpilledKey {
    record: record(9, NOW - 1),
    spilled_at: 1_800_000_000_500,
  };
  let merged = merge_key(&old, None, NOW);
  assert_eq!((merged.rpm.current, merged.rpd.current), (0, 0));
  // Merging twice is merging once.
  let once = merge_key(&spilled, Some(&stored), NOW);
  assert_eq!(merge_key(&spilled, Some(&once), NOW), once);
}

/// A budget of `subject` whose windows count `n` and end at `reset`, resting as `rest` says.
fn budget(subject: &str, n: u64, reset: Millis, rest: RestRecord) -> BudgetRecord {
  let w = |limit| WindowRecord {
    current: n,
    limit,
    reset_time: reset,
  };
  BudgetRecord {
    subject: subject.into(),
    project: Some("alpha".into()),
    model: "gemini-2.0-flash".into(),
    rpm: w(15),
    rpd: w(1_500),
    tpm: w(1_000_000),
    rest,
  }
}

#[test]
fn a_spilled_budget_merged_with_another_record_keeps_the_larger_counts_and_the_longer_rest() {
  let day = RestRecord::Until {
    until: NOW + 80_000_000,
    window: Some(LimitType::Rpd),
  };
  let minute = RestRecord::Until {
    until: NOW + 30_000,
    window: Some(LimitType::Rpm),
  };
  let spilled = budget("project:alpha/gemini-2.0-flash", 12, NOW + 50_000, minute);
  let stored = budget("project:alpha/gemini-2.0-flash", 4, NOW + 50_000, day);
  let merged = merge_budget(&spilled, Some(&stored), NOW);
  assert_eq!((merged.rpm.current, merged.rpd.current), (12, 12));
  assert_eq!(merged.rest, day, "the rest that holds longer");
  assert_eq!(merge_budget(&stored, Some(&spilled), NOW).rest, day);
  let none = budget("s", 0, NOW + 50_000, RestRecord::NoQuota);
  assert_eq!(
    merge_budget(&spilled, Some(&none), NOW).rest,
    RestRecord::NoQuota
  );
  let clear = budget("s", 0, NOW + 50_000, RestRecord::Clear);
  assert_eq!(merge_budget(&clear, Some(&spilled), NOW).rest, minute);
  // A window that ended since counts nothing; merging twice is merging once.
  let old = budget("s", 9, NOW - 1, RestRecord::Clear);
  assert_eq!(merge_budget(&old, None, NOW).rpd.current, 0);
  assert_eq!(merge_budget(&spilled, Some(&merged), NOW), merged);
}

#[test]
fn log_lines_say_what_was_kept() {
  assert_eq!(describe(0, 0, 0, 1), "1 operator decision");
  assert_eq!(
    describe(100, 3, 0, 0),
    "100 recorded calls and the state of 3 keys"
  );
  assert_eq!(
    describe(1, 1, 2, 2),
    "1 recorded call, the state of 1 key, the counts of 2 quota budgets and 2 operator decisions"
  );
  assert_eq!(describe(0, 0, 1, 0), "the counts of 1 quota budget");
  assert_eq!(describe(0, 0, 0, 0), "nothing");
}

#[test]
fn what_one_process_spills_another_claims_once_and_deletes_when_written() {
  let base = std::env::temp_dir().join(format!("gkm-spill-test-{}", std::process::id()));
  let ids = UsageIds::new(unique_name());
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
  let key = SpilledKey {
    record: record(7, 1_800_000_060_000),
    spilled_at: 1_800_000_000_500,
  };
  let budgets = [
    budget(
      "project:alpha/gemini-2.0-flash",
      3,
      1_800_000_060_000,
      RestRecord::Until {
        until: 1_800_086_400_000,
        window: Some(LimitType::Rpd),
      },
    ),
    budget("sha256_0123", 1, 1_800_000_060_000, RestRecord::NoQuota),
    budget("sha256_4567", 0, 1_800_000_060_000, RestRecord::Clear),
  ];
  let a = Spill::new(&base, "mongodb://db", "rag_db", "writer-a");
  assert_eq!(a.write(&calls[..2], &[], &[], &[]).unwrap(), 2);
  assert_eq!(
    a.write(
      &calls[2..],
      std::slice::from_ref(&key),
      &budgets,
      std::slice::from_ref(&admission)
    )
    .unwrap(),
    6
  );
  // Another database's spill directory holds none of it.
  let other = Spill::new(&base, "mongodb://db", "other_db", "writer-b");
  assert!(other.claim("b").unwrap().is_empty());
  let b = Spill::new(&base, "mongodb://db", "rag_db", "writer-b");
  let claim = b.claim("b").unwrap();
  assert_eq!(claim.spilled.calls, calls);
  assert_eq!(claim.spilled.keys, vec![key]);
  assert_eq!(claim.spilled.budgets, budgets);
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
  let ids = UsageIds::new(unique_name());
  let s = Spill::new(&base, "u", "d", "w");
  s.write(&[call(&ids, 0)], &[], &[], &[]).unwrap();
  fs::OpenOptions::new()
    .append(true)
    .open(s.file())
    .unwrap()
    .write_all(b"{\"kind\":\"call\",\"id\":\n")
    .unwrap();
  // A rest in a window there is not: that budget is unreadable, not another window's.
  let window = r#"{"current":1,"limit":15,"resetTime":1800000060000}"#;
  let odd_rest = format!(
    r#"{{"kind":"budget","subject":"sha256_0123","project":null,"model":"gemini-2.0-flash","rpm":{window},"rpd":{window},"tpm":{window},"rest":{{"state":"until","until":1800000060000,"window":"RPH"}}}}"#
  );
  fs::OpenOptions::new()
    .append(true)
    .open(s.file())
    .unwrap()
    .write_all(odd_rest.as_bytes())
    .unwrap();
  let claim = s.claim("x").unwrap();
  assert_eq!(
    (
      claim.spilled.calls.len(),
      claim.spilled.budgets.len(),
      claim.spilled.unreadable
    ),
    (1, 0, 2)
  );
  fs::remove_dir_all(&base).unwrap();
}
