//! Operators' decisions about keys (added, removed, disabled, enabled) on MongoDB, in
//! `api_key_admissions`: one document per key, so every process sharing the database follows the
//! same decisions. A key added at run time is stored sealed (see `sealing`), since the other
//! processes cannot know it otherwise; a configured key is stored by name only.
//!
//! Of two decisions about one key the later wins, whoever wrote first: a write replaces the
//! document only if it is older (a guarded upsert), so a slow writer cannot undo a newer decision.

use mongodb::bson::{doc, DateTime, Document};

use super::documents::millis;
use super::error::StoreError;
use super::mongo::{MongoStore, ADMISSIONS, DUPLICATE_KEY, READ_BATCH};
use crate::core::clock::Millis;
use crate::core::key::Admission;
use crate::core::snapshot::AdmissionRecord;

/// A decision as stored: the key by its stored name, and sealed when it was added at run time.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredAdmission {
  pub stored: String,
  #[serde(with = "admission_name")]
  pub admission: Admission,
  pub changed_at: Millis,
  pub added: bool,
  pub sealed: Option<String>,
  /// The key masked, for people reading the documents.
  pub masked: String,
  /// The project it was added in, when one was named (absent from older spill files).
  #[serde(default)]
  pub project: Option<String>,
}

/// An admission written by its name, in spill files.
mod admission_name {
  use serde::{Deserialize, Deserializer, Serializer};

  use crate::core::key::Admission;

  pub fn serialize<S: Serializer>(a: &Admission, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(a.as_str())
  }

  pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Admission, D::Error> {
    let name = String::deserialize(d)?;
    Admission::parse(&name).ok_or_else(|| serde::de::Error::custom(format!("admission {name:?}")))
  }
}

impl MongoStore {
  /// Writes decisions, each unless a later one about the same key is stored. One round trip.
  /// A key added at run time that cannot be sealed (no secret) is an error: it would be lost to
  /// every other process.
  pub async fn save_admissions(&self, records: &[AdmissionRecord]) -> Result<(), StoreError> {
    let stored = records
      .iter()
      .map(|r| self.naming.stored_admission(r))
      .collect::<Result<Vec<_>, _>>()?;
    self.save_stored_admissions(&stored).await
  }

  /// [`Self::save_admissions`] for decisions already in their stored form.
  pub async fn save_stored_admissions(&self, stored: &[StoredAdmission]) -> Result<(), StoreError> {
    if stored.is_empty() {
      return Ok(());
    }
    let updates: Vec<Document> = stored
      .iter()
      .map(|a| {
        let mut d = doc! {
          "apiKey": &a.stored,
          "admission": a.admission.as_str(),
          "changedAt": DateTime::from_millis(a.changed_at),
          // The guard compares this: some servers compare dates to the second only.
          "changedAtMs": a.changed_at,
          "maskedKey": &a.masked,
          "added": a.added,
        };
        if let Some(sealed) = &a.sealed {
          d.insert("sealedKey", sealed);
        }
        if let Some(project) = &a.project {
          d.insert("project", project);
        }
        doc! {
          "q": { "apiKey": &a.stored, "changedAtMs": { "$lt": a.changed_at } },
          "u": d,
          "upsert": true,
        }
      })
      .collect();
    self.count_op();
    let reply = self
      .db
      .run_command(doc! { "update": ADMISSIONS, "updates": updates, "ordered": false })
      .await?;
    // A statement whose guard failed tried to insert a second document for its key: the unique
    // index refused it, because a decision as late or later is there. That is the intended
    // outcome, not a failure.
    if let Ok(errors) = reply.get_array("writeErrors") {
      let others = errors
        .iter()
        .filter_map(|e| e.as_document())
        .find(|e| e.get_i32("code").ok() != Some(DUPLICATE_KEY));
      if let Some(e) = others {
        return Err(StoreError::Write {
          failed: errors.len(),
          first: e.get_str("errmsg").unwrap_or("no message").to_owned(),
        });
      }
    }
    if let Some(concern) = reply.get("writeConcernError") {
      return Err(StoreError::WriteConcern(concern.to_string()));
    }
    Ok(())
  }

  /// Every stored decision; documents that are not one (no name, an unknown admission) are
  /// skipped. One round trip for up to 10,000 keys.
  pub async fn load_admissions(&self) -> Result<Vec<StoredAdmission>, StoreError> {
    self.count_op();
    let mut cursor = self.admissions.find(doc! {}).batch_size(READ_BATCH).await?;
    let mut out = Vec::new();
    while cursor.advance().await? {
      let d: Document = cursor.deserialize_current()?;
      let (Ok(stored), Some(admission), Some(changed_at)) = (
        d.get_str("apiKey"),
        d.get_str("admission").ok().and_then(Admission::parse),
        millis(d.get("changedAtMs")).or_else(|| millis(d.get("changedAt"))),
      ) else {
        continue;
      };
      out.push(StoredAdmission {
        stored: stored.to_owned(),
        admission,
        changed_at,
        added: d.get_bool("added").unwrap_or(false),
        sealed: d.get_str("sealedKey").ok().map(str::to_owned),
        masked: d.get_str("maskedKey").unwrap_or_default().to_owned(),
        project: d.get_str("project").ok().map(str::to_owned),
      });
    }
    Ok(out)
  }
}

#[cfg(test)]
mod tests {
  use std::sync::Arc;

  use super::*;
  use crate::store::fingerprint::Fingerprinter;
  use crate::store::mongo::DEFAULT_CONNECT_TIMEOUT;
  use crate::store::naming::{KeyNaming, KeyStorage};
  use crate::store::test_server::TestServer;

  const ADDED: &str = "AIzaSyADDED0000000000000000000000000001";
  const CONFIGURED: &str = "AIzaSyCONF00000000000000000000000000002";

  async fn store(server: &TestServer, storage: KeyStorage) -> MongoStore {
    MongoStore::connect(&server.uri(), "gkm_admissions", DEFAULT_CONNECT_TIMEOUT)
      .await
      .expect("connect to the test server")
      .with_naming(Arc::new(KeyNaming::new(storage)))
  }

  fn record(key: &str, admission: Admission, changed_at: Millis, added: bool) -> AdmissionRecord {
    AdmissionRecord {
      api_key: key.into(),
      admission,
      changed_at,
      added,
      project: None,
    }
  }

  #[tokio::test]
  async fn the_later_decision_wins_and_added_keys_are_stored_sealed() {
    let server = TestServer::start();
    let secret = Fingerprinter::new(b"admissions test secret").unwrap();
    let s = store(&server, KeyStorage::Fingerprint(secret.clone())).await;
    s.save_admissions(&[
      record(ADDED, Admission::Enabled, 1_000, true),
      record(CONFIGURED, Admission::Disabled, 1_000, false),
    ])
    .await
    .unwrap();
    // An older decision about CONFIGURED, written late, does not undo the newer one; a newer one
    // about ADDED replaces its document.
    s.save_admissions(&[
      record(CONFIGURED, Admission::Enabled, 500, false),
      record(ADDED, Admission::Removed, 2_000, true),
    ])
    .await
    .unwrap();
    let mut stored = s.load_admissions().await.unwrap();
    stored.sort_by_key(|a| a.changed_at);
    assert_eq!(stored.len(), 2, "{stored:?}");
    let (configured, added) = (&stored[0], &stored[1]);
    assert_eq!(configured.stored, secret.fingerprint(CONFIGURED));
    assert_eq!(
      (configured.admission, configured.sealed.as_ref()),
      (Admission::Disabled, None)
    );
    assert_eq!(
      (added.admission, added.changed_at),
      (Admission::Removed, 2_000)
    );
    let naming = s.naming();
    assert_eq!(
      naming
        .recover(&added.stored, added.sealed.as_deref())
        .as_deref(),
      Some(ADDED)
    );
    // No document holds a key readable.
    let mut cursor = s.admissions.find(doc! {}).await.unwrap();
    while cursor.advance().await.unwrap() {
      let text = cursor.deserialize_current().unwrap().to_string();
      assert!(
        !text.contains(ADDED) && !text.contains(CONFIGURED),
        "{text}"
      );
      assert!(text.contains("AIzaSyAD...0001") || text.contains("AIzaSyCO...0002"));
    }
  }

  #[tokio::test]
  async fn without_a_secret_added_keys_cannot_be_stored_but_decisions_can() {
    let server = TestServer::start();
    let s = store(&server, KeyStorage::Digest).await;
    let refused = s
      .save_admissions(&[record(ADDED, Admission::Enabled, 1, true)])
      .await;
    assert!(
      matches!(refused, Err(StoreError::CannotSeal)),
      "{refused:?}"
    );
    s.save_admissions(&[record(CONFIGURED, Admission::Removed, 1, false)])
      .await
      .unwrap();
    let stored = s.load_admissions().await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(
      stored[0].stored,
      crate::store::fingerprint::digest_name(CONFIGURED)
    );
  }
}
