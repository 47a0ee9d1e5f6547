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
use crate::core::clock::{Millis, HOUR_MS};

/// How long a daily lease lasts before it must be renewed: a process that dies holds its unused
/// part of the day's budget at most this long. Minute leases last to the end of their window.
pub const DAILY_LEASE_TTL_MS: Millis = 600_000;
/// How long before a window starts its first lease is taken, at most, so selections at the
/// boundary find it there; a tenth of the span for short windows.
pub const PREFETCH_MS: Millis = 5_000;
/// How soon to ask again after the store granted less than asked: others may give some back.
pub const RECHECK_MS: Millis = 10_000;
/// A day with the hour DST gives back.
const LONGEST_DAY_MS: Millis = 25 * HOUR_MS;
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
mod tests;
