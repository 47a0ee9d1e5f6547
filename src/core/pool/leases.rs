//! The pool's side of a shared quota (see `sharing`): which leases each budget needs, what the
//! store granted, the local share served while the store is away, and what is left to give back
//! when the process leaves. The leasing task outside the core does the asking.

use crate::core::budget::BudgetId;
use crate::core::key::Admission;
use crate::core::wake::Wake;
use crate::sharing::share::{Answer, LeaseNeed, Occurrence, SharedWindow};

use super::{KeyPool, PoolState};

impl KeyPool {
  /// From now on, hands out a key only within what this process leased of its budgets' shared
  /// quota (see `share`): until the first leases arrive no key is available. A second call
  /// changes nothing.
  pub fn share_quota(&self) {
    let mut state = self.state.lock();
    if state.budgets.is_shared() {
      return;
    }
    state.budgets.share();
    state.invalidate_caches();
  }

  /// What the pool calls when a shared lease runs low: the leasing task's wake-up.
  pub fn set_lease_wake(&self, wake: Wake) {
    self.state.lock().lease_wake = Some(wake);
  }

  /// What names budget `b` in the store's leases, the same in every process: for a key's own
  /// project and the default model the key itself (as the leases of one key have always been
  /// named), else the project (or the key) and the model. The store keeps it in its naming (a
  /// digest or a fingerprint), never as it is.
  pub fn lease_subject(&self, b: BudgetId) -> Option<String> {
    let names = self.names();
    let state = self.state.lock();
    (b < state.budgets.len())
      .then(|| state.subject_of(&names, b))
      .flatten()
  }

  /// Whether anything of budget `b` is used: a budget no key in service draws on holds nothing of
  /// a quota others could use.
  pub(super) fn budget_in_use(state: &PoolState, b: BudgetId) -> bool {
    let project = state.budgets.get(b).project;
    state.keys.iter().any(|k| {
      k.project == project && k.admission == Admission::Enabled && !k.health.is_deactivated()
    })
  }

  /// What the leasing task should ask the store for now, per budget and window. Budgets no key in
  /// service draws on need nothing. Every need returned must be answered with
  /// [`Self::leases_granted`].
  pub fn lease_needs(&self) -> Vec<(BudgetId, SharedWindow, LeaseNeed)> {
    let (span, daily) = (self.policy.span_ms, self.policy.daily_reset);
    let mut state = self.state.lock();
    let now = state.last_now.max(self.clock.now_ms());
    let in_use: Vec<bool> = (0..state.budgets.len())
      .map(|b| Self::budget_in_use(&state, b))
      .collect();
    let mut needs = Vec::new();
    for (b, budget) in state.budgets.iter_mut().enumerate() {
      if !in_use[b] {
        continue;
      }
      let limits = [budget.quota.rpm, budget.quota.rpd];
      let Some(shared) = budget.shared.as_deref_mut() else {
        continue;
      };
      for (window, limit) in SharedWindow::ALL.into_iter().zip(limits) {
        if let Some(need) = shared
          .allowance_mut(window)
          .need(window, now, limit, span, daily)
        {
          needs.push((b, window, need));
        }
      }
    }
    needs
  }

  /// Applies the store's answers to [`Self::lease_needs`]: how much each got, or `None` when the
  /// store could not be asked. A budget that could not serve before and can now is made visible to
  /// selection at once.
  pub fn leases_granted(&self, answers: &[(BudgetId, SharedWindow, LeaseNeed, Option<Answer>)]) {
    let mut state = self.state.lock();
    let now = state.last_now.max(self.clock.now_ms());
    let mut newly_available = false;
    for (b, window, need, answer) in answers {
      if *b >= state.budgets.len() {
        continue;
      }
      let budget = state.budgets.get_mut(*b);
      let recent = budget.rpm.current(now);
      let Some(shared) = budget.shared.as_deref_mut() else {
        continue;
      };
      let could = shared.can_serve(now, recent);
      shared.allowance_mut(*window).granted(need, *answer, now);
      newly_available |= !could && shared.can_serve(now, recent);
    }
    if newly_available {
      state.invalidate_caches();
    }
  }

  /// While the store cannot be reached: every budget serves `1 / peers` of each shared limit in
  /// the windows it holds no good lease for (see [`crate::sharing::share::Allowance::grant_locally`]).
  pub fn grant_locally(&self, peers: usize) {
    let (span, daily) = (self.policy.span_ms, self.policy.daily_reset);
    let peers = peers.max(1) as u64;
    let mut state = self.state.lock();
    let now = state.last_now.max(self.clock.now_ms());
    let mut granted = false;
    for budget in state.budgets.iter_mut() {
      let limits = [budget.quota.rpm, budget.quota.rpd];
      let Some(shared) = budget.shared.as_deref_mut() else {
        continue;
      };
      for (window, limit) in SharedWindow::ALL.into_iter().zip(limits) {
        granted |=
          shared
            .allowance_mut(window)
            .grant_locally(window, now, limit / peers, span, daily);
      }
    }
    if granted {
      state.invalidate_caches();
    }
  }

  /// Per budget and window, what is held and not served in windows still open, and what was
  /// served and not yet reported: what to give back and report when the process leaves.
  pub fn unused_leases(&self) -> Vec<(BudgetId, SharedWindow, Occurrence, u64, u64)> {
    let state = self.state.lock();
    let now = state.last_now.max(self.clock.now_ms());
    let mut unused = Vec::new();
    for (b, budget) in state.budgets.iter() {
      let Some(shared) = budget.shared.as_deref() else {
        continue;
      };
      for (window, allowance) in [
        (SharedWindow::Rpm, &shared.rpm),
        (SharedWindow::Rpd, &shared.rpd),
      ] {
        unused.extend(
          allowance
            .unused(now)
            .map(|(occurrence, left, spent)| (b, window, occurrence, left, spent)),
        );
      }
    }
    unused
  }
}
