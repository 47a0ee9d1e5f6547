//! Operators' changes to keys, and how they travel between processes.

use super::*;
use crate::core::snapshot::AdmissionRecord;

#[test]
fn reset_all_limits_gives_fresh_windows_and_ends_rests() {
  let (p, clock, _) = pool(1);
  p.best(RESERVE, 0).unwrap();
  p.record_usage(0, 99, Outcome::Success, 0.0, None).unwrap();
  p.handle_rate_limit(0, LimitType::Rpd, None, None).unwrap();
  clock.advance(5);
  p.reset_all_limits().unwrap();
  let f = p.figures(0).unwrap();
  assert_eq!((f.rpm.current, f.rpd.current, f.tpm.current), (0, 0, 0));
  assert_eq!(f.state, HealthState::Active);
}

#[test]
fn operators_decisions_are_exported_once_and_again_after_a_failed_write() {
  let (p, clock, log) = pool(2);
  let new = "AIzaSyTESTKEYNEWWabcdefghijkl";
  assert_eq!(p.add_key(new, None).unwrap(), 2);
  clock.advance(5);
  p.admit(0, Admission::Disabled).unwrap();
  let exported = p.export_admissions();
  assert_eq!(
    exported,
    vec![
      AdmissionRecord {
        api_key: new.into(),
        admission: Admission::Enabled,
        changed_at: T0,
        added: true,
        project: None,
      },
      AdmissionRecord {
        api_key: p.names().keys()[0].clone(),
        admission: Admission::Disabled,
        changed_at: T0 + 5,
        added: false,
        project: None,
      },
    ]
  );
  assert!(p.export_admissions().is_empty());
  p.mark_admissions(&exported[1..]);
  assert_eq!(p.export_admissions(), exported[1..].to_vec());
  let lines = logged(&log);
  assert!(
    lines.contains(&"✅ API key AIzaSyTE...ijkl added".to_owned()),
    "{lines:?}"
  );
  assert!(lines
    .iter()
    .any(|l| l.starts_with("⚠️ API key") && l.ends_with("disabled")));
  // Disabling what is disabled changes nothing and says nothing.
  assert!(!p.admit(0, Admission::Disabled).unwrap());
}

#[test]
fn decisions_from_other_processes_apply_unless_a_later_one_was_made_here() {
  let (p, clock, log) = pool(2);
  clock.advance(1_000);
  p.admit(1, Admission::Disabled).unwrap();
  let names = p.names();
  let record = |key: &str, admission, changed_at, added| AdmissionRecord {
    api_key: key.into(),
    admission,
    changed_at,
    added,
    project: None,
  };
  let joined = "AIzaSyTESTKEYJOINabcdefghijkl";
  let changed = p.follow_admissions(&[
    // Older than this process's own decision: ignored.
    record(&names.keys()[1], Admission::Enabled, T0 + 500, false),
    record(&names.keys()[0], Admission::Removed, T0 + 700, false),
    record(joined, Admission::Enabled, T0 + 800, true),
    record("not a key", Admission::Enabled, T0, true),
  ]);
  assert_eq!(changed, 2);
  assert_eq!(p.figures(1).unwrap().admission, Admission::Disabled);
  assert_eq!(p.figures(0).unwrap().admission, Admission::Removed);
  assert_eq!(p.names().position(joined), Some(2));
  // What came from the store is not exported back.
  assert!(p
    .export_admissions()
    .iter()
    .all(|r| r.api_key == names.keys()[1]));
  // Only the joined key serves: key 0 is removed, key 1 disabled.
  for _ in 0..4 {
    assert_eq!(p.best(RESERVE, 0).unwrap().pick.index, 2);
  }
  assert_eq!(p.statuses().unwrap().len(), 2);
  assert_eq!(p.index_of(&names.keys()[0]), Err(PoolError::KeyNotFound));
  assert!(logged(&log)
    .iter()
    .any(|l| l.ends_with("removed by another process")));
  // The same records again change nothing.
  assert_eq!(
    p.follow_admissions(&[record(joined, Admission::Enabled, T0 + 800, true)]),
    0
  );
}

#[test]
fn a_removed_key_keeps_its_history_and_takes_a_late_report() {
  let (p, _, _) = pool(2);
  let picked = p.best(RESERVE, 0).unwrap().pick.index;
  p.admit(picked, Admission::Removed).unwrap();
  // The call handed out before the removal still reports.
  let f = p
    .record_usage(picked, 10, Outcome::Success, 1.0, None)
    .unwrap();
  assert_eq!((f.rpm.current, f.admission), (1, Admission::Removed));
  assert!(!f.active);
  assert_eq!(p.every_status().unwrap().len(), 2);
  assert_eq!(p.metrics().unwrap().keys.len(), 1);
  assert_eq!(
    p.rate_limit_info(picked, None).unwrap_err(),
    PoolError::KeyNotFound
  );
  assert_eq!(
    p.admit(picked, Admission::Enabled).unwrap_err(),
    PoolError::KeyNotFound
  );
  assert_eq!(
    p.add_key(&p.names().keys()[1 - picked].clone(), None),
    Err(PoolError::DuplicateKey)
  );
}
