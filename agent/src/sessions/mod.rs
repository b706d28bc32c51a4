//! Sessions: every intercepted connection recorded as a hash-chained,
//! signed log of events, stored locally first (sled, `store.rs`), shipped
//! to object storage after (`ship.rs`), pulled and verified by fleet
//! operators (`fleet.rs`). The format is `format.rs` and docs/SESSIONS.md.
pub mod bench;
mod event;
pub mod fleet;
pub mod format;
pub mod ship;
pub(crate) mod store;
pub mod view;

pub use event::{Event, StatementOutcome};
pub use ship::{Bucket, ShipperSettings};
pub use store::{Recorder, Store, StoreError, Summary, Ticket, TicketMark, now_us, parse_id};

/// `[sessions]`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SessionSettings {
    /// New sessions are refused while the store is this big.
    pub max_store_bytes: u64,
    /// How long shipped sessions stay in the local store.
    pub retention: std::time::Duration,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            max_store_bytes: 2 << 30,
            retention: ship::DEFAULT_RETENTION,
        }
    }
}

/// The host name sessions are filed under.
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}
