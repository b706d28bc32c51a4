//! The admin socket: a Unix socket speaking one JSON request and one JSON
//! response per line. Every caller is identified by SO_PEERCRED: only
//! `[agent] admins` may administer; anyone on the host may connect (0666)
//! to answer approval requests, and each answer is checked against the
//! rule's approvers.

use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::principal::{Principal, caller_matches};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    Reload,
    /// Remove programs, links and pins, then stop the agent.
    Detach,
    /// Recorded sessions matching a filter.
    SessionsList {
        filter: crate::sessions::view::Filter,
    },
    /// One session's lines (events and seal).
    SessionLog {
        id: String,
    },
    /// Pending approval requests the caller may answer (`all`: every
    /// request on record, for admins).
    ApprovalsList {
        #[serde(default)]
        all: bool,
    },
    /// Approves or denies a pending request.
    ApprovalAnswer {
        id: String,
        approve: bool,
        reason: Option<String>,
    },
    /// Active grants (`all`: expired and revoked ones too).
    GrantsList {
        #[serde(default)]
        all: bool,
    },
    GrantRevoke {
        id: String,
        reason: Option<String>,
    },
    /// Asks up front for a grant (`interlock request`), for the calling
    /// process's workload or a named one; `wait`: answer with the outcome.
    GrantAsk {
        wish: crate::approvals::ask::Wish,
        #[serde(default)]
        wait: bool,
    },
}

impl Request {
    /// Requests anyone may make: approvers answer (the agent authorizes
    /// each answer against the rule's approvers), workloads ask for grants
    /// (checked against the policy's requestable rules).
    fn for_anyone(&self) -> bool {
        matches!(
            self,
            Request::ApprovalsList { .. }
                | Request::ApprovalAnswer { .. }
                | Request::GrantsList { .. }
                | Request::GrantRevoke { .. }
                | Request::GrantAsk { .. }
        )
    }
}

/// Who sent a request, from SO_PEERCRED.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    /// The process that connected (absent in a few kernels' namespaces).
    pub pid: Option<u32>,
    pub admin: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Ok { data: serde_json::Value },
    Error { message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot reach the agent at {}: {cause} (is it running? see `systemctl status interlock`)", path.display())]
    Connect { path: PathBuf, cause: io::Error },
    #[error("admin socket {}: {cause}", path.display())]
    Io { path: PathBuf, cause: io::Error },
    #[error("the agent answered with something unreadable: {0}")]
    Protocol(serde_json::Error),
    #[error("{0}")]
    Refused(String),
}

/// Serves requests with `handler` until the task is dropped.
pub async fn serve<F, Fut>(listener: UnixListener, admins: Vec<Principal>, handler: F)
where
    F: Fn(Request, Peer) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response> + Send,
{
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // EMFILE and friends: back off instead of spinning.
            Err(error) => {
                tracing::warn!(%error, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = handler.clone();
        let admins = admins.clone();
        tokio::spawn(async move {
            if let Err(error) = serve_one(stream, &admins, handler).await {
                tracing::debug!(%error, "admin connection ended with an error");
            }
        });
    }
}

/// Longest request line accepted; requests are tiny, so anything longer is
/// refused rather than buffered.
const MAX_REQUEST: u64 = 64 * 1024;

async fn serve_one<F, Fut>(stream: UnixStream, admins: &[Principal], handler: F) -> io::Result<()>
where
    F: Fn(Request, Peer) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let cred = stream.peer_cred()?;
    let peer = Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid().and_then(|p| u32::try_from(p).ok()),
        admin: caller_matches(cred.uid(), cred.gid(), admins),
    };
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        // Bytes, not `lines()`: a request that is not UTF-8 gets an error
        // reply like any other bad request instead of ending the connection.
        let n = (&mut reader)
            .take(MAX_REQUEST)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let too_long = !line.ends_with(b"\n") && n as u64 == MAX_REQUEST;
        let request = match serde_json::from_slice::<Request>(&line) {
            _ if too_long => Err(format!("bad request: longer than {MAX_REQUEST} bytes")),
            Ok(request) => Ok(request),
            Err(error) => Err(format!("bad request: {error}")),
        };
        let response = match request {
            Ok(request) if peer.admin || request.for_anyone() => {
                tracing::info!(uid = peer.uid, ?request, "admin request");
                handler(request, peer).await
            }
            Ok(_) => {
                tracing::warn!(uid = peer.uid, pid = ?cred.pid(), "admin request refused: caller is not an admin");
                Response::Error {
                    message: format!(
                        "uid {} is not allowed to administer this agent (see [agent] admins)",
                        peer.uid
                    ),
                }
            }
            Err(message) => Response::Error { message },
        };
        let mut out = serde_json::to_vec(&response).unwrap_or_default();
        out.push(b'\n');
        write.write_all(&out).await?;
        if too_long {
            return Ok(());
        }
    }
}

/// Binds the admin socket, replacing a stale one, with mode 0666: approvers
/// need not be admins, and the agent checks every caller itself. Its group
/// is the first `group:` admin that exists.
pub fn bind(path: &Path, admins: &[Principal]) -> io::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    let group = admins.iter().find_map(|p| match p {
        Principal::Group(name) => nix::unistd::Group::from_name(name).ok().flatten(),
        _ => None,
    });
    if let Some(group) = group {
        nix::unistd::chown(path, None, Some(group.gid)).map_err(io::Error::from)?;
    }
    Ok(listener)
}

/// Sends one request to a running agent.
pub async fn call(path: &Path, request: &Request) -> Result<serde_json::Value, AdminError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|cause| AdminError::Connect {
            path: path.to_owned(),
            cause,
        })?;
    let io_err = |cause| AdminError::Io {
        path: path.to_owned(),
        cause,
    };
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).map_err(AdminError::Protocol)?;
    line.push(b'\n');
    write.write_all(&line).await.map_err(io_err)?;
    let mut reply = String::new();
    BufReader::new(read)
        .read_line(&mut reply)
        .await
        .map_err(io_err)?;
    match serde_json::from_str(&reply).map_err(AdminError::Protocol)? {
        Response::Ok { data } => Ok(data),
        Response::Error { message } => Err(AdminError::Refused(message)),
    }
}
