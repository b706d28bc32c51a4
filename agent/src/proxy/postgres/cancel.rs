//! Cancel requests for held statements. A client cancels (psql's Ctrl-C)
//! on a new connection naming its backend's key; when the statement is
//! held for approval rather than running upstream, the session waiting
//! under that key is woken so it withdraws the request.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::Notify;

/// Sessions by the backend key their client was given.
#[derive(Default)]
pub struct CancelKeys(Mutex<HashMap<(i32, i32), Arc<Notify>>>);

impl CancelKeys {
    /// Registers a session's key for as long as the guard lives.
    pub fn register(&self, pid: i32, key: i32) -> CancelGuard<'_> {
        let notify = Arc::new(Notify::new());
        self.0
            .lock()
            .expect("not poisoned")
            .insert((pid, key), notify.clone());
        CancelGuard {
            keys: self,
            id: (pid, key),
            notify,
        }
    }

    /// Wakes the session under this key if it is waiting on a hold; a
    /// cancel that comes while nothing is held wakes nothing later.
    pub fn cancel(&self, pid: i32, key: i32) {
        if let Some(notify) = self.0.lock().expect("not poisoned").get(&(pid, key)) {
            notify.notify_waiters();
        }
    }
}

pub struct CancelGuard<'a> {
    keys: &'a CancelKeys,
    id: (i32, i32),
    pub notify: Arc<Notify>,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        self.keys.0.lock().expect("not poisoned").remove(&self.id);
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
