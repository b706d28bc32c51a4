//! Cancel requests for held statements. A client cancels (psql's Ctrl-C)
//! on a new connection naming its backend's key; when the statement is
//! held for approval rather than running upstream, the session waiting
//! under that key is woken so it withdraws the request.
use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use parking_lot::Mutex;

use tokio::sync::Notify;

/// Sessions by the backend key their client was given.
#[derive(Default)]
pub struct CancelKeys(Mutex<HashMap<(i32, i32), Arc<CancelSignal>>>);

/// How a cancel reaches a session: woken while it holds a statement.
#[derive(Default)]
pub struct CancelSignal {
    pub notify: Notify,
    /// Set while a statement is held (nothing of it runs upstream).
    pub holding: AtomicBool,
}

impl CancelKeys {
    /// Registers a session's key for as long as the guard lives.
    pub fn register(&self, pid: i32, key: i32) -> CancelGuard<'_> {
        let signal = Arc::new(CancelSignal::default());
        self.0.lock().insert((pid, key), signal.clone());
        CancelGuard {
            keys: self,
            id: (pid, key),
            signal,
        }
    }

    /// Wakes the session under this key if it is waiting on a hold, and
    /// says so (then the cancel is not for the server: relaying it could
    /// cancel the refusal the session sends instead). A cancel that comes
    /// while nothing is held wakes nothing later.
    pub fn cancel(&self, pid: i32, key: i32) -> bool {
        match self.0.lock().get(&(pid, key)) {
            Some(signal) if signal.holding.load(Ordering::SeqCst) => {
                signal.notify.notify_waiters();
                true
            }
            _ => false,
        }
    }
}

pub struct CancelGuard<'a> {
    keys: &'a CancelKeys,
    id: (i32, i32),
    pub signal: Arc<CancelSignal>,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        self.keys.0.lock().remove(&self.id);
    }
}

/// The backend key in a BackendKeyData ('K') message.
pub fn backend_key(frame: &super::wire::Frame) -> Option<(i32, i32)> {
    let body = frame.body();
    (frame.tag == b'K' && body.len() >= 8).then(|| {
        (
            i32::from_be_bytes(body[0..4].try_into().expect("4 bytes")),
            i32::from_be_bytes(body[4..8].try_into().expect("4 bytes")),
        )
    })
}
