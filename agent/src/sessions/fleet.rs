//! `interlock fleet pull`: bring sessions of many hosts from a bucket into a
//! directory, each verified against the key its host publishes, and index
//! them for `sessions list --from DIR`.
//!
//! A host's key is pinned in `DIR/hosts/H.key` the first time it is seen;
//! a bucket that later publishes another key for that host is refused (the
//! bucket is where a forger would have to write both).
use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use futures::StreamExt as _;

use super::{
    Bucket, Summary,
    ship::ObjectEntry,
    view::{Filter, SessionLog},
};

pub struct PullOptions {
    pub host: Option<String>,
    pub filter: Filter,
    pub to: PathBuf,
    pub progress: bool,
}

#[derive(Debug, Default)]
pub struct PullReport {
    pub pulled: u64,
    /// Already in the directory with the same contents.
    pub unchanged: u64,
    /// Left out by `--workload` and the like.
    pub filtered: u64,
    pub bytes: u64,
    pub failed: Vec<(String, String)>,
}

/// Downloads at once.
const CONCURRENCY: usize = 8;

pub async fn pull(bucket: &Bucket, options: &PullOptions) -> anyhow::Result<PullReport> {
    let entries: Vec<ObjectEntry> = bucket
        .list_sessions(options.host.as_deref())
        .await
        .with_context(|| format!("listing {}", bucket.url))?
        .into_iter()
        .filter(|e| e.id.timestamp_ms() >= options.filter.since_ms)
        .collect();
    std::fs::create_dir_all(options.to.join("hosts"))
        .with_context(|| format!("creating {}", options.to.display()))?;

    // Each host's key: published in the bucket, pinned on first sight.
    let mut keys: HashMap<String, Result<String, String>> = HashMap::new();
    for entry in &entries {
        if keys.contains_key(&entry.host) {
            continue;
        }
        let key = match bucket.host_key(&entry.host).await? {
            None => Err(format!(
                "host {:?} publishes no key (host={}/host-key.json)",
                entry.host, entry.host
            )),
            Some(key) => pin(&options.to, &entry.host, &key),
        };
        keys.insert(entry.host.clone(), key);
    }

    let bar = if options.progress {
        indicatif::ProgressBar::new(entries.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} sessions {bytes_per_sec} {msg}",
        )
        .expect("a valid template"),
    );
    let mut report = PullReport::default();
    let mut summaries: BTreeMap<String, Summary> = read_index(&options.to);
    let mut downloads = futures::stream::iter(entries)
        .map(|entry| async move {
            let bytes = bucket.get(&entry.path).await;
            (entry, bytes)
        })
        .buffer_unordered(CONCURRENCY);
    while let Some((entry, bytes)) = downloads.next().await {
        bar.inc(1);
        let id = entry.id.to_string();
        let result = store_one(&entry, bytes, &keys, options);
        match result {
            Ok(Some((summary, written, bytes))) => {
                if written {
                    report.pulled += 1;
                    report.bytes += bytes;
                } else {
                    report.unchanged += 1;
                }
                summaries.insert(summary.id.clone(), summary);
            }
            Ok(None) => report.filtered += 1,
            Err(why) => {
                bar.println(format!("FAILED {}/{id}: {why}", entry.host));
                report.failed.push((format!("{}/{id}", entry.host), why));
            }
        }
    }
    bar.finish_and_clear();
    write_index(&options.to, &summaries)?;
    Ok(report)
}

/// One downloaded session: verified against its host's pinned key and
/// written under `options.to` if it matches the filter. `Ok(None)`: it
/// does not; `(summary, written, bytes)` otherwise.
fn store_one(
    entry: &ObjectEntry,
    bytes: Result<bytes::Bytes, impl std::fmt::Display>,
    keys: &HashMap<String, Result<String, String>>,
    options: &PullOptions,
) -> Result<Option<(Summary, bool, u64)>, String> {
    let id = entry.id.to_string();
    let key = keys[&entry.host].as_ref().map_err(Clone::clone)?;
    let bytes = bytes.map_err(|e| e.to_string())?;
    let text = zstd::decode_all(&*bytes).map_err(|e| format!("not zstd: {e}"))?;
    let log = SessionLog::parse(&text);
    let verified = log.verify(Some(key)).map_err(|e| e.to_string())?;
    if verified.session_id != id || verified.host != entry.host {
        return Err(format!(
            "stored as {}/{id} but sealed as {}/{}",
            entry.host, verified.host, verified.session_id
        ));
    }
    let summary = log.summary();
    if !options.filter.matches(&summary) {
        return Ok(None);
    }
    let dir = options
        .to
        .join(format!("host={}/date={}", entry.host, entry.date));
    let path = dir.join(format!("{id}.jsonl"));
    if std::fs::read(&path).is_ok_and(|old| old == text) {
        return Ok(Some((summary, false, 0)));
    }
    write_atomically(&dir, &path, &text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(Some((summary, true, bytes.len() as u64)))
}

/// The pinned key of `host`, pinning `published` the first time.
fn pin(dir: &Path, host: &str, published: &str) -> Result<String, String> {
    let path = dir.join("hosts").join(format!("{host}.key"));
    match std::fs::read_to_string(&path) {
        Ok(pinned) if pinned.trim().eq_ignore_ascii_case(published) => Ok(published.to_owned()),
        Ok(pinned) => Err(format!(
            "host {host:?} now publishes key {published}, but {} pins {} (remove the pin if the host's key was rotated)",
            path.display(),
            pinned.trim()
        )),
        Err(_) => {
            std::fs::write(&path, format!("{published}\n")).map_err(|e| e.to_string())?;
            Ok(published.to_owned())
        }
    }
}

fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn read_index(dir: &Path) -> BTreeMap<String, Summary> {
    std::fs::read_to_string(dir.join("index.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Summary>(l).ok())
        .map(|s| (s.id.clone(), s))
        .collect()
}

fn write_index(dir: &Path, summaries: &BTreeMap<String, Summary>) -> anyhow::Result<()> {
    let mut text = Vec::new();
    for summary in summaries.values() {
        serde_json::to_writer(&mut text, summary)?;
        text.push(b'\n');
    }
    write_atomically(dir, &dir.join("index.jsonl"), &text)
        .with_context(|| format!("writing {}/index.jsonl", dir.display()))
}
