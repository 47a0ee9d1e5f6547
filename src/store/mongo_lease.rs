//! Shared quota leases on MongoDB (design and guarantees in [`super::lease`]). A grant that fits is
//! one guarded `find_one_and_update`; only the first lease of a window, or one that no longer fits
//! whole, reads the document and tries again with what is left.

use mongodb::bson::{doc, DateTime, Document};
use mongodb::options::ReturnDocument;

use super::documents::{count, millis};
use super::error::StoreError;
use super::lease::{self, lease_id, valid_holder, ATTEMPTS};
use super::mongo::{error_code, MongoStore, DUPLICATE_KEY, READ_BATCH};
use super::records::{Grant, LeaseSlot};
use crate::core::clock::Millis;

/// Amounts as stored: Int64, clamped (no real budget comes near `i64::MAX`).
fn int64(n: u64) -> i64 {
  i64::try_from(n).unwrap_or(i64::MAX)
}

/// How many hold a lease in the document, `holder` counted whether it is there yet or not.
fn holders_with(d: &Document, holder: &str) -> usize {
  d.get_document("holders")
    .map_or(1, |h| h.len() + usize::from(!h.contains_key(holder)))
}

impl MongoStore {
  /// Leases up to `want` of the slot's budget to `holder` until `expires_at` (a lease it already
  /// holds lasts at least as long), and says how much was granted: `want` when it fits, what is
  /// left when it does not, 0 when the window is used up. Across every process and host the
  /// grants of one slot add up to at most `limit`.
  pub async fn lease(
    &self,
    slot: &LeaseSlot<'_>,
    want: u64,
    limit: u64,
    holder: &str,
    expires_at: Millis,
  ) -> Result<Grant, StoreError> {
    lease::check(slot, holder)?;
    let stored = self.naming.stored(slot.api_key);
    let slot = &LeaseSlot {
      api_key: &stored,
      ..*slot
    };
    let want = want.min(limit);
    let nothing = |holders| Grant {
      granted: 0,
      holders,
    };
    if want == 0 {
      return Ok(nothing(1));
    }
    let id = lease_id(slot);
    if let Some(holders) = self.try_grant(&id, want, limit, holder, expires_at).await? {
      return Ok(Grant {
        granted: want,
        holders,
      });
    }
    let mut holders = 1;
    for _ in 0..ATTEMPTS {
      let used = match self.read_lease(&id).await? {
        Some(d) => {
          holders = holders_with(&d, holder);
          count(d.get("used")).unwrap_or(0)
        }
        None => {
          // The window's first lease: one upsert creates the document with the grant in it.
          if let Some(holders) = self.try_create(&id, slot, want, holder, expires_at).await? {
            return Ok(Grant {
              granted: want,
              holders,
            });
          }
          continue;
        }
      };
      let grant = want.min(limit.saturating_sub(used));
      if grant == 0 {
        return Ok(nothing(holders));
      }
      if let Some(holders) = self
        .try_grant(&id, grant, limit, holder, expires_at)
        .await?
      {
        return Ok(Grant {
          granted: grant,
          holders,
        });
      }
    }
    // Every attempt lost a race, each to a grant elsewhere: nothing here is the safe answer.
    Ok(nothing(holders))
  }

  /// Gives back `unused` of what `holder` holds in the slot, so others can lease it. Never more
  /// than the holder holds; returns how much was given back.
  pub async fn release(
    &self,
    slot: &LeaseSlot<'_>,
    holder: &str,
    unused: u64,
  ) -> Result<u64, StoreError> {
    self.give_back(slot, holder, unused, true).await
  }

  /// Reports `spent` of what `holder` holds as used: it stays counted in the window, but is no
  /// longer the holder's to give back, so it is not handed out again if the holder dies. Never
  /// more than the holder holds; returns how much was reported.
  pub async fn consume(
    &self,
    slot: &LeaseSlot<'_>,
    holder: &str,
    spent: u64,
  ) -> Result<u64, StoreError> {
    self.give_back(slot, holder, spent, false).await
  }

  /// Returns to the pool what holders whose lease expired before `now` still hold, in every window
  /// not yet over; returns the total. Pass `now` lowered by the clock skew to allow between hosts.
  /// One round trip to find the live windows, plus one per expired holder.
  pub async fn reclaim_expired(&self, now: Millis) -> Result<u64, StoreError> {
    self.count_op();
    let filter = doc! { "windowEnd": { "$gt": DateTime::from_millis(now) } };
    let mut cursor = self.leases.find(filter).batch_size(READ_BATCH).await?;
    let mut live = Vec::new();
    while cursor.advance().await? {
      live.push(cursor.deserialize_current()?);
    }
    let mut reclaimed = 0;
    for d in &live {
      reclaimed += self.reclaim_in(d, now).await?;
    }
    Ok(reclaimed)
  }

  async fn reclaim_in(&self, d: &Document, now: Millis) -> Result<u64, StoreError> {
    let (Some(id), Ok(holders), Ok(expires)) = (
      d.get("_id"),
      d.get_document("holders"),
      d.get_document("expires"),
    ) else {
      return Ok(0);
    };
    let mut reclaimed = 0;
    for (holder, held) in holders.iter().filter(|(h, _)| valid_holder(h)) {
      let Some(expiry) = expires.get(holder) else {
        continue;
      };
      if millis(Some(expiry)).is_none_or(|e| e >= now) {
        continue;
      }
      let amount = count(Some(held)).unwrap_or(0);
      let holding = format!("holders.{holder}");
      let expiring = format!("expires.{holder}");
      // Guarded by the values just read: a holder that renewed or gave back meanwhile is left be.
      let filter = doc! { "_id": id, &holding: held, &expiring: expiry };
      let update = doc! {
        "$inc": { "used": -int64(amount) },
        "$unset": { holding: "", expiring: "" },
      };
      self.count_op();
      if self.leases.update_one(filter, update).await?.modified_count == 1 {
        reclaimed += amount;
      }
    }
    Ok(reclaimed)
  }

  /// One guarded grant: applied only if `used + n <= limit`, atomically on the server. Returns
  /// the number of holders of the slot after it, when it was applied.
  async fn try_grant(
    &self,
    id: &str,
    n: u64,
    limit: u64,
    holder: &str,
    expires_at: Millis,
  ) -> Result<Option<usize>, StoreError> {
    let filter = doc! { "_id": id, "used": { "$lte": int64(limit - n) } };
    let update = doc! {
      "$inc": { "used": int64(n), format!("holders.{holder}"): int64(n) },
      "$max": { format!("expires.{holder}"): expires_at },
    };
    self.count_op();
    let granted = self
      .leases
      .find_one_and_update(filter, update)
      .projection(doc! { "holders": 1 })
      .return_document(ReturnDocument::After)
      .await?;
    Ok(granted.map(|d| holders_with(&d, holder)))
  }

  /// Creates the document with a grant of `n` in it, when there is none: `Some(1)` (this is the
  /// only holder) when it did, `None` when the document exists (then nothing was changed).
  async fn try_create(
    &self,
    id: &str,
    slot: &LeaseSlot<'_>,
    n: u64,
    holder: &str,
    expires_at: Millis,
  ) -> Result<Option<usize>, StoreError> {
    // An insert, not an upsert: two racing inserts of one `_id` cannot both succeed, while
    // nx-27017 lets a racing upsert replace a document another just created.
    let lease = doc! {
      "_id": id,
      "apiKey": slot.api_key,
      "window": slot.window,
      "windowId": slot.window_id,
      "windowEnd": DateTime::from_millis(slot.window_end),
      "used": int64(n),
      "holders": { holder: int64(n) },
      "expires": { holder: expires_at },
    };
    self.count_op();
    match self.leases.insert_one(lease).await {
      Ok(_) => Ok(Some(1)),
      Err(e) if error_code(&e) == Some(DUPLICATE_KEY) => Ok(None),
      Err(e) => Err(e.into()),
    }
  }

  async fn read_lease(&self, id: &str) -> Result<Option<Document>, StoreError> {
    self.count_op();
    Ok(self.leases.find_one(doc! { "_id": id }).await?)
  }

  /// Takes `amount` (at most what is held) off the holder's share, and off `used` too when it goes
  /// back to the pool. Guarded by the holder's share, so no holder goes below 0.
  async fn give_back(
    &self,
    slot: &LeaseSlot<'_>,
    holder: &str,
    amount: u64,
    to_pool: bool,
  ) -> Result<u64, StoreError> {
    lease::check(slot, holder)?;
    let stored = self.naming.stored(slot.api_key);
    let slot = &LeaseSlot {
      api_key: &stored,
      ..*slot
    };
    let id = lease_id(slot);
    let holding = format!("holders.{holder}");
    let mut n = amount;
    for _ in 0..ATTEMPTS {
      if n == 0 {
        return Ok(0);
      }
      let mut inc = doc! { &holding: -int64(n) };
      if to_pool {
        inc.insert("used", -int64(n));
      }
      self.count_op();
      let done = self
        .leases
        .find_one_and_update(
          doc! { "_id": &id, &holding: { "$gte": int64(n) } },
          doc! { "$inc": inc },
        )
        .projection(doc! { "_id": 1 })
        .await?;
      if done.is_some() {
        return Ok(n);
      }
      let held = self.read_lease(&id).await?.and_then(|d| {
        d.get_document("holders")
          .ok()
          .and_then(|h| count(h.get(holder)))
      });
      n = amount.min(held.unwrap_or(0));
    }
    Ok(0)
  }
}

#[cfg(test)]
mod tests;
