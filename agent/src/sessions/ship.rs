//! Shipping ended sessions to object storage (`object_store`: S3 and
//! S3-compatible stores, or a local directory), one zstd-compressed JSONL
//! object per session at `host=H/date=YYYY-MM-DD/ID.jsonl.zst`, so that
//! DuckDB or Athena can query the bucket as it is.
//!
//! The outbox tree is the queue: an entry leaves it only once its object is
//! stored, so a restart resumes where it stopped. An object's bytes depend
//! only on the session's lines, so shipping it twice (a crash between the
//! upload and the outbox update) rewrites the same object: no duplicate.
use std::{io::Write, path::PathBuf, sync::Arc, time::Duration};

use futures::StreamExt as _;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload, path::Path as ObjectPath};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::store::{Outbox, Store, StoreError, now_us};

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("shipper url {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("credentials_file {}: {why}", path.display())]
    Credentials { path: PathBuf, why: String },
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error(transparent)]
    Local(#[from] StoreError),
    #[error("compressing: {0}")]
    Compress(#[from] std::io::Error),
    #[error("{0} uploads failed")]
    Drain(u64),
}

/// `[shipper]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShipperSettings {
    /// `s3://bucket/prefix` or `file:///dir`.
    pub url: String,
    /// S3 endpoint for stores other than AWS (Garage, MinIO, Ceph RGW).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// TOML with `access_key_id` and `secret_access_key`, root-owned 0600;
    /// without it, the `AWS_*` environment variables.
    pub credentials_file: Option<PathBuf>,
    /// A running session ships what it has recorded so far this often.
    pub part_interval: Duration,
}

pub const DEFAULT_PART_INTERVAL: Duration = Duration::from_secs(300);

/// Where sessions go, or come from (`fleet pull`).
#[derive(Clone, Debug)]
pub struct Bucket {
    pub url: String,
    part_interval: Duration,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

impl Default for ShipperSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            endpoint: None,
            region: None,
            credentials_file: None,
            part_interval: DEFAULT_PART_INTERVAL,
        }
    }
}

impl Bucket {
    pub fn open(settings: &ShipperSettings) -> Result<Self, ShipError> {
        let url_error = |why: String| ShipError::Url {
            url: settings.url.clone(),
            why,
        };
        let parsed = url::Url::parse(&settings.url).map_err(|e| url_error(e.to_string()))?;
        match parsed.scheme() {
            "s3" => {
                let bucket = parsed
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| url_error("no bucket name".into()))?;
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    // Our outbox retries with its own backoff; a store that
                    // is down should fail a request quickly, not hold it.
                    .with_retry(object_store::RetryConfig {
                        backoff: object_store::BackoffConfig::default(),
                        max_retries: 2,
                        retry_timeout: Duration::from_secs(10),
                    })
                    .with_client_options(
                        object_store::ClientOptions::new()
                            .with_connect_timeout(Duration::from_secs(5))
                            .with_timeout(Duration::from_secs(60)),
                    );
                if let Some(endpoint) = &settings.endpoint {
                    builder = builder
                        .with_endpoint(endpoint)
                        .with_allow_http(endpoint.starts_with("http://"))
                        .with_virtual_hosted_style_request(false);
                }
                if let Some(region) = &settings.region {
                    builder = builder.with_region(region);
                }
                if let Some(path) = &settings.credentials_file {
                    let credentials = read_credentials(path)?;
                    builder = builder
                        .with_access_key_id(credentials.access_key_id)
                        .with_secret_access_key(credentials.secret_access_key);
                    if let Some(token) = credentials.session_token {
                        builder = builder.with_token(token);
                    }
                }
                Ok(Self {
                    url: settings.url.clone(),
                    part_interval: settings.part_interval,
                    store: Arc::new(builder.build()?),
                    prefix: ObjectPath::from(parsed.path().trim_matches('/')),
                })
            }
            "file" => {
                let dir = parsed
                    .to_file_path()
                    .map_err(|()| url_error("not a local path".into()))?;
                std::fs::create_dir_all(&dir).map_err(|e| url_error(e.to_string()))?;
                Ok(Self {
                    url: settings.url.clone(),
                    part_interval: settings.part_interval,
                    store: Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&dir)?),
                    prefix: ObjectPath::default(),
                })
            }
            other => Err(url_error(format!(
                "scheme {other:?} is not supported (use s3:// or file://)"
            ))),
        }
    }

    fn path(&self, tail: &str) -> ObjectPath {
        if self.prefix.as_ref().is_empty() {
            ObjectPath::from(tail)
        } else {
            ObjectPath::from(format!("{}/{tail}", self.prefix))
        }
    }

    /// `host=H/date=YYYY-MM-DD/ID.jsonl.zst`, dated by the session's start;
    /// `ID.partN.jsonl.zst` for part N of a running session.
    pub fn session_path(&self, host: &str, id: &ulid::Ulid, part: Option<u32>) -> ObjectPath {
        let start = std::time::UNIX_EPOCH + Duration::from_millis(id.timestamp_ms());
        let date = &humantime::format_rfc3339(start).to_string()[..10];
        let part = part.map(|n| format!(".part{n}")).unwrap_or_default();
        self.path(&format!("host={host}/date={date}/{id}{part}.jsonl.zst"))
    }

    pub fn key_path(&self, host: &str) -> ObjectPath {
        self.path(&format!("host={host}/host-key.json"))
    }

    pub async fn put(&self, path: &ObjectPath, bytes: Vec<u8>) -> Result<(), ShipError> {
        self.store.put(path, PutPayload::from(bytes)).await?;
        Ok(())
    }

    /// The object at `tail` under the prefix, read only up to `limit`
    /// bytes (`None` beyond: the object is too large).
    pub async fn get_tail(&self, tail: &str, limit: usize) -> Result<Option<Vec<u8>>, ShipError> {
        use futures::StreamExt as _;
        let mut body = self.store.get(&self.path(tail)).await?.into_stream();
        let mut bytes = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            if bytes.len() + chunk.len() > limit {
                return Ok(None);
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Some(bytes))
    }

    pub async fn get(&self, path: &ObjectPath) -> Result<bytes::Bytes, ShipError> {
        Ok(self.store.get(path).await?.bytes().await?)
    }

    /// Every session object under the prefix (or one host's), with its
    /// host, date and id read from the key.
    pub async fn list_sessions(&self, host: Option<&str>) -> Result<Vec<ObjectEntry>, ShipError> {
        let under = match host {
            Some(host) => self.path(&format!("host={host}")),
            None => self.prefix.clone(),
        };
        let mut listing = self.store.list(Some(&under));
        let mut out = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            if let Some(entry) = ObjectEntry::parse(&meta.location) {
                out.push(entry);
            }
        }
        out.sort_by_key(|e| e.id);
        Ok(out)
    }

    /// The public key a host published, hex.
    pub async fn host_key(&self, host: &str) -> Result<Option<String>, ShipError> {
        match self.get(&self.key_path(host)).await {
            Ok(bytes) => Ok(serde_json::from_slice::<HostKey>(&bytes)
                .ok()
                .map(|k| k.public_key)),
            Err(ShipError::Store(object_store::Error::NotFound { .. })) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A session object found in a bucket.
#[derive(Clone, Debug)]
pub struct ObjectEntry {
    pub path: ObjectPath,
    pub host: String,
    pub date: String,
    pub id: ulid::Ulid,
}

impl ObjectEntry {
    fn parse(path: &ObjectPath) -> Option<Self> {
        let parts: Vec<_> = path.parts().collect();
        let [.., host, date, file] = parts.as_slice() else {
            return None;
        };
        let host = host.as_ref().strip_prefix("host=")?;
        let date = date.as_ref().strip_prefix("date=")?;
        let id = file.as_ref().strip_suffix(".jsonl.zst")?;
        Some(Self {
            path: path.clone(),
            host: host.to_owned(),
            date: date.to_owned(),
            id: ulid::Ulid::from_string(id).ok()?,
        })
    }
}

/// `host=H/host-key.json`: what fleet operators verify a host's sessions
/// against.
#[derive(Serialize, Deserialize)]
pub struct HostKey {
    pub host: String,
    pub algorithm: String,
    pub public_key: String,
}

fn read_credentials(path: &std::path::Path) -> Result<CredentialsFile, ShipError> {
    use std::os::unix::fs::MetadataExt;
    let error = |why: String| ShipError::Credentials {
        path: path.to_owned(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| error(e.to_string()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(error(format!(
            "must be readable by its owner only (mode {:04o}); make it 0600",
            meta.mode() & 0o7777
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    toml::from_str(&text).map_err(|e| error(e.message().to_owned()))
}

/// A session's object: its lines, newline-terminated, zstd-compressed.
pub fn session_object(store: &Store, id: &ulid::Ulid) -> Result<Vec<u8>, ShipError> {
    compress(store.lines(id)?)
}

fn compress(lines: Vec<Vec<u8>>) -> Result<Vec<u8>, ShipError> {
    let mut encoder = zstd::Encoder::new(Vec::new(), 3)?;
    for line in lines {
        encoder.write_all(&line)?;
        encoder.write_all(b"\n")?;
    }
    Ok(encoder.finish()?)
}

/// Ships what running sessions recorded since their last part. A part is
/// not sealed (its session has not ended); the session's final object
/// holds every event again, sealed. Best effort: a failed part is tried
/// again next round, with everything since.
async fn ship_parts(store: &Arc<Store>, bucket: &Bucket, interval: Duration) {
    for (id, parts) in store.parts_due(interval) {
        let result = async {
            let (lines, next_seq) = store.lines_from(&id, parts.next_seq)?;
            if lines.is_empty() {
                return Ok(None);
            }
            let part = parts.part + 1;
            bucket
                .put(
                    &bucket.session_path(&store.host, &id, Some(part)),
                    compress(lines)?,
                )
                .await?;
            Ok::<_, ShipError>(Some((part, next_seq)))
        }
        .await;
        match result {
            Ok(Some((part, next_seq))) => store.part_shipped(&id, part, next_seq),
            Ok(None) => store.part_shipped(&id, parts.part, parts.next_seq),
            Err(error) => tracing::warn!(session = %id, %error, "shipping a part failed"),
        }
    }
}

/// Retry delays: 1 s doubling to 5 min, each taken at 50–100 % (jitter),
/// so hosts that lost the same store do not all come back at once.
fn backoff(attempts: u32) -> Duration {
    let full = Duration::from_secs(1)
        .saturating_mul(1 << attempts.min(9))
        .min(Duration::from_secs(300));
    full.mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// How long a session is kept locally once shipped.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Uploads in flight at once.
const CONCURRENCY: usize = 4;

/// Ships the outbox until `shutdown`, pruning shipped sessions after
/// `retention` (and sooner, oldest first, while the store is over quota).
pub async fn run(
    store: Arc<Store>,
    bucket: Option<Bucket>,
    retention: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let part_interval = bucket
        .as_ref()
        .map_or(DEFAULT_PART_INTERVAL, |b| b.part_interval);
    let Some(bucket) = bucket else {
        // Nowhere to ship: sessions stay local for `retention`.
        loop {
            if let Err(error) = prune_local(&store, retention) {
                tracing::warn!(%error, "pruning old sessions failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                _ = shutdown.changed() => return,
            }
        }
    };
    let mut key_published = false;
    let mut key_attempts = 0;
    let mut next_key_try = std::time::Instant::now();
    loop {
        if !key_published && std::time::Instant::now() >= next_key_try {
            let key = HostKey {
                host: store.host.clone(),
                algorithm: "ed25519".into(),
                public_key: store.public_key(),
            };
            let body = serde_json::to_vec_pretty(&key).expect("serializable");
            match bucket.put(&bucket.key_path(&store.host), body).await {
                Ok(()) => key_published = true,
                Err(error) => {
                    tracing::warn!(%error, "cannot publish the host key; retrying");
                    next_key_try = std::time::Instant::now() + backoff(key_attempts);
                    key_attempts += 1;
                }
            }
        }
        let next = ship_due(&store, &bucket).await.next;
        ship_parts(&store, &bucket, part_interval).await;
        if let Err(error) = prune(&store, retention) {
            tracing::warn!(%error, "pruning shipped sessions failed");
        }
        let wait = next
            .unwrap_or(Duration::from_secs(5))
            .min(Duration::from_secs(5))
            .min(part_interval);
        tokio::select! {
            _ = store.ship_wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Ships every due session.
async fn ship_due(store: &Arc<Store>, bucket: &Bucket) -> Round {
    let now = now_us() / 1000;
    let mut due = Vec::new();
    let mut next: Option<u64> = None;
    for entry in store.outbox.iter() {
        let Ok((key, value)) = entry else { continue };
        let outbox: Outbox = serde_json::from_slice(&value).unwrap_or_default();
        if outbox.next_ms <= now {
            let Ok(bytes) = <[u8; 16]>::try_from(key.as_ref()) else {
                continue;
            };
            due.push((ulid::Ulid(u128::from_be_bytes(bytes)), outbox));
        } else {
            next = Some(next.map_or(outbox.next_ms, |n| n.min(outbox.next_ms)));
        }
    }
    let results = futures::stream::iter(due)
        .map(|(id, outbox)| {
            let store = store.clone();
            async move {
                let result = ship_one(&store, bucket, &id).await;
                (id, outbox, result)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    let (mut shipped, mut bytes, mut failed) = (0, 0, 0);
    for (id, mut outbox, result) in results {
        let key = id.0.to_be_bytes();
        match result {
            Ok(size) => {
                shipped += 1;
                bytes += size;
                let _ = store.shipped.insert(key, &now_us().to_be_bytes());
                let _ = store.outbox.remove(key);
            }
            Err(error) => {
                failed += 1;
                let delay = backoff(outbox.attempts);
                outbox.attempts += 1;
                outbox.next_ms = now_us() / 1000 + delay.as_millis() as u64;
                outbox.last_error = Some(error.to_string());
                crate::metrics::get().shipping_errors.inc();
                tracing::warn!(session = %id, attempts = outbox.attempts, retry_in = ?delay, %error, "shipping failed");
                if let Ok(value) = serde_json::to_vec(&outbox) {
                    let _ = store.outbox.insert(key, value);
                }
            }
        }
    }
    if failed > 0 {
        next = Some(now_us() / 1000 + 1000);
    }
    Round {
        shipped,
        bytes,
        failed,
        next: next.map(|ms| Duration::from_millis(ms.saturating_sub(now_us() / 1000))),
    }
}

async fn ship_one(store: &Arc<Store>, bucket: &Bucket, id: &ulid::Ulid) -> Result<u64, ShipError> {
    let (from, id_copy) = (store.clone(), *id);
    let object = tokio::task::spawn_blocking(move || session_object(&from, &id_copy))
        .await
        .map_err(|e| ShipError::Compress(std::io::Error::other(e)))??;
    let path = bucket.session_path(&store.host, id, None);
    let size = object.len();
    bucket.put(&path, object).await?;
    tracing::debug!(session = %id, %path, size, "shipped");
    Ok(size as u64)
}

/// Ships until the outbox is empty (or an upload fails); returns the
/// sessions and compressed bytes shipped.
pub async fn drain(store: &Arc<Store>, bucket: &Bucket) -> Result<(u64, u64), ShipError> {
    let (mut sessions, mut bytes) = (0, 0);
    loop {
        let round = ship_due(store, bucket).await;
        if round.failed > 0 {
            return Err(ShipError::Drain(round.failed));
        }
        sessions += round.shipped;
        bytes += round.bytes;
        if store.outbox.is_empty() {
            return Ok((sessions, bytes));
        }
    }
}

/// What one pass over the outbox did.
struct Round {
    shipped: u64,
    bytes: u64,
    failed: u64,
    /// When the next entry is due.
    next: Option<Duration>,
}

/// Removes shipped sessions older than `retention`, and while the store is
/// over quota, the oldest shipped ones regardless.
fn prune(store: &Store, retention: Duration) -> Result<(), StoreError> {
    let cutoff = now_us().saturating_sub(retention.as_micros() as u64);
    let over_quota = store.used_bytes() >= store.max_bytes;
    for entry in store.shipped.iter() {
        let (key, value) = entry?;
        let shipped_at = <[u8; 8]>::try_from(value.as_ref()).map_or(0, u64::from_be_bytes);
        if shipped_at <= cutoff || over_quota {
            let Ok(bytes) = <[u8; 16]>::try_from(key.as_ref()) else {
                continue;
            };
            store.remove(&ulid::Ulid(u128::from_be_bytes(bytes)))?;
        }
    }
    Ok(())
}

/// Without a shipper: removes sessions that ended more than `retention` ago.
fn prune_local(store: &Store, retention: Duration) -> Result<(), StoreError> {
    let cutoff = now_us().saturating_sub(retention.as_micros() as u64);
    for entry in store.outbox.iter() {
        let (key, _) = entry?;
        let Ok(bytes) = <[u8; 16]>::try_from(key.as_ref()) else {
            continue;
        };
        let id = ulid::Ulid(u128::from_be_bytes(bytes));
        if store
            .summary(&id)
            .is_ok_and(|s| s.end_us.is_some_and(|end| end <= cutoff))
        {
            store.remove(&id)?;
            store.outbox.remove(key)?;
        }
    }
    Ok(())
}

/// The shipping backlog, for `interlock status`.
#[derive(Debug, Default, Serialize)]
pub struct Backlog {
    pub sessions: u64,
    pub bytes: u64,
    /// Seconds since the oldest waiting session ended.
    pub oldest_age_s: Option<u64>,
    pub last_error: Option<String>,
}

pub fn backlog(store: &Store) -> Result<Backlog, StoreError> {
    let mut backlog = Backlog::default();
    let now = now_us();
    for entry in store.outbox.iter() {
        let (key, value) = entry?;
        let Ok(bytes) = <[u8; 16]>::try_from(key.as_ref()) else {
            continue;
        };
        let id = ulid::Ulid(u128::from_be_bytes(bytes));
        backlog.sessions += 1;
        if let Ok(summary) = store.summary(&id) {
            backlog.bytes += summary.bytes;
            let ended = summary.end_us.unwrap_or(summary.start_us);
            let age = now.saturating_sub(ended) / 1_000_000;
            backlog.oldest_age_s = Some(backlog.oldest_age_s.map_or(age, |a| a.max(age)));
        }
        if let Ok(outbox) = serde_json::from_slice::<Outbox>(&value)
            && outbox.last_error.is_some()
        {
            backlog.last_error = outbox.last_error;
        }
    }
    Ok(backlog)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sessions::{Event, Summary, view::SessionLog};

    #[tokio::test]
    async fn ships_to_a_directory_then_prunes_after_retention() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            &dir.path().join("s"),
            &dir.path().join("k"),
            "host-a".into(),
            u64::MAX,
        )
        .unwrap();
        let id = ulid::Ulid::new();
        let workload = crate::workload::Workload::default();
        let summary = Summary {
            id: id.to_string(),
            outcome: "live".into(),
            ..Summary::default()
        };
        let start = Event::SessionStart {
            schema: crate::sessions::format::SCHEMA_VERSION,
            session_id: &id.to_string(),
            host: "host-a",
            protocol: "tcp",
            target: "t",
            client: "127.0.0.1:1".parse().unwrap(),
            orig_dst: "127.0.0.1:2".parse().unwrap(),
            workload: &workload,
            workloads: &[],
            record: crate::policy::RecordMode::Full,
            policy_bundle: None,
        };
        let (recorder, ticket) = store
            .begin(id, summary, &start, &Event::Output { data: b"hello" }, true)
            .unwrap();
        recorder.durable(ticket).await.unwrap();
        recorder.finish("closed", None, 1, 5);

        let bucket = Bucket::open(&ShipperSettings {
            url: format!("file://{}", dir.path().join("bucket").display()),
            ..ShipperSettings::default()
        })
        .unwrap();
        assert_eq!(drain(&store, &bucket).await.unwrap().0, 1);
        assert!(backlog(&store).unwrap().sessions == 0);
        let date = &humantime::format_rfc3339(std::time::SystemTime::now()).to_string()[..10];
        let object = dir
            .path()
            .join(format!("bucket/host=host-a/date={date}/{id}.jsonl.zst"));
        let log = SessionLog::parse(&zstd::decode_all(&*std::fs::read(&object).unwrap()).unwrap());
        assert_eq!(log.verify(Some(&store.public_key())).unwrap().events, 3);
        let listed = bucket.list_sessions(Some("host-a")).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, id);

        prune(&store, Duration::from_secs(3600)).unwrap();
        assert!(store.summary(&id).is_ok(), "kept while within retention");
        prune(&store, Duration::ZERO).unwrap();
        assert!(
            store.summary(&id).is_err(),
            "pruned once shipped and past retention"
        );
        assert_eq!(store.events.len(), 0);
    }
}
