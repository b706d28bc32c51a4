//! Learning least privilege from what workloads did (docs/LEARN.md).
//!
//! Recorded sessions are read back as [`Recorded`]: who called, which
//! target, and each thing the caller did with how it was decided.
//! [`suggest`] turns them into the narrowest rules that allow what ran,
//! each with its evidence; [`replay`] runs recorded sessions through a
//! candidate policy and says what it would have refused.
pub mod against;
mod recorded;
pub mod replay;
mod shapes;
pub mod suggest;

pub use recorded::{Did, Recorded};

#[cfg(test)]
mod tests;
