//! Where `interlock sessions` reads from: the running agent (admin socket),
//! its store directly when it is not running, a directory `fleet pull`
//! filled, or a bucket.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, bail};

use crate::{
    admin::{self, Request},
    sessions::{
        Bucket, ShipperSettings, Store, Summary, host_name,
        view::{Filter, SessionLog},
    },
};

pub enum Source {
    Agent(PathBuf),
    Store(Arc<Store>),
    Dir(PathBuf),
    Bucket(Bucket),
}

impl Source {
    /// `--from` when given (a directory or `s3://…`/`file://…`), else the
    /// agent at `socket`, else the store in `state_dir`.
    pub async fn open(
        from: Option<&str>,
        socket: &Path,
        state_dir: &Path,
        shipper: &ShipperSettings,
    ) -> anyhow::Result<Self> {
        if let Some(from) = from {
            if from.contains("://") {
                let settings = ShipperSettings {
                    url: from.to_owned(),
                    ..shipper.clone()
                };
                return Ok(Self::Bucket(Bucket::open(&settings)?));
            }
            return Ok(Self::Dir(PathBuf::from(from)));
        }
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            return Ok(Self::Agent(socket.to_owned()));
        }
        let dir = state_dir.join("sessions");
        if !dir.exists() {
            bail!(
                "no agent at {} and no session store at {}",
                socket.display(),
                dir.display()
            );
        }
        let store = Store::open_as_is(&dir, &state_dir.join("host.key"), host_name(), u64::MAX)
            .with_context(|| {
                format!(
                    "opening {} (is the agent running under another socket?)",
                    dir.display()
                )
            })?;
        Ok(Self::Store(store))
    }

    pub async fn list(&self, filter: &Filter) -> anyhow::Result<Vec<Summary>> {
        let mut summaries = match self {
            Self::Agent(socket) => {
                let data = admin::call(
                    socket,
                    &Request::SessionsList {
                        filter: filter.clone(),
                    },
                )
                .await?;
                serde_json::from_value(data)?
            }
            Self::Store(store) => store.summaries(filter.since_ms)?,
            Self::Dir(dir) => dir_summaries(dir)?,
            Self::Bucket(bucket) => {
                let mut out = Vec::new();
                for entry in bucket.list_sessions(None).await? {
                    if entry.id.timestamp_ms() < filter.since_ms {
                        continue;
                    }
                    out.push(
                        SessionLog::parse(&zstd::decode_all(&*bucket.get(&entry.path).await?)?)
                            .summary(),
                    );
                }
                out
            }
        };
        summaries.retain(|s| filter.matches(s));
        Ok(summaries)
    }

    pub async fn log(&self, id: &str) -> anyhow::Result<SessionLog> {
        match self {
            Self::Agent(socket) => {
                let data = admin::call(socket, &Request::SessionLog { id: id.to_owned() }).await?;
                let lines: Vec<String> = serde_json::from_value(data["lines"].clone())?;
                Ok(SessionLog {
                    lines: lines.into_iter().map(String::into_bytes).collect(),
                })
            }
            Self::Store(store) => {
                let id = crate::sessions::parse_id(id)?;
                Ok(SessionLog {
                    lines: store.lines(&id)?,
                })
            }
            Self::Dir(dir) => {
                let path = find_in_dir(dir, id)?
                    .with_context(|| format!("no session {id} under {}", dir.display()))?;
                Ok(SessionLog::parse(&std::fs::read(&path)?))
            }
            Self::Bucket(bucket) => {
                let wanted = crate::sessions::parse_id(id)?;
                let entry = bucket
                    .list_sessions(None)
                    .await?
                    .into_iter()
                    .find(|e| e.id == wanted)
                    .with_context(|| format!("no session {id} in {}", bucket.url))?;
                Ok(SessionLog::parse(&zstd::decode_all(
                    &*bucket.get(&entry.path).await?,
                )?))
            }
        }
    }
}

/// Session files of a pulled directory: `host=H/date=D/ID.jsonl`.
pub fn dir_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let read = |p: &Path| std::fs::read_dir(p).with_context(|| format!("reading {}", p.display()));
    for host in read(dir)? {
        let host = host?.path();
        if !host
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("host="))
        {
            continue;
        }
        for date in read(&host)? {
            let date = date?.path();
            if !date.is_dir() {
                continue;
            }
            for file in read(&date)? {
                let file = file?.path();
                if file.extension().is_some_and(|e| e == "jsonl") {
                    files.push(file);
                }
            }
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

fn find_in_dir(dir: &Path, id: &str) -> anyhow::Result<Option<PathBuf>> {
    let name = format!("{id}.jsonl");
    Ok(dir_files(dir)?
        .into_iter()
        .find(|f| f.file_name().is_some_and(|n| n.to_str() == Some(&name))))
}

/// The directory's index (written by `fleet pull`), or its files read.
fn dir_summaries(dir: &Path) -> anyhow::Result<Vec<Summary>> {
    let index = dir.join("index.jsonl");
    if let Ok(text) = std::fs::read_to_string(&index) {
        return text
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                serde_json::from_str(l).with_context(|| format!("{}: bad line", index.display()))
            })
            .collect();
    }
    dir_files(dir)?
        .iter()
        .map(|f| Ok(SessionLog::parse(&std::fs::read(f)?).summary()))
        .collect()
}
