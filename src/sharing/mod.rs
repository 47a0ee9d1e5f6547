//! One quota across processes: the part of each budget this process holds ([`share`], plain state
//! the pool reads under its lock) and the task that keeps it leased from the store ([`leasing`]).
//! The grants themselves, and their guarantee, are the store's (`store::lease`).

pub mod leasing;
pub mod share;
