//! What callers read about keys.

use super::*;

#[test]
fn rotation_state_follows_the_round_robin_and_rotations() {
  let (p, clock, _) = pool(3);
  p.best(RESERVE, 0).unwrap();
  assert_eq!(p.rotation_state().unwrap(), (1, T0));
  clock.advance(7);
  p.rotate(RESERVE, 0).unwrap();
  assert_eq!(p.rotation_state().unwrap().1, T0 + 7);
  assert_eq!(p.statuses().unwrap().len(), 3);
}
