//! The state exported for the store and imported from it, and the queue of recorded calls.

use super::*;
use crate::core::snapshot::UsageIds;

#[test]
fn imported_error_messages_are_masked() {
  let (p, _, _) = pool(2);
  let mut record = p.export_dirty().pop().unwrap_or_else(|| {
    p.mark_all_dirty();
    p.export_dirty().remove(0)
  });
  record.api_key = p.names().keys()[0].clone();
  record.last_error = Some(format!("old service saw {}", p.names().keys()[1]));
  assert_eq!(p.import(&[record]), 1);
  assert_eq!(
    p.last_error(0).unwrap().as_deref(),
    Some("old service saw AIzaSyTE...ijkl")
  );
}

fn exported(p: &KeyPool) -> Vec<String> {
  p.export_dirty().into_iter().map(|r| r.api_key).collect()
}

#[test]
fn every_mutation_marks_its_key_for_export_and_export_clears_the_marks() {
  let (p, clock, _) = pool(3);
  let k = p.names().keys().to_vec();
  assert!(exported(&p).is_empty());
  // Looking is not changing.
  p.best(Claim::LookOnly, 0).unwrap();
  p.figures(1).unwrap();
  assert!(exported(&p).is_empty());
  let picked = p.best(RESERVE, 0).unwrap().pick.index;
  assert_eq!(exported(&p), vec![k[picked].clone()]);
  assert!(exported(&p).is_empty());
  p.record_usage(2, 5, Outcome::Success, 1.0, None).unwrap();
  p.record_usage(2, 5, Outcome::Failure("socket hang up"), 1.0, None)
    .unwrap();
  p.handle_rate_limit(1, LimitType::Rpm, None, None).unwrap();
  assert_eq!(exported(&p), vec![k[2].clone(), k[1].clone()]);
  p.reactivate(0).unwrap();
  assert_eq!(exported(&p), vec![k[0].clone()]);
  p.reset_all_limits().unwrap();
  assert_eq!(exported(&p).len(), 3);
  // A reservation that expires changes the key's counts.
  p.best(RESERVE, 0).unwrap();
  exported(&p);
  clock.advance(MINUTE_MS + CACHE_TTL_MS);
  p.best(Claim::LookOnly, 0).unwrap();
  assert_eq!(exported(&p).len(), 1);
  // A failed write marks its keys again.
  p.record_usage(0, 1, Outcome::Success, 0.0, None).unwrap();
  let records = p.export_dirty();
  p.mark_dirty(&records);
  assert_eq!(exported(&p), vec![k[0].clone()]);
  p.mark_all_dirty();
  assert_eq!(exported(&p).len(), 3);
}

#[test]
fn exported_state_imports_into_a_restarted_pool() {
  let (p, clock, _) = pool(2);
  p.record_usage(0, 400, Outcome::Success, 12.0, None)
    .unwrap();
  p.record_usage(
    1,
    0,
    Outcome::Failure("API key not valid. [API_KEY_INVALID]"),
    3.0,
    None,
  )
  .unwrap();
  p.record_usage(1, 0, Outcome::Failure("API_KEY_INVALID again"), 3.0, None)
    .unwrap();
  let records = p.export_dirty();
  clock.advance(1_000);
  let (q, qclock, _) = pool(2);
  qclock.set(clock.now_ms());
  assert_eq!(q.import(&records), 2);
  let (a, b) = (q.figures(0).unwrap(), q.figures(1).unwrap());
  assert_eq!((a.rpm.current, a.rpd.current, a.tpm.current), (1, 1, 400));
  assert!(a.active && !b.active);
  assert_eq!(b.error_count, 2);
  assert_eq!(
    q.last_error(1).unwrap().as_deref(),
    Some("API_KEY_INVALID again")
  );
  assert_eq!(a.last_used, T0);
  // Importing does not itself mark keys: the caller decides what to write.
  assert!(exported(&q).is_empty());
  // Records of unknown keys are ignored; windows whose reset time passed are not counted.
  let mut stale = records.clone();
  stale[0].api_key = "someone-else".into();
  stale[1].rpd.reset_time = qclock.now_ms();
  stale[1].rpd.current = 150;
  assert_eq!(q.import(&stale), 1);
  assert_eq!(q.figures(1).unwrap().rpd.current, 0);
}

#[test]
fn importing_after_an_outage_keeps_the_larger_counts_and_local_errors() {
  let (p, _, _) = pool(1);
  for _ in 0..3 {
    p.record_usage(0, 10, Outcome::Success, 0.0, None).unwrap();
  }
  let stored = p.export_dirty();
  // Meanwhile, offline: two more calls, and an error.
  p.record_usage(0, 10, Outcome::Success, 0.0, None).unwrap();
  p.record_usage(0, 10, Outcome::Success, 0.0, None).unwrap();
  p.record_usage(0, 0, Outcome::Failure("503"), 0.0, None)
    .unwrap();
  p.import(&stored);
  let f = p.figures(0).unwrap();
  assert_eq!((f.rpm.current, f.rpd.current, f.tpm.current), (5, 5, 50));
  assert_eq!(f.error_count, 1);
  let mut bigger = stored.clone();
  bigger[0].rpm.current = 9;
  p.import(&bigger);
  assert_eq!(p.figures(0).unwrap().rpm.current, 9);
}

#[test]
fn recorded_calls_are_queued_with_stable_ids_only_once_enabled() {
  let (p, clock, _) = pool(2);
  p.record_usage(0, 1, Outcome::Success, 5.0, None).unwrap();
  assert!(p.take_usage(10).is_empty());
  p.enable_usage_queue(3, 2, UsageIds::new("test"), Arc::new(|| {}));
  clock.advance(5);
  p.record_usage(0, 10, Outcome::Success, 120.5, None)
    .unwrap();
  let quoted = format!("403 for {}", p.names().keys()[1]);
  p.record_usage(1, 0, Outcome::Failure(&quoted), f64::NAN, None)
    .unwrap();
  p.record_usage(1, 2, Outcome::Success, -1.0, None).unwrap();
  p.record_usage(0, 3, Outcome::Success, 1.0, None).unwrap();
  assert_eq!(p.usage_backlog(), (3, 1));
  let usage = p.take_usage(2);
  assert_eq!(usage.len(), 2);
  let (failed, ok) = (&usage[0], &usage[1]);
  assert_eq!(failed.api_key, p.names().keys()[1]);
  assert_eq!(failed.timestamp, T0 + 5);
  assert!(!failed.success);
  assert_eq!(failed.error.as_deref(), Some("403 for AIzaSyTE...ijkl"));
  assert_eq!(failed.response_time, 0.0);
  assert_eq!(
    (ok.success, ok.tokens_used, ok.response_time),
    (true, 2, 0.0)
  );
  assert_eq!(ok.id.seq, failed.id.seq + 1);
  assert_eq!(ok.id.source, failed.id.source);
  p.close();
  // A closed pool still hands over what it holds, so closing can flush.
  assert_eq!(p.take_usage(10).len(), 1);
  assert_eq!(p.usage_backlog(), (0, 1));
}
