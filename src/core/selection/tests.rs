use super::*;
use crate::core::budget::ProjectName;
use crate::core::quota::{Quota, WindowPolicy};

/// Keys, each in the project `projects[i]` names (its own when `None`), and their budgets.
struct Fixture {
  keys: Vec<KeyState>,
  budgets: Budgets,
  overload: Overload,
}

fn fixture(projects: &[Option<&str>]) -> Fixture {
  let mut budgets = Budgets::new(Quota::default(), WindowPolicy::default());
  let keys = projects
    .iter()
    .enumerate()
    .map(|(i, p)| {
      let name = match p {
        Some(p) => ProjectName::Named(p.to_string()),
        None => ProjectName::OwnOf(i),
      };
      KeyState::new(format!("key-{i}"), budgets.project(name, 0), 0)
    })
    .collect();
  Fixture {
    keys,
    budgets,
    overload: Overload::default(),
  }
}

fn keys(n: usize) -> Fixture {
  fixture(&vec![None; n])
}

impl Fixture {
  fn c(&self) -> Candidates<'_> {
    Candidates {
      keys: &self.keys,
      budgets: &self.budgets,
      model: 0,
      overload: &self.overload,
    }
  }

  fn budget(&mut self, key: usize) -> &mut Budget {
    let id = self.budgets.of(self.keys[key].project, 0);
    self.budgets.get_mut(id)
  }
}

#[test]
fn score_weighs_rpm_rpd_and_tpm_half_three_tenths_and_a_fifth() {
  let mut f = keys(1);
  assert!((f.c().score(0, 0) - 1.0).abs() < 1e-12);
  let b = f.budget(0);
  b.rpm.add(0, 15); // rpm half used
  b.rpd.add(0, 100); // rpd half used
  b.tpm.add(0, 1_000_000); // tpm used up
  assert!((f.c().score(0, 0) - (0.25 + 0.15)).abs() < 1e-12);
}

#[test]
fn a_key_is_available_only_when_it_its_model_and_its_budget_can_serve() {
  let mut f = keys(4);
  f.keys[0].health.on_key_rejected();
  f.budget(1).rpd.add(0, 200);
  f.budget(2).on_rate_limited(
    0,
    crate::core::budget::Exhausted::PerMinute(crate::core::quota::LimitType::Rpm),
    Some(1_000),
    &WindowPolicy::default(),
    86_400_000,
  );
  assert!(!f.c().is_available(0, 0, 0));
  assert!(!f.c().is_available(1, 0, 0));
  assert!(!f.c().is_available(2, 0, 0));
  assert!(f.c().is_available(2, 1_000, 0));
  assert!(!f.c().is_available(2, 1_000, 1_000_001));
  f.overload.on_overload(0, 0);
  assert!(!f.c().is_available(3, 0, 0), "its model is overloaded");
}

#[test]
fn first_pick_rebuilds_then_serves_round_robin_from_cache_until_ttl() {
  let f = keys(3);
  let mut c = SelectionCache::default();
  let picks: Vec<_> = (0..4).map(|i| c.next(f.c(), i, 0).unwrap()).collect();
  assert_eq!(picks[0].method, SelectionMethod::RoundRobin);
  assert!(picks[1..]
    .iter()
    .all(|p| p.method == SelectionMethod::CachedRoundRobin));
  assert_eq!(
    picks.iter().map(|p| p.index).collect::<Vec<_>>(),
    [0, 1, 2, 0]
  );
  assert_eq!(picks[0].total_available, 3);
  assert_eq!(
    c.next(f.c(), CACHE_TTL_MS, 0).unwrap().method,
    SelectionMethod::RoundRobin
  );
}

#[test]
fn cache_orders_by_score_best_first() {
  let mut f = keys(3);
  f.budget(0).rpm.add(0, 20);
  f.budget(1).rpm.add(0, 10);
  let mut c = SelectionCache::default();
  let order: Vec<_> = (0..3).map(|_| c.next(f.c(), 0, 0).unwrap().index).collect();
  assert_eq!(order, [2, 1, 0]);
}

#[test]
fn picks_spread_over_projects_not_keys() {
  // Project A has three keys, B one, C two: each round visits every project before any twice.
  let f = fixture(&[
    Some("A"),
    Some("A"),
    Some("A"),
    Some("B"),
    Some("C"),
    Some("C"),
  ]);
  let mut c = SelectionCache::default();
  let picks: Vec<_> = (0..6).map(|_| c.next(f.c(), 0, 0).unwrap().index).collect();
  let project = |i: usize| f.keys[i].project;
  assert_eq!(
    picks[..3]
      .iter()
      .map(|&i| project(i))
      .collect::<std::collections::HashSet<_>>()
      .len(),
    3
  );
  assert_eq!(picks, [0, 3, 4, 1, 5, 2]);
}

#[test]
fn keys_of_a_project_whose_budget_ran_out_are_all_skipped() {
  let mut f = fixture(&[Some("A"), Some("A"), Some("B")]);
  let mut c = SelectionCache::default();
  c.next(f.c(), 0, 0);
  f.budget(0).rpm.add(0, 30);
  assert_eq!(c.next(f.c(), 1, 0).unwrap().index, 2);
  assert_eq!(c.next(f.c(), 2, 0).unwrap().index, 2);
  f.budget(2).rpm.add(0, 30);
  assert_eq!(c.next(f.c(), 3, 0), None);
  // The rolling window frees after a minute (and a slice); a stale cache sees it.
  assert_eq!(
    c.next(f.c(), 61_000 + CACHE_TTL_MS, 0).unwrap().method,
    SelectionMethod::RoundRobin
  );
}

#[test]
fn rotation_moves_off_a_weak_key_to_the_strongest() {
  let mut f = keys(3);
  f.budget(0).rpm.add(0, 29);
  f.budget(0).rpd.add(0, 190);
  f.budget(1).rpm.add(0, 5);
  let mut c = SelectionCache::default();
  let r = c.rotation(f.c(), 0, 0).unwrap();
  assert_eq!(r.reason, RotationReason::Proactive);
  assert_eq!(r.selection.index, 2);
  let weak = f.c().score(0, 0);
  assert!(weak < ROTATION_THRESHOLD);
  assert_eq!(r.previous_key_score, Some(weak));
}

#[test]
fn rotation_says_why_it_did_not_rotate() {
  let f = keys(2);
  let mut c = SelectionCache::default();
  let r = c.rotation(f.c(), 0, 0).unwrap();
  assert_eq!(r.reason, RotationReason::NotNeeded);
  assert_eq!(r.selection.method, SelectionMethod::RoundRobin);
  assert_eq!(
    c.rotation(f.c(), 1, 0).unwrap().selection.method,
    SelectionMethod::CachedRoundRobin
  );
  assert_eq!(r.previous_key_score, None);

  let mut weak = keys(1);
  weak.budget(0).rpm.add(0, 29);
  weak.budget(0).rpd.add(0, 199);
  let mut c = SelectionCache::default();
  assert_eq!(
    c.rotation(weak.c(), 0, 0).unwrap().reason,
    RotationReason::NoKeyAboveThreshold
  );
}

#[test]
fn nothing_available_gives_none() {
  let mut f = keys(1);
  f.keys[0].health.on_key_rejected();
  let mut c = SelectionCache::default();
  assert_eq!(c.next(f.c(), 0, 0), None);
  assert_eq!(c.rotation(f.c(), 0, 0), None);
}
