//! One quota shared by every process that uses the same keys: the part of each key's window budget
//! this process holds, as leases the store granted (see `store::lease` for the guarded grants and
//! `leasing` for the task that asks for them). Plain state and pure functions of time, so the hot
//! path only reads and bumps counters under the pool's lock, and every rule is tested with a fake
//! clock.
//!
//! Requests per minute and per day are shared; tokens per minute are not, since a request's tokens
//! are known only after it ran (each process keeps its own TPM window, as before).
//!
//! Every process derives the same occurrences from the time. RPD is a fixed window, as Gemini's
//! day is: its occurrences end at each daily reset. RPM is a rolling one: its occurrences are
//! slices of a twentieth of the span (half a second at least), each leased on its own, and the
//! store never grants more than the limit to any run of slices one span can overlap (see
//! `store::lease`), so no rolling minute holds more than the limit across processes. Within one
//! process the rolling windows of `window` still apply on top.

use crate::core::calendar::DailyReset;
use crate::core::clock::Millis;

/// How long a daily lease lasts before it must be renewed: a process that dies holds its unused
/// part of the day's budget at most this long. Minute leases last to the end of their window.
pub const DAILY_LEASE_TTL_MS: Millis = 600_000;
/// How long before a window starts its first lease is taken, at most, so selections at the
/// boundary find it there; a tenth of the span for short windows.
pub const PREFETCH_MS: Millis = 5_000;
/// How soon to ask again after the store granted less than asked: others may give some back.
pub const RECHECK_MS: Millis = 10_000;
/// A day with the hour DST gives back.
const LONGEST_DAY_MS: Millis = 25 * 3_600_000;
/// How long a caller waiting for a lease on its way should wait before looking again.
pub const LEASE_WAIT_MS: Millis = 20;
/// Slices a rolling span is cut into, at most.
const SLICES_PER_SPAN: Millis = 20;
/// The shortest slice: each is a lease, and a store round trip must fit well within one.
const MIN_SLICE_MS: Millis = 500;

/// How long one slice of a rolling window of `span_ms` lasts.
pub fn slice_ms(span_ms: Millis) -> Millis {
  (span_ms / SLICES_PER_SPAN)
    .max(MIN_SLICE_MS)
    .min(span_ms)
    .max(1)
}

/// How many slices make one span, rounded up: a stretch of one span overlaps at most one more.
pub fn span_slices(span_ms: Millis) -> i64 {
  let slice = slice_ms(span_ms);
  (span_ms + slice - 1) / slice
}

/// A window whose budget is shared across processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedWindow {
  Rpm,
  Rpd,
}

impl SharedWindow {
  pub const ALL: [SharedWindow; 2] = [SharedWindow::Rpm, SharedWindow::Rpd];

  /// The store's name for it.
  pub fn as_str(self) -> &'static str {
    match self {
      SharedWindow::Rpm => "rpm",
      SharedWindow::Rpd => "rpd",
    }
  }

  /// How much of the limit one grant asks for: a minute's budget goes in four grants, so several
  /// processes get a fair part of it; a day's in small ones, since what a process holds and does
  /// not use is idle for everyone.
  fn grant_size(self, limit: u64) -> u64 {
    match self {
      SharedWindow::Rpm => limit.div_ceil(4),
      SharedWindow::Rpd => limit.div_ceil(32),
    }
  }
}

/// One occurrence of a shared window: `[start, end)`, named by `id` (the same in every process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occurrence {
  pub id: Millis,
  pub start: Millis,
  pub end: Millis,
}

impl Occurrence {
  /// The occurrence of `window` that holds `at`: for RPM the slice of the rolling window (see
  /// [`slice_ms`]); for RPD the day that ends at the next reset (its id is that reset).
  pub fn of(window: SharedWindow, at: Millis, span_ms: Millis, daily: DailyReset) -> Self {
    match window {
      SharedWindow::Rpm => {
        let slice = slice_ms(span_ms);
        let start = at.div_euclid(slice) * slice;
        Self {
          id: start,
          start,
          end: start + slice,
        }
      }
      SharedWindow::Rpd => {
        let end = daily.next_reset(at);
        // Days last 23 to 25 hours: a moment over 25 hours before a reset lies in the day before.
        let start = daily.next_reset(end - LONGEST_DAY_MS - 1);
        Self {
          id: end,
          start,
          end,
        }
      }
    }
  }

  pub fn contains(&self, at: Millis) -> bool {
    self.start <= at && at < self.end
  }
}

/// Part of one occurrence's budget this process holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
  pub occurrence: Occurrence,
  pub granted: u64,
  pub served: u64,
  /// Of `served`, what the store has been told was spent.
  pub reported: u64,
  /// Serve from it only before this: after it the store may hand the rest to others.
  pub expires_at: Millis,
  /// The last grant asked for: the lease is topped up when less than half of it is left.
  pub last_want: u64,
  /// Granted less than asked at this time: the occurrence is nearly used up everywhere.
  pub short_at: Option<Millis>,
  /// Taken locally while the store could not be reached (a share of the limit, see
  /// [`Allowance::grant_locally`]), not granted by the store.
  pub local: bool,
}

impl Lease {
  fn left(&self) -> u64 {
    self.granted - self.served
  }

  fn can_serve(&self, at: Millis) -> bool {
    self.occurrence.contains(at) && self.served < self.granted && at < self.expires_at
  }
}

/// What the leasing task should ask the store for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseNeed {
  /// Lease `want` more of the occurrence until `expires_at`, first reporting `spent` of what is
  /// held as used (so it is not handed out again if this process dies), then give back
  /// `give_back` of what was held before (a renewal: the new grant replaces it).
  Grant {
    occurrence: Occurrence,
    want: u64,
    limit: u64,
    expires_at: Millis,
    spent: u64,
    give_back: u64,
    /// For a slice of a rolling window, how many slices make a span (see [`span_slices`]); 0 for
    /// a fixed window.
    span_slices: i64,
  },
  /// Give back what a slice that ended was granted and did not serve: it still counts against the
  /// slices around it, which others can lease once it is given back.
  Release {
    slice: Occurrence,
    unused: u64,
    span_slices: i64,
  },
}

/// What the store did for a [`LeaseNeed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
  pub granted: u64,
  pub given_back: u64,
  /// Processes holding part of the window (this one included), as the store saw them; 0 when the
  /// answer does not say (a give-back).
  pub holders: usize,
}

/// One window's leases for one key: the occurrence in progress and, shortly before it starts, the
/// next one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowance {
  leases: [Option<Lease>; 2],
  /// Requests served in the occurrences that ended, the last one counting most: a window's first
  /// lease asks for about that much (or what the current one served so far, or the floor while
  /// the limit has room, if more; see [`Self::floor`]), so a process that serves little holds
  /// little of everyone's budget, and one that paused for a few slices is still ready for its
  /// next burst. `None` until an occurrence ended.
  demand: Option<u64>,
  /// A grant is on its way: do not ask twice.
  asking: bool,
  /// While the store cannot be reached, a rolling window serves this much in any span locally
  /// (counted by the process's own rolling window): slices cannot be shared out without the
  /// store, and a fixed share per slice would be too coarse for small limits.
  local_limit: Option<u64>,
  /// What slices that ended were granted and did not serve, waiting to be given back: a lease for
  /// the slice in progress is asked for first, since selections wait for it.
  releases: Vec<(Occurrence, u64)>,
  /// Processes the store last said hold part of the window, this one included (0: not known yet).
  peers: usize,
  /// When the store last granted less than asked: the limit is nearly used up everywhere, so first
  /// leases ask for demand alone (see [`Self::floor`]).
  short_at: Option<Millis>,
}

impl Allowance {
  fn lease_at(&self, at: Millis) -> Option<&Lease> {
    self
      .leases
      .iter()
      .flatten()
      .find(|l| l.occurrence.contains(at))
  }

  fn lease_at_mut(&mut self, at: Millis) -> Option<&mut Lease> {
    self
      .leases
      .iter_mut()
      .flatten()
      .find(|l| l.occurrence.contains(at))
  }

  /// Whether one more request may go out at `at`; `recent` is what this process served in the
  /// last span (its own rolling count), which a local limit applies to.
  pub fn can_serve(&self, at: Millis, recent: u64) -> bool {
    self.lease_at(at).is_some_and(|l| l.can_serve(at))
      || self.local_limit.is_some_and(|limit| recent < limit)
  }

  /// Counts one request served at `at`. Returns true when the lease ran low, so the leasing task
  /// should top it up now rather than at its next round.
  pub fn serve(&mut self, at: Millis) -> bool {
    match self.lease_at_mut(at) {
      Some(l) if l.served < l.granted => {
        l.served += 1;
        l.short_at.is_none() && l.left() <= l.last_want / 2
      }
      _ => false,
    }
  }

  /// When a request could go out, as far as this allowance says: `at` itself, the end of an
  /// occurrence used up everywhere, or shortly, while a lease is on its way. Under a local limit
  /// the caller knows better (its rolling window says when it frees).
  pub fn available_at(&self, at: Millis) -> Millis {
    match self.lease_at(at) {
      Some(l) if l.can_serve(at) => at,
      Some(l) if l.short_at.is_some() => l.occurrence.end,
      _ => at + LEASE_WAIT_MS,
    }
  }

  /// Serving under a local limit (the store could not be reached).
  pub fn local_limit(&self) -> Option<u64> {
    self.local_limit
  }

  /// What to ask the store for at `at`, if anything, in this order: a first lease of the
  /// occurrence in progress; giving back what an ended slice did not serve; a top-up of a lease
  /// running low, a renewal of a lease about to expire, a second try after a short grant; a first
  /// lease of the next occurrence (within the prefetch time of its start).
  pub fn need(
    &mut self,
    window: SharedWindow,
    at: Millis,
    limit: u64,
    span_ms: Millis,
    daily: DailyReset,
  ) -> Option<LeaseNeed> {
    if self.asking || limit == 0 {
      return None;
    }
    let current = Occurrence::of(window, at, span_ms, daily);
    let span = span_slices(span_ms);
    for l in self.leases.iter().flatten() {
      if l.occurrence.end <= at {
        // A quarter less for every occurrence without as much use.
        self.demand = Some(l.served.max(self.demand.unwrap_or(0) * 3 / 4));
        if window == SharedWindow::Rpm && !l.local && l.left() > 0 {
          self.releases.push((l.occurrence, l.left()));
        }
      }
    }
    self.leases = self.leases.map(|l| l.filter(|l| l.occurrence.end > at));
    // A slice more than a span before the one in progress is in no run a later grant can be in:
    // giving it back would free nothing.
    self
      .releases
      .retain(|(o, _)| o.start + span * (o.end - o.start) >= current.start);
    let want = window.grant_size(limit).max(1);
    let served_now = self.lease_at(at).map(|l| l.served);
    let floor = self.floor(window, at, limit, span_ms);
    let first = match (self.demand, served_now) {
      // Nothing leased yet: a process just started.
      (None, None) => want,
      (demand, now) => demand
        .unwrap_or(0)
        .max(now.unwrap_or(0))
        .max(floor)
        .clamp(1, want),
    };
    // Nothing held for the occurrence in progress: selections wait for its first lease, so it goes
    // before anything else.
    let mut need = self
      .lease_at(at)
      .is_none()
      .then(|| grant(window, current, first, limit, at, 0, 0, span_ms));
    // Then leftovers go back, before a top-up or the next slice's lease: they count against the
    // runs that hold those, so a busy store has room for them only once they are back.
    if need.is_none() {
      // The newest first: it is in the most runs still to come.
      let newest = (0..self.releases.len()).max_by_key(|&i| self.releases[i].0.start);
      need = newest.map(|i| {
        let (slice, unused) = self.releases.swap_remove(i);
        LeaseNeed::Release {
          slice,
          unused,
          span_slices: span,
        }
      });
    }
    if need.is_none() {
      need = self.lease_at(at).filter(|l| !l.local).and_then(|l| {
        let low = l.left() <= l.last_want / 2;
        let expiring =
          l.expires_at < l.occurrence.end && l.expires_at - at <= DAILY_LEASE_TTL_MS / 2;
        let retry = l.short_at.is_none_or(|t| at - t >= RECHECK_MS);
        // A renewal gives back what is left for a fresh grant the size of what was served since
        // the last report: held budget never piles up.
        let give_back = if expiring { l.left() } else { 0 };
        // A slice's grant stays counted whatever is served of it: nothing to report.
        let spent = match window {
          SharedWindow::Rpm => 0,
          SharedWindow::Rpd => l.served - l.reported,
        };
        let size = if low { want } else { spent.clamp(1, want) };
        ((low || expiring) && retry)
          .then(|| grant(window, current, size, limit, at, spent, give_back, span_ms))
      });
      // What is being given back is not served meanwhile; `granted` puts back what was not.
      if let Some(LeaseNeed::Grant { give_back, .. }) = need {
        if let Some(l) = self.lease_at_mut(at) {
          l.granted -= give_back;
        }
      }
    }
    let next_at = current.end;
    // A slice is short: its successor is leased as soon as it starts, so a slow store has the
    // whole slice to answer before anything waits.
    let lead = match window {
      SharedWindow::Rpm => current.end - current.start,
      SharedWindow::Rpd => PREFETCH_MS.min((current.end - current.start) / 10),
    };
    if need.is_none() && at >= next_at - lead && self.lease_at(next_at).is_none() {
      let next = Occurrence::of(window, next_at, span_ms, daily);
      need = Some(grant(window, next, first, limit, at, 0, 0, span_ms));
    }
    self.asking = need.is_some();
    need
  }

  /// The least a slice's first lease asks for while the limit has room (no short grant in the
  /// last span): this process's part of a slice at saturation, `limit / (span_slices + 1) /
  /// peers`. Demand alone would leave a burst after a quiet spell with a lease it empties before
  /// the top-up's round trip; what this holds and does not serve goes back when the slice ends.
  fn floor(&self, window: SharedWindow, at: Millis, limit: u64, span_ms: Millis) -> u64 {
    if window != SharedWindow::Rpm || self.short_at.is_some_and(|t| at - t < span_ms) {
      return 0;
    }
    let runs = span_slices(span_ms).unsigned_abs() + 1;
    limit / (runs * self.peers.max(1) as u64)
  }

  /// Applies the store's answer to `need`, or `None` when the store could not be asked (or failed
  /// before granting: nothing was then given back).
  pub fn granted(&mut self, need: &LeaseNeed, answer: Option<Answer>, at: Millis) {
    self.asking = false;
    self.apply(need, answer, at);
    // The store answers again, but a local limit ends only once the slice in progress and the
    // next one hold leases from the store: an answer about another slice leaves this one with
    // nothing to serve, and a store slow to answer after an outage could leave the next one so.
    let leased = |at| self.lease_at(at).filter(|l| !l.local);
    if answer.is_some() && leased(at).is_some_and(|l| leased(l.occurrence.end).is_some()) {
      self.local_limit = None;
    }
  }

  fn apply(&mut self, need: &LeaseNeed, answer: Option<Answer>, at: Millis) {
    let LeaseNeed::Grant {
      occurrence,
      want,
      expires_at,
      spent,
      give_back,
      ..
    } = *need
    else {
      return;
    };
    let held = self
      .leases
      .iter_mut()
      .flatten()
      .find(|l| l.occurrence == occurrence);
    let Some(Answer {
      granted,
      given_back,
      holders,
    }) = answer
    else {
      if let Some(l) = held {
        l.granted += give_back;
      }
      return;
    };
    let short_at = (granted < want).then_some(at);
    if holders > 0 {
      self.peers = holders;
    }
    if short_at.is_some() {
      self.short_at = short_at;
    }
    match held {
      Some(l) => {
        l.granted += give_back - given_back.min(give_back) + granted;
        l.reported += spent;
        l.last_want = want;
        l.short_at = short_at;
        if granted > 0 {
          l.expires_at = l.expires_at.max(expires_at);
        }
      }
      None => self.insert(Lease {
        occurrence,
        granted,
        served: 0,
        reported: 0,
        expires_at,
        last_want: want,
        short_at,
        local: false,
      }),
    }
  }

  /// While the store cannot be reached: serves `share` (the limit over the processes last seen
  /// sharing it). For a rolling window, of every span (a local limit, see [`Self::can_serve`]),
  /// at once, as a fallback under what is still held: the next slice's lease may be the request
  /// that went unanswered, and nothing must wait for the next failed round at the boundary. For a
  /// fixed window, of the day in progress, unless its lease is still good. Returns whether that
  /// changed anything.
  pub fn grant_locally(
    &mut self,
    window: SharedWindow,
    at: Millis,
    share: u64,
    span_ms: Millis,
    daily: DailyReset,
  ) -> bool {
    if window == SharedWindow::Rpm {
      let changed = self.local_limit != Some(share);
      self.local_limit = Some(share);
      return changed;
    }
    if self
      .lease_at(at)
      .is_some_and(|l| l.can_serve(at) || l.local)
    {
      return false;
    }
    let occurrence = Occurrence::of(window, at, span_ms, daily);
    let served = self.lease_at(at).map_or(0, |l| l.served);
    self.leases.iter_mut().for_each(|slot| {
      if slot.is_some_and(|l| l.occurrence == occurrence) {
        *slot = None;
      }
    });
    self.insert(Lease {
      occurrence,
      granted: share.max(served),
      served,
      reported: served,
      expires_at: occurrence.end,
      last_want: share,
      short_at: Some(at),
      local: true,
    });
    true
  }

  /// What is held and not served, per occurrence still open at `at` and per ended slice not given
  /// back yet: for giving back on close.
  pub fn unused(&self, at: Millis) -> impl Iterator<Item = (Occurrence, u64, u64)> + '_ {
    self
      .leases
      .iter()
      .flatten()
      .filter(move |l| !l.local && l.occurrence.end > at)
      .map(|l| (l.occurrence, l.left(), l.served - l.reported))
      .chain(
        self
          .releases
          .iter()
          .map(|&(slice, unused)| (slice, unused, 0)),
      )
  }

  /// Puts `lease` in place of the one that ends first (an empty slot first of all).
  fn insert(&mut self, lease: Lease) {
    let end = |l: &Option<Lease>| l.map_or(Millis::MIN, |l| l.occurrence.end);
    let oldest = usize::from(end(&self.leases[1]) < end(&self.leases[0]));
    self.leases[oldest] = Some(lease);
  }
}

#[allow(clippy::too_many_arguments)]
fn grant(
  window: SharedWindow,
  occurrence: Occurrence,
  want: u64,
  limit: u64,
  at: Millis,
  spent: u64,
  give_back: u64,
  span_ms: Millis,
) -> LeaseNeed {
  let (expires_at, span_slices) = match window {
    SharedWindow::Rpm => (occurrence.end, span_slices(span_ms)),
    SharedWindow::Rpd => (occurrence.end.min(at + DAILY_LEASE_TTL_MS), 0),
  };
  LeaseNeed::Grant {
    occurrence,
    want,
    limit,
    expires_at,
    spent,
    give_back,
    span_slices,
  }
}

/// A key's allowances in both shared windows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SharedBudget {
  pub rpm: Allowance,
  pub rpd: Allowance,
}

impl SharedBudget {
  pub fn allowance_mut(&mut self, window: SharedWindow) -> &mut Allowance {
    match window {
      SharedWindow::Rpm => &mut self.rpm,
      SharedWindow::Rpd => &mut self.rpd,
    }
  }

  /// Whether one more request may go out at `at`; `recent_rpm` is the process's own count in
  /// the last span (see [`Allowance::can_serve`]).
  pub fn can_serve(&self, at: Millis, recent_rpm: u64) -> bool {
    self.rpm.can_serve(at, recent_rpm) && self.rpd.can_serve(at, 0)
  }

  /// Counts one request in both windows; true when either ran low (see [`Allowance::serve`]).
  pub fn serve(&mut self, at: Millis) -> bool {
    let rpm_low = self.rpm.serve(at);
    self.rpd.serve(at) || rpm_low
  }

  /// When a request could go out; under a local RPM limit that is full, when the process's own
  /// rolling window frees (`rpm_frees_at`).
  pub fn available_at(&self, at: Millis, recent_rpm: u64, rpm_frees_at: Millis) -> Millis {
    let rpm = if self.rpm.can_serve(at, recent_rpm) {
      at
    } else if self.rpm.local_limit.is_some() {
      rpm_frees_at
    } else {
      self.rpm.available_at(at)
    };
    rpm.max(self.rpd.available_at(at))
  }
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::core::calendar::days_from_civil;

  const SPAN: Millis = 60_000;
  /// A minute boundary.
  const T0: Millis = 1_800_000_000_000;
  const PACIFIC: DailyReset = DailyReset::PacificMidnight;
  /// One slice of a minute: 3 s.
  const SLICE: Millis = SPAN / SLICES_PER_SPAN;

  fn got(granted: u64) -> Option<Answer> {
    Some(Answer {
      granted,
      given_back: 0,
      holders: 1,
    })
  }

  fn need(a: &mut Allowance, at: Millis) -> Option<LeaseNeed> {
    a.need(SharedWindow::Rpm, at, 30, SPAN, PACIFIC)
  }

  fn want(n: &LeaseNeed) -> (Millis, u64, u64) {
    let LeaseNeed::Grant {
      occurrence,
      want,
      spent,
      ..
    } = *n
    else {
      panic!("not a grant")
    };
    (occurrence.id, want, spent)
  }

  #[test]
  fn rpm_occurrences_are_slices_and_rpd_ones_days_every_process_derives_alike() {
    let o = Occurrence::of(SharedWindow::Rpm, T0 + 5_999, SPAN, PACIFIC);
    assert_eq!((o.id, o.start, o.end), (T0 + 3_000, T0 + 3_000, T0 + 6_000));
    assert!(!o.contains(T0 + 6_000));
    assert_eq!((slice_ms(SPAN), span_slices(SPAN)), (3_000, 20));
    // Short spans get fewer, longer slices; a span not a multiple of its slice is rounded up.
    assert_eq!((slice_ms(2_000), span_slices(2_000)), (500, 4));
    assert_eq!((slice_ms(700), span_slices(700)), (500, 2));
    assert_eq!((slice_ms(300), span_slices(300)), (300, 1));
    // The day of the spring-forward (23 hours) and of the fall-back (25 hours), in Los Angeles.
    let march_9 = days_from_civil(2025, 3, 9) * 86_400_000 + 8 * 3_600_000;
    let d = Occurrence::of(SharedWindow::Rpd, march_9 + 3_600_000, SPAN, PACIFIC);
    assert_eq!((d.start, d.end - d.start), (march_9, 23 * 3_600_000));
    let nov_2 = days_from_civil(2025, 11, 2) * 86_400_000 + 7 * 3_600_000;
    let d = Occurrence::of(SharedWindow::Rpd, nov_2 + 24 * 3_600_000, SPAN, PACIFIC);
    assert_eq!(
      (d.start, d.end - d.start, d.id),
      (nov_2, 25 * 3_600_000, d.end)
    );
  }

  /// A fresh allowance's first lease at `at` (a full grant: no history), granted `granted`.
  fn leased(a: &mut Allowance, at: Millis, granted: u64) {
    let first = need(a, at).expect("a first lease");
    assert_eq!(want(&first).1, 8, "a fresh process asks for a full grant");
    a.granted(&first, got(granted), at);
  }

  #[test]
  fn nothing_is_served_without_a_lease_and_no_more_than_granted() {
    let mut a = Allowance::default();
    assert!(!a.can_serve(T0, 0));
    assert_eq!(a.available_at(T0), T0 + LEASE_WAIT_MS);
    let n = need(&mut a, T0).expect("a first lease");
    assert_eq!(want(&n), (T0, 8, 0));
    let LeaseNeed::Grant {
      span_slices,
      expires_at,
      ..
    } = n
    else {
      panic!("not a grant")
    };
    assert_eq!((span_slices, expires_at), (20, T0 + SLICE));
    assert_eq!(need(&mut a, T0), None, "one question at a time");
    a.granted(&n, got(8), T0);
    let mut low = Vec::new();
    for _ in 0..8 {
      assert!(a.can_serve(T0 + 1, 0));
      low.push(a.serve(T0 + 1));
    }
    assert!(!a.can_serve(T0 + 1, 0));
    // The task is woken once half the lease is gone.
    assert_eq!(low, [false, false, false, true, true, true, true, true]);
    let top_up = need(&mut a, T0 + 2).expect("a top-up");
    // A slice's grant is not reported as spent: it stays counted whatever is served.
    assert_eq!(want(&top_up), (T0, 8, 0));
  }

  #[test]
  fn a_short_grant_waits_for_the_slice_to_end_and_asks_again_only_later() {
    let mut a = Allowance::default();
    leased(&mut a, T0, 3);
    for _ in 0..3 {
      a.serve(T0 + 10);
    }
    assert_eq!(a.available_at(T0 + 10), T0 + SLICE);
    // The next slice's lease is asked for; the short one is not asked again at once.
    let next = need(&mut a, T0 + 10).expect("the next slice");
    assert_eq!(want(&next).0, T0 + SLICE);
    a.granted(&next, got(0), T0 + 10);
    assert_eq!(need(&mut a, T0 + 20), None);
    assert!(!a.can_serve(T0 + 20, 0));
  }

  #[test]
  fn the_next_slice_is_leased_as_soon_as_the_current_one_starts() {
    let mut a = Allowance::default();
    leased(&mut a, T0, 8);
    for _ in 0..3 {
      a.serve(T0 + 1);
    }
    let next = need(&mut a, T0 + 1).expect("the next slice's lease");
    // As large as this slice's use so far.
    assert_eq!(want(&next), (T0 + SLICE, 3, 0));
    a.granted(&next, got(3), T0 + 1);
    // Not served before its slice starts; at once when it does.
    for _ in 0..5 {
      a.serve(T0 + SLICE - 1);
    }
    assert!(!a.can_serve(T0 + SLICE - 1, 0));
    assert!(a.can_serve(T0 + SLICE, 0));
    assert!(!a.serve(T0 + SLICE));
    assert_eq!(a.unused(T0 + SLICE - 1).count(), 2);
  }

  #[test]
  fn after_a_slice_first_leases_ask_for_what_it_served_and_leftovers_go_back() {
    let mut idle = Allowance::default();
    leased(&mut idle, T0, 8);
    let next = need(&mut idle, T0 + 1).unwrap();
    idle.granted(&next, got(1), T0 + 1);
    // Both slices ended unused: the slice in progress is leased first (selections wait for it),
    // of one, whatever the limit; then what the two were granted goes back, the newest first;
    // then the next slice is leased.
    let at = T0 + 2 * SLICE + 1;
    let current = need(&mut idle, at).expect("the slice in progress");
    assert_eq!(want(&current), (T0 + 2 * SLICE, 1, 0));
    assert_eq!(need(&mut idle, at), None, "one question at a time");
    idle.granted(&current, got(1), at);
    for (id, left) in [(T0 + SLICE, 1), (T0, 8)] {
      let back = need(&mut idle, at).expect("a release");
      let LeaseNeed::Release {
        slice,
        unused,
        span_slices,
      } = back
      else {
        panic!("not a release: {back:?}")
      };
      assert_eq!((slice.id, unused, span_slices), (id, left, 20));
      idle.granted(&back, got(0), at);
    }
    let later = need(&mut idle, at).unwrap();
    assert_eq!(want(&later), (T0 + 3 * SLICE, 1, 0));
    let mut busy = Allowance::default();
    leased(&mut busy, T0, 8);
    for _ in 0..8 {
      busy.serve(T0 + 1);
    }
    let next = need(&mut busy, T0 + SLICE + 1).unwrap();
    assert_eq!(
      want(&next),
      (T0 + SLICE, 8, 0),
      "at most a quarter of the limit"
    );
  }

  #[test]
  fn daily_leases_expire_and_are_renewed_with_what_was_spent() {
    let mut a = Allowance::default();
    let day = |a: &mut Allowance, at| a.need(SharedWindow::Rpd, at, 1_500, SPAN, PACIFIC);
    let n = day(&mut a, T0).unwrap();
    let LeaseNeed::Grant {
      want,
      expires_at,
      span_slices,
      ..
    } = n
    else {
      panic!("not a grant")
    };
    assert_eq!(
      (want, expires_at, span_slices),
      (47, T0 + DAILY_LEASE_TTL_MS, 0)
    );
    a.granted(&n, got(47), T0);
    a.serve(T0 + 1);
    assert_eq!(day(&mut a, T0 + 2), None);
    let renew = day(&mut a, T0 + DAILY_LEASE_TTL_MS / 2).expect("a renewal");
    let LeaseNeed::Grant {
      want,
      spent,
      give_back,
      ..
    } = renew
    else {
      panic!("not a grant")
    };
    // What was served since the last report is reported and asked for again; the rest goes back.
    assert_eq!((want, spent, give_back), (1, 1, 46));
    assert!(
      !a.can_serve(T0 + DAILY_LEASE_TTL_MS / 2, 0),
      "what goes back is not served meanwhile"
    );
    // Not renewed (the store was away): the old lease serves until it expires, no longer.
    a.granted(&renew, None, T0 + DAILY_LEASE_TTL_MS / 2);
    assert!(a.can_serve(T0 + DAILY_LEASE_TTL_MS - 1, 0));
    assert!(!a.can_serve(T0 + DAILY_LEASE_TTL_MS, 0));
  }

  #[test]
  fn without_the_store_a_day_serves_a_local_share_and_a_good_lease_is_kept() {
    let mut a = Allowance::default();
    assert!(a.grant_locally(SharedWindow::Rpd, T0, 200 / 4, SPAN, PACIFIC));
    for _ in 0..50 {
      assert!(a.can_serve(T0, 0));
      a.serve(T0);
    }
    assert!(!a.can_serve(T0, 0));
    assert!(!a.grant_locally(SharedWindow::Rpd, T0, 50, SPAN, PACIFIC));
    // A local share is not given back to the store.
    assert_eq!(a.unused(T0).count(), 0);
    let mut b = Allowance::default();
    let n = b.need(SharedWindow::Rpd, T0, 200, SPAN, PACIFIC).unwrap();
    b.granted(&n, got(7), T0);
    assert!(!b.grant_locally(SharedWindow::Rpd, T0, 50, SPAN, PACIFIC));
  }

  #[test]
  fn without_the_store_a_rolling_window_serves_a_local_limit_until_the_store_answers() {
    let mut a = Allowance::default();
    let n = need(&mut a, T0).unwrap();
    a.granted(&n, got(2), T0);
    // The local limit is there at once, under the lease, which serves first.
    assert!(a.grant_locally(SharedWindow::Rpm, T0, 7, SPAN, PACIFIC));
    assert!(!a.grant_locally(SharedWindow::Rpm, T0, 7, SPAN, PACIFIC));
    a.serve(T0);
    a.serve(T0);
    assert!(a.can_serve(T0, 6));
    assert!(!a.can_serve(T0, 7));
    // The process's own count over the last span decides, across slices.
    assert!(a.can_serve(T0 + 5 * SLICE, 6));
    assert!(!a.can_serve(T0 + 5 * SLICE, 7));
    let mut budget = SharedBudget {
      rpm: a.clone(),
      rpd: Allowance::default(),
    };
    let day = budget
      .rpd
      .need(SharedWindow::Rpd, T0, 200, SPAN, PACIFIC)
      .unwrap();
    budget.rpd.granted(&day, got(10), T0);
    assert_eq!(budget.available_at(T0, 7, T0 + 40_000), T0 + 40_000);
    assert_eq!(budget.available_at(T0, 3, T0 + 40_000), T0);
    // The store answers again: a lease of the slice in progress is not enough (the next one may
    // not come in time); once the next one is leased too, leases decide.
    let at = T0 + 5 * SLICE;
    let n = need(&mut a, at).unwrap();
    a.granted(&n, got(0), at);
    assert!(a.can_serve(at, 0), "still the local limit");
    let n = need(&mut a, at).unwrap();
    assert_eq!(want(&n).0, at + SLICE);
    a.granted(&n, got(0), at);
    assert!(!a.can_serve(at, 0));
  }

  /// A span of 2 s: slices of 500 ms, four to a span, so a run is five slices.
  const SHORT_SPAN: Millis = 2_000;
  const HALF_SECOND: Millis = 500;

  fn answer(granted: u64, holders: usize) -> Option<Answer> {
    Some(Answer {
      granted,
      given_back: 0,
      holders,
    })
  }

  #[test]
  fn while_the_limit_has_room_first_leases_ask_for_a_fair_part_of_a_slice_not_just_demand() {
    let ask = |a: &mut Allowance, at| a.need(SharedWindow::Rpm, at, 100_000, SHORT_SPAN, PACIFIC);
    let mut a = Allowance::default();
    let n = ask(&mut a, T0).unwrap();
    assert_eq!(want(&n).1, 25_000, "a fresh process asks for a full grant");
    // Two processes hold part of the window; this one serves one request a slice.
    a.granted(&n, answer(25_000, 2), T0);
    a.serve(T0 + 1);
    let next = ask(&mut a, T0 + 2).unwrap();
    // A burst could come at any slice: a fifth of the limit (one slice of a run of five) over
    // two processes, not the one request served so far.
    assert_eq!(want(&next), (T0 + HALF_SECOND, 10_000, 0));
    a.granted(&next, answer(10_000, 2), T0 + 2);
    // A burst of 5,000 in the next slice is served from what was leased before it started.
    let burst = T0 + HALF_SECOND;
    for _ in 0..5_000 {
      assert!(a.can_serve(burst, 0));
      a.serve(burst);
    }
    // The first slice's leftovers go back, then this one is topped up.
    let back = ask(&mut a, burst + 1).expect("the first slice's leftovers");
    assert!(
      matches!(back, LeaseNeed::Release { unused: 24_999, .. }),
      "{back:?}"
    );
    a.granted(&back, answer(0, 0), burst + 1);
    let top_up = ask(&mut a, burst + 1).expect("a top-up");
    assert_eq!(want(&top_up), (burst, 25_000, 0));
    // The store is short: the limit is nearly used up everywhere, so first leases ask for
    // demand alone for a span, and others get the rest.
    a.granted(&top_up, answer(100, 2), burst + 2);
    let next = ask(&mut a, burst + 2).unwrap();
    assert_eq!(want(&next), (burst + HALF_SECOND, 5_000, 0));
    // Once a span passed without a short grant, the floor is back.
    a.granted(&next, answer(5_000, 2), burst + 2);
    let n = ask(&mut a, T0 + 6 * HALF_SECOND).unwrap();
    assert_eq!(want(&n), (T0 + 6 * HALF_SECOND, 10_000, 0));
  }

  #[test]
  fn a_hung_store_leaves_the_next_slice_to_the_local_limit_until_both_slices_are_leased_again() {
    let ask = |a: &mut Allowance, at| a.need(SharedWindow::Rpm, at, 100_000, SHORT_SPAN, PACIFIC);
    let mut a = Allowance::default();
    let n = ask(&mut a, T0).unwrap();
    a.granted(&n, answer(25_000, 2), T0);
    // The next slice's lease is the request the store does not answer.
    let next = ask(&mut a, T0 + 10).unwrap();
    assert_eq!(want(&next).0, T0 + HALF_SECOND);
    a.granted(&next, None, T0 + 210);
    // The round that timed out sets the local limit at once, though this slice's lease is good:
    // the next slice starts with it, not with nothing until another round times out.
    assert!(a.grant_locally(SharedWindow::Rpm, T0 + 210, 50_000, SHORT_SPAN, PACIFIC));
    assert!(a.can_serve(T0 + HALF_SECOND, 49_999));
    assert!(!a.can_serve(T0 + HALF_SECOND, 50_000));
    // Asked again, answered once the slice has started (the store resumed, slowly).
    let next = ask(&mut a, T0 + 400).unwrap();
    let at = T0 + HALF_SECOND + 20;
    a.granted(&next, answer(10_000, 2), at);
    // This slice is leased, not yet the next, which a slow store may answer too late.
    assert!(a.can_serve(T0 + 2 * HALF_SECOND, 0));
    // The first slice's leftovers go back: an answer about another slice changes nothing.
    let back = ask(&mut a, at).unwrap();
    assert!(
      matches!(back, LeaseNeed::Release { unused: 25_000, .. }),
      "{back:?}"
    );
    a.granted(&back, answer(0, 0), at + 1);
    assert!(a.can_serve(T0 + 2 * HALF_SECOND, 0));
    let next = ask(&mut a, at + 1).unwrap();
    assert_eq!(want(&next).0, T0 + 2 * HALF_SECOND);
    a.granted(&next, answer(10_000, 2), at + 2);
    // Both are: leases decide again.
    assert_eq!(a.local_limit(), None);
    assert!(!a.can_serve(T0 + 3 * HALF_SECOND, 0));
  }
}
