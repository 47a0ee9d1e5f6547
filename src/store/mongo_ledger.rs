//! Rolling-window leases on MongoDB: one ledger document per key and window (see
//! [`super::lease`]), changed only by compare-and-swap on its `version`, so two processes that
//! read the same ledger cannot both grant from it. A grant is two round trips (read, then swap);
//! losing a race means another grant went in first, and the read is done again.

use mongodb::bson::{doc, Bson, DateTime, Document};

use super::documents::count;
use super::error::StoreError;
use super::lease::{self, ledger_id, Ledger, ATTEMPTS};
use super::mongo::{error_code, MongoStore, DUPLICATE_KEY};
use super::records::{Grant, LeaseSlot, SliceSlot};

/// A ledger as stored, with the version it was read at (`None`: there is none yet).
struct Read {
  ledger: Ledger,
  version: Option<i64>,
}

fn ledger_from(d: &Document) -> Ledger {
  let numbers = |field: &str| -> Vec<(String, Bson)> {
    d.get_document(field)
      .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
      .unwrap_or_default()
  };
  Ledger {
    slices: numbers("slices")
      .into_iter()
      .filter_map(|(k, v)| Some((k.parse().ok()?, count(Some(&v))?)))
      .collect(),
    holders: numbers("holders")
      .into_iter()
      .filter_map(|(k, v)| Some((k, slice_of(&v)?)))
      .collect(),
  }
}

/// An integer of either width: servers may hand back an Int64 written as Int32.
fn slice_of(v: &Bson) -> Option<i64> {
  match v {
    Bson::Int32(n) => Some(i64::from(*n)),
    Bson::Int64(n) => Some(*n),
    _ => None,
  }
}

fn ledger_document(slot: &SliceSlot<'_>, id: &str, ledger: &Ledger, version: i64) -> Document {
  let mut slices = Document::new();
  for (s, n) in &ledger.slices {
    slices.insert(s.to_string(), i64::try_from(*n).unwrap_or(i64::MAX));
  }
  let mut holders = Document::new();
  for (h, s) in &ledger.holders {
    holders.insert(h.as_str(), *s);
  }
  doc! {
    "_id": id,
    "apiKey": slot.api_key,
    "window": slot.window,
    "slices": slices,
    "holders": holders,
    "version": version,
    // The TTL index deletes a ledger an hour after its newest slice, once nobody leases.
    "windowEnd": DateTime::from_millis(slot.slice_end),
  }
}

impl MongoStore {
  async fn read_ledger(&self, id: &str) -> Result<Read, StoreError> {
    self.count_op();
    Ok(match self.leases.find_one(doc! { "_id": id }).await? {
      Some(d) => Read {
        ledger: ledger_from(&d),
        version: d.get("version").and_then(slice_of),
      },
      None => Read {
        ledger: Ledger::default(),
        version: None,
      },
    })
  }

  /// Writes `ledger` in place of the version read; false when another write came first.
  async fn swap_ledger(
    &self,
    slot: &SliceSlot<'_>,
    id: &str,
    read: &Read,
    ledger: &Ledger,
  ) -> Result<bool, StoreError> {
    self.count_op();
    match read.version {
      None => {
        let created = ledger_document(slot, id, ledger, 1);
        match self.leases.insert_one(created).await {
          Ok(_) => Ok(true),
          Err(e) if error_code(&e) == Some(DUPLICATE_KEY) => Ok(false),
          Err(e) => Err(e.into()),
        }
      }
      Some(v) => {
        let next = ledger_document(slot, id, ledger, v + 1);
        let swapped = self
          .leases
          .replace_one(doc! { "_id": id, "version": v }, next)
          .await?;
        Ok(swapped.matched_count == 1)
      }
    }
  }

  /// Leases up to `want` in one slice of a rolling window: `want` when it fits, what is left when
  /// it does not, 0 when the runs of slices around it are used up. No run of `span_slices + 1`
  /// slices in a row is ever granted more than `limit`, across every process and host.
  pub async fn lease_slice(
    &self,
    slot: &SliceSlot<'_>,
    want: u64,
    limit: u64,
    holder: &str,
  ) -> Result<Grant, StoreError> {
    check(slot, holder)?;
    let stored = self.naming.stored(slot.api_key);
    let slot = &SliceSlot {
      api_key: &stored,
      ..*slot
    };
    let id = ledger_id(slot.window, slot.api_key);
    let mut holders = 1;
    for _ in 0..ATTEMPTS {
      let read = self.read_ledger(&id).await?;
      holders = read.ledger.holders_at(slot.slice, slot.span_slices, holder);
      let granted = want.min(read.ledger.room(slot.slice, slot.span_slices, limit));
      if granted == 0 {
        return Ok(Grant {
          granted: 0,
          holders,
        });
      }
      let mut ledger = read.ledger.clone();
      ledger.grant(slot.slice, slot.span_slices, granted, holder);
      if self.swap_ledger(slot, &id, &read, &ledger).await? {
        return Ok(Grant { granted, holders });
      }
    }
    // Every attempt lost to a grant elsewhere: nothing here is the safe answer.
    Ok(Grant {
      granted: 0,
      holders,
    })
  }

  /// Gives back up to `unused` of what a slice was granted; returns how much.
  pub async fn release_slice(
    &self,
    slot: &SliceSlot<'_>,
    holder: &str,
    unused: u64,
  ) -> Result<u64, StoreError> {
    check(slot, holder)?;
    let stored = self.naming.stored(slot.api_key);
    let slot = &SliceSlot {
      api_key: &stored,
      ..*slot
    };
    let id = ledger_id(slot.window, slot.api_key);
    for _ in 0..ATTEMPTS {
      let read = self.read_ledger(&id).await?;
      if read.version.is_none() || unused == 0 {
        return Ok(0);
      }
      let mut ledger = read.ledger.clone();
      let back = ledger.release(slot.slice, unused);
      if back == 0 || self.swap_ledger(slot, &id, &read, &ledger).await? {
        return Ok(back);
      }
    }
    Ok(0)
  }
}

/// The checks of fixed-window slots, for a slice.
pub(super) fn check(slot: &SliceSlot<'_>, holder: &str) -> Result<(), StoreError> {
  if slot.span_slices < 1 {
    return Err(StoreError::InvalidLease(format!(
      "a span must hold at least one slice (got {})",
      slot.span_slices
    )));
  }
  lease::check(
    &LeaseSlot {
      api_key: slot.api_key,
      window: slot.window,
      window_id: slot.slice,
      window_end: slot.slice_end,
    },
    holder,
  )
}

#[cfg(test)]
mod tests {
  use std::sync::Arc;

  use super::*;
  use crate::store::mongo::DEFAULT_CONNECT_TIMEOUT;
  use crate::store::test_server::TestServer;

  fn slot(slice: i64) -> SliceSlot<'static> {
    SliceSlot {
      api_key: "AIzaSyLEDGER",
      window: "rpm",
      slice,
      span_slices: 4,
      slice_end: 1_800_000_000_000 + slice,
    }
  }

  #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
  async fn racing_holders_never_pass_the_limit_in_any_run_of_slices() {
    let server = TestServer::start();
    let mut stores = Vec::new();
    for _ in 0..4 {
      stores.push(Arc::new(
        MongoStore::connect(&server.uri(), "gkm_ledger", DEFAULT_CONNECT_TIMEOUT)
          .await
          .unwrap(),
      ));
    }
    // Eight holders lease 3 at a time in slices 100..=108, each racing the others.
    let tasks: Vec<_> = (0..8)
      .map(|i| {
        let store = stores[i % stores.len()].clone();
        tokio::spawn(async move {
          let holder = format!("proc-{i}");
          let mut got = Vec::new();
          for slice in 100..=108 {
            for _ in 0..16 {
              let g = store
                .lease_slice(&slot(slice), 3, 30, &holder)
                .await
                .unwrap();
              if g.granted == 0 {
                break;
              }
              got.push((slice, g.granted));
            }
          }
          got
        })
      })
      .collect();
    let mut per_slice = std::collections::BTreeMap::<i64, u64>::new();
    for t in tasks {
      for (slice, n) in t.await.unwrap() {
        *per_slice.entry(slice).or_default() += n;
      }
    }
    for first in 100..=104 {
      let run: u64 = (first..first + 5)
        .map(|s| per_slice.get(&s).copied().unwrap_or(0))
        .sum();
      assert!(
        run <= 30,
        "slices {first}..{}: {run} ({per_slice:?})",
        first + 5
      );
    }
    // The budget was used, not just respected: slice 100 got all of its first run.
    assert_eq!(per_slice[&100], 30, "{per_slice:?}");
    assert_eq!(per_slice[&105], 30, "{per_slice:?}");
    // What is given back is granted again; never more than the slice holds.
    let s = &stores[0];
    assert_eq!(s.release_slice(&slot(105), "proc-0", 7).await.unwrap(), 7);
    assert_eq!(
      s.lease_slice(&slot(108), 10, 30, "x")
        .await
        .unwrap()
        .granted,
      7
    );
    assert_eq!(s.release_slice(&slot(108), "x", 100).await.unwrap(), 7);
    assert_eq!(s.release_slice(&slot(999), "x", 1).await.unwrap(), 0);
    assert!(matches!(
      s.lease_slice(
        &SliceSlot {
          span_slices: 0,
          ..slot(1)
        },
        1,
        30,
        "x"
      )
      .await,
      Err(StoreError::InvalidLease(_))
    ));
  }
}
