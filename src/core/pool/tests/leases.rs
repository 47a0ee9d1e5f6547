//! The pool's side of a shared quota.

use super::*;

#[test]
fn keys_out_of_service_need_no_leases_and_added_ones_share_too() {
  let (p, _, _) = pool(2);
  p.share_quota();
  p.admit(0, Admission::Disabled).unwrap();
  let added = p.add_key("AIzaSyTESTKEYLEASabcdefghijkl", None).unwrap();
  let needs: Vec<usize> = p.lease_needs().iter().map(|(i, _, _)| *i).collect();
  assert!(!needs.contains(&0), "{needs:?}");
  assert!(needs.contains(&1) && needs.contains(&added), "{needs:?}");
}
