//! The daemon: wires interception, the proxy, reloads and the admin socket
//! together, and returns the addresses it actually bound (so tests and the
//! demo can run a whole agent in-process).
use std::{
    net::{IpAddr, ToSocketAddrs},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use interlock_common::RedirectConfig;
use serde_json::json;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    addr::ListenAddr,
    admin::{self, Request, Response},
    config::{CgroupSetting, Config, Mode, PolicySourceSettings},
    conn::{self, ConnRegistry},
    intercept::{AttachOptions, Interceptor, preflight},
    policy::{ActivePolicy, Policy, TargetAddress, TargetTable},
    policy_source::{self, Check, Source, SourceStatus},
    proxy::{self, ProxyContext},
    workload::{CgroupFs, WorkloadResolver},
};

/// Grace period for live connections at shutdown.
const DRAIN: Duration = Duration::from_secs(5);
/// How often config and policy files are checked for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// A started agent.
pub struct Agent {
    pub listen: Vec<ListenAddr>,
    pub admin_socket: PathBuf,
    shutdown: watch::Sender<bool>,
    proxy: JoinHandle<()>,
    state: Arc<State>,
}

/// What reloads, the admin socket and the proxy share.
struct State {
    config_path: Option<PathBuf>,
    /// The sources as the last reload (or the start) read them.
    loaded: parking_lot::Mutex<Fingerprint>,
    reloading: tokio::sync::Mutex<()>,
    config: ArcSwap<Config>,
    interceptor: Arc<Interceptor>,
    proxy: Arc<ProxyContext>,
    started: SystemTime,
    shutdown: watch::Sender<bool>,
    /// The last check of `[policy_source]`.
    source_status: parking_lot::Mutex<SourceStatus>,
}

impl Agent {
    /// Runs the pre-flight checks, attaches the kernel programs and starts
    /// serving. `config_path` is what reloads read again (None for a
    /// configuration that came from memory).
    pub async fn start(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<Self> {
        let (cgroups, cgroup_dir) = preflight(&config)?;
        let port = config.agent.listen_port;
        let started_boot_ns = crate::intercept::boot_time_ns();
        let bound = proxy::bind(port).await.with_context(|| {
            format!("binding the agent's listeners on 127.0.0.1:{port} and [::1]:{port}")
        })?;
        let (listeners, listen): (Vec<_>, Vec<_>) = bound.into_iter().unzip();

        let active = activate(&config).await;
        let interceptor = attach(&config, &cgroup_dir, started_boot_ns, &active)?;
        let files = StateFiles::open(&config)?;
        let bucket = config
            .shipper
            .as_ref()
            .map(crate::sessions::Bucket::open)
            .transpose()
            .context("[shipper]")?;
        let (approvals, callback) = start_approvals(&config, &files.store).await?;
        let store = files.store.clone();
        let exec_envs = Arc::new(crate::workload::ExecEnvs::default());
        let mut resolver =
            WorkloadResolver::new(cgroups).with_ci_runners(config.agent.ci_runners.clone());
        if let Some(ring) = interceptor.take_exec_ring() {
            tokio::spawn(crate::intercept::jobs::collect(ring, exec_envs.clone()));
            resolver = resolver.with_exec_envs(exec_envs);
        }
        let gate = conn::Gate {
            kernel: interceptor.clone(),
            resolver: Arc::new(resolver),
            active: ArcSwap::from_pointee(active),
            connections: ConnRegistry::default(),
            store: store.clone(),
            approvals,
        };
        let proxy_context = Arc::new(files.proxy_context(gate, &config));

        let (shutdown, shutdown_rx) = watch::channel(false);
        let admin_socket = config.agent.admin_socket.clone();
        let admins = config.agent.admins.clone();
        let state = Arc::new(State {
            config_path,
            loaded: parking_lot::Mutex::default(),
            reloading: tokio::sync::Mutex::default(),
            config: ArcSwap::from_pointee(config),
            interceptor: interceptor.clone(),
            proxy: proxy_context.clone(),
            started: SystemTime::now(),
            shutdown: shutdown.clone(),
            source_status: parking_lot::Mutex::default(),
        });

        if let Some(addr) = state.config.load().agent.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics listener on {addr}"))?;
            let metrics_state = Arc::downgrade(&state);
            tokio::spawn(crate::metrics::serve(listener, move || {
                if let Some(state) = metrics_state.upgrade() {
                    state.refresh_metrics();
                }
            }));
            tracing::info!(%addr, "metrics at /metrics");
        }
        let admin_listener = admin::bind(&admin_socket, &admins)
            .with_context(|| format!("binding the admin socket {}", admin_socket.display()))?;
        let admin_state = state.clone();
        let admin_task = tokio::spawn(admin::serve(
            admin_listener,
            admins,
            move |request, peer| {
                let state = admin_state.clone();
                async move { state.answer(request, peer).await }
            },
        ));

        let proxy = tokio::spawn({
            let shutdown_rx = shutdown_rx.clone();
            let admin_socket = admin_socket.clone();
            async move {
                proxy::serve(proxy_context, listeners, shutdown_rx, DRAIN).await;
                admin_task.abort();
                if let Some(callback) = callback {
                    callback.abort();
                }
                let _ = std::fs::remove_file(&admin_socket);
            }
        });
        tokio::spawn(crate::sessions::ship::run(
            store,
            bucket,
            state.config.load().sessions.retention,
            shutdown_rx.clone(),
        ));
        tokio::spawn(state.clone().watch_sources(shutdown_rx.clone()));
        tokio::spawn(state.clone().follow_policy_source(shutdown_rx.clone()));
        tokio::spawn(state.clone().re_resolve(shutdown_rx));

        Ok(Self {
            listen,
            admin_socket,
            shutdown,
            proxy,
            state,
        })
    }

    /// Reloads configuration and policy from disk, keeping the old ones on
    /// any error.
    pub async fn reload(&self) -> anyhow::Result<()> {
        self.state.reload().await
    }

    /// Serves until SIGTERM/SIGINT (or an admin `detach`), reloading on
    /// SIGHUP. Links stay pinned on exit: protected destinations keep being
    /// refused until an agent is back.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut stopped = self.shutdown.subscribe();
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = stopped.changed() => break,
                _ = hup.recv() => {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
                    // A failure is logged by the reload itself.
                    let _ = self.reload().await;
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
                }
            }
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        self.stop().await;
        Ok(())
    }

    /// Stops accepting, drains, and returns. Pins are left in place.
    pub async fn stop(self) {
        self.state.proxy.gate.approvals.abandon_all();
        let _ = self.shutdown.send(true);
        let _ = self.proxy.await;
        if let Err(error) = self.state.proxy.gate.store.flush() {
            tracing::error!(%error, "flushing the session store at exit");
        }
    }

    /// Detaches the kernel programs and removes every pin, then stops.
    pub async fn detach(self) -> anyhow::Result<()> {
        self.state.detach()?;
        self.stop().await;
        Ok(())
    }

    pub fn status(&self) -> serde_json::Value {
        self.state.status()
    }
}

/// Each source file with its mtime and size.
type Fingerprint = Vec<(PathBuf, Option<(SystemTime, u64)>)>;

impl State {
    async fn answer(&self, request: Request, peer: admin::Peer) -> Response {
        let approvals = &self.proxy.gate.approvals;
        let caller = crate::approvals::Caller::Local {
            uid: peer.uid,
            gid: peer.gid,
        };
        let result = match request {
            Request::ApprovalsList { all } if all && peer.admin => approvals
                .history()
                .map_err(anyhow::Error::from)
                .and_then(|list| Ok(serde_json::to_value(list)?)),
            Request::ApprovalsList { all } if all => Err(anyhow::anyhow!(
                "only admins may list every request on record"
            )),
            Request::ApprovalsList { .. } => Ok(serde_json::to_value(
                approvals.pending(&caller, peer.admin),
            )
            .unwrap_or_default()),
            Request::ApprovalAnswer {
                id,
                approve,
                reason,
            } => approvals
                .answer(&id, &caller, approve, reason)
                .map_err(anyhow::Error::from)
                .and_then(|record| Ok(serde_json::to_value(record)?)),
            Request::GrantsList { all } => {
                Ok(serde_json::to_value(approvals.grants(all)).unwrap_or_default())
            }
            Request::GrantRevoke { id, reason } => approvals
                .revoke(&id, &caller, peer.admin, reason)
                .map_err(anyhow::Error::from)
                .and_then(|grant| Ok(serde_json::to_value(grant)?)),
            Request::GrantAsk { wish, wait } => self.grant_request(wish, wait, &caller, peer).await,
            Request::Status => Ok(self.status()),
            Request::Reload => self.reload().await.map(|()| json!({"reloaded": true})),
            Request::Detach => self.detach().map(|()| {
                let _ = self.shutdown.send(true);
                json!({"detached": true})
            }),
            Request::SessionsList { filter } => {
                let store = self.proxy.gate.store.clone();
                tokio::task::spawn_blocking(move || {
                    let mut list = store.summaries(filter.since_ms)?;
                    list.retain(|s| filter.matches(s));
                    Ok(serde_json::to_value(list)?)
                })
                .await
                .unwrap_or_else(|e| Err(e.into()))
            }
            Request::SessionLog { id } => {
                let store = self.proxy.gate.store.clone();
                tokio::task::spawn_blocking(move || {
                    let id = crate::sessions::parse_id(&id)?;
                    let lines: Vec<String> = store
                        .lines(&id)?
                        .iter()
                        .map(|l| String::from_utf8_lossy(l).into_owned())
                        .collect();
                    Ok(json!({ "lines": lines }))
                })
                .await
                .unwrap_or_else(|e| Err(e.into()))
            }
        };
        match result {
            Ok(data) => Response::Ok { data },
            Err(error) => Response::Error {
                message: format!("{error:#}"),
            },
        }
    }

    /// `interlock request`: the asking process is identified from the
    /// kernel (SO_PEERCRED's pid), as a connection's caller is, so a job
    /// asks for its own workload and nobody else's.
    async fn grant_request(
        &self,
        wish: crate::approvals::ask::Wish,
        wait: bool,
        caller: &crate::approvals::Caller,
        peer: admin::Peer,
    ) -> anyhow::Result<serde_json::Value> {
        let gate = &self.proxy.gate;
        let pid = peer
            .pid
            .ok_or_else(|| anyhow::anyhow!("the asking process cannot be identified"))?;
        let workload = gate
            .resolver
            .resolve_pid(pid)
            .map_err(|e| anyhow::anyhow!("the asking process cannot be identified: {e}"))?;
        let active = gate.active.load_full();
        let ask =
            crate::approvals::ask::check(&active.policy, &workload, caller, peer.admin, wish)?;
        let (record, outcome) = gate.approvals.request_grant(ask).await?;
        let record = match wait {
            // The request times out on its own; its end always comes.
            true => outcome.await.unwrap_or(record),
            false => record,
        };
        Ok(serde_json::to_value(record)?)
    }

    async fn reload(&self) -> anyhow::Result<()> {
        let result = self.reload_once().await;
        // Logged here, whoever asked (the file watcher, SIGHUP, the CLI,
        // which also gets the error): one line per reload.
        if let Err(error) = &result {
            tracing::error!("reload failed, keeping the running policy: {error:#}");
        }
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        crate::metrics::get()
            .reloads
            .get_or_create(&crate::metrics::OutcomeLabels { outcome })
            .inc();
        result
    }

    async fn reload_once(&self) -> anyhow::Result<()> {
        let Some(path) = self.config_path.clone() else {
            anyhow::bail!(
                "this agent was started from an in-memory configuration; nothing to reload"
            );
        };
        // One reload at a time, and the watcher sees what this one read:
        // a change reloaded by SIGHUP or `interlock reload` is not
        // reloaded (and logged) again by the watcher.
        let _one = self.reloading.lock().await;
        *self.loaded.lock() = self.fingerprint();
        let config = tokio::task::spawn_blocking(move || Config::load(&path)).await??;
        let old = self.config.load();
        if restart_needed(&old, &config) {
            tracing::warn!(
                "[agent] settings other than mode changed; they take effect at the next restart"
            );
        }
        let active = activate(&config).await;
        self.apply(active)?;
        tracing::info!(
            targets = config.policy.targets.len(),
            rules = config.policy.rules.len(),
            mode = ?config.agent.mode,
            bundle = config.bundle.as_ref().map(|b| b.manifest.version.as_str()),
            "policy reloaded"
        );
        self.config.store(Arc::new(config));
        // The new configuration's files, as read: an added include is
        // taken as it is now, a dropped one is forgotten.
        let now = self.fingerprint();
        let mut loaded = self.loaded.lock();
        *loaded = now
            .into_iter()
            .map(|(path, meta)| {
                let read = loaded.iter().find(|(known, _)| *known == path);
                (path, read.map_or(meta, |(_, m)| *m))
            })
            .collect();
        Ok(())
    }

    /// Kernel targets first, then the proxy's policy. In the instant
    /// between, a newly protected destination is redirected but unknown to
    /// the proxy, which refuses it: the swap fails closed, never open.
    fn apply(&self, active: ActivePolicy) -> anyhow::Result<()> {
        self.interceptor.set_targets(&active.table.kernel_keys())?;
        self.proxy.gate.active.store(Arc::new(active));
        Ok(())
    }

    fn detach(&self) -> anyhow::Result<()> {
        self.interceptor.detach()?;
        tracing::info!("detached: programs, links and pins removed");
        Ok(())
    }

    fn status(&self) -> serde_json::Value {
        let config = self.config.load();
        let active = self.proxy.gate.active.load();
        let targets: Vec<_> = active
            .policy
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                json!({
                    "name": t.name,
                    "protocol": t.protocol,
                    "address": t.address.to_string(),
                    "destinations": active.table.destinations(crate::policy::TargetId(i)),
                })
            })
            .collect();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "mode": config.agent.mode,
            "config": self.config_path,
            "started": humantime::format_rfc3339_seconds(self.started).to_string(),
            "listen_port": config.agent.listen_port,
            "intercept": self.interceptor.status(),
            "targets": targets,
            "rules": active.policy.rules.len(),
            "policy_source": config.policy_source.as_ref().map(|source| {
                json!({
                    "url": policy_source::display_url(&source.url),
                    "interval_s": source.interval.as_secs(),
                    "bundle": config.bundle.as_ref().map(|b| b.info()),
                    "check": self.source_status.lock().clone(),
                })
            }),
            "accepted": self.proxy.gate.connections.accepted(),
            "connections": self.proxy.gate.connections.snapshot(),
            "sessions": self.sessions_status(&config),
            "approvals": {
                "pending": self.proxy.gate.approvals.pending_count(),
                "grants": self.proxy.gate.approvals.grants(false).len(),
                "webhook": config.approvals.webhook_url.as_ref().map(|u| u.as_str()),
                "callback": config.approvals.callback_listen.map(|a| a.to_string()),
            },
        })
    }

    /// Reads the gauges a scrape reports.
    fn refresh_metrics(&self) {
        let gauges = &crate::metrics::get().gauges;
        let gate = &self.proxy.gate;
        let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        gauges
            .approvals_pending
            .set(gate.approvals.pending_count() as i64);
        gauges
            .grants_active
            .set(gate.approvals.grants(false).len() as i64);
        let store = &gate.store;
        gauges.store_bytes.set(as_i64(store.used_bytes()));
        gauges.store_max_bytes.set(as_i64(store.max_bytes));
        gauges.store_admitting.set(i64::from(store.admit().is_ok()));
        if let Ok(backlog) = crate::sessions::ship::backlog(store) {
            gauges.backlog_sessions.set(as_i64(backlog.sessions));
            gauges.backlog_bytes.set(as_i64(backlog.bytes));
            gauges
                .backlog_oldest_seconds
                .set(as_i64(backlog.oldest_age_s.unwrap_or(0)));
        }
        let intercept = self.interceptor.status();
        gauges
            .protected_entries
            .set(intercept.protected_entries as i64);
        if let Some(pending) = intercept.pending_redirects {
            gauges.pending_redirects.set(pending as i64);
        }
        let attached = intercept
            .pinned_links
            .iter()
            .filter(|link| link.exists())
            .count();
        gauges.programs_attached.set(attached as i64);
        gauges
            .ci_job_capture
            .set(i64::from(intercept.ci_job_capture));
        gauges
            .live_connections
            .set(gate.connections.snapshot().len() as i64);
        let serial = self
            .config
            .load()
            .bundle
            .as_ref()
            .map_or(0, |b| b.manifest.serial);
        gauges.bundle_serial.set(as_i64(serial));
    }

    /// `sessions` of the status (schema: docs/OPERATIONS.md).
    fn sessions_status(&self, config: &Config) -> serde_json::Value {
        let store = &self.proxy.gate.store;
        let refusing = store.admit().err().map(|e| e.to_string());
        let (backlog, backlog_error) = match crate::sessions::ship::backlog(store) {
            Ok(backlog) => (serde_json::to_value(backlog).ok(), None),
            Err(error) => (None, Some(error.to_string())),
        };
        json!({
            "store": store.path(),
            "host": store.host,
            "public_key": store.public_key(),
            "used_bytes": store.used_bytes(),
            "max_store_bytes": store.max_bytes,
            "admitting": refusing.is_none(),
            "refusing": refusing,
            "shipper": config.shipper.as_ref().map(|s| &s.url),
            "backlog": backlog,
            "backlog_error": backlog_error,
        })
    }

    /// Reloads when any source file changes (mtime, size, or the policy
    /// directory's listing).
    async fn watch_sources(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Some(_) = &self.config_path else { return };
        *self.loaded.lock() = self.fingerprint();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
            // The lock is released before reloading (which takes it).
            let changed = self.fingerprint() != *self.loaded.lock();
            if changed {
                // Logged (and counted) by `reload`.
                let _ = self.reload().await;
            }
        }
    }

    fn fingerprint(&self) -> Fingerprint {
        let config = self.config.load();
        let mut paths = config.sources.clone();
        if let Some(path) = &self.config_path
            && !paths.contains(path)
        {
            paths.push(path.clone());
        }
        if let Some(dir) = &config.agent.policy_dir
            && let Ok(entries) = std::fs::read_dir(dir)
        {
            paths.extend(entries.filter_map(Result::ok).map(|e| e.path()));
        }
        paths.sort();
        paths.dedup();
        paths
            .into_iter()
            .map(|p| {
                let meta = std::fs::metadata(&p)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())));
                (p, meta)
            })
            .collect()
    }

    /// Checks `[policy_source]` at start and every `interval`; a bundle
    /// applied is reloaded like a changed file. The settings are read
    /// again each time, so a reload that changes them takes effect.
    async fn follow_policy_source(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Some(config_path) = self.config_path.clone() else {
            return;
        };
        let mut opened: Option<(PolicySourceSettings, Source)> = None;
        loop {
            let config = self.config.load_full();
            let interval = match &config.policy_source {
                None => WATCH_INTERVAL,
                Some(settings) => {
                    self.check_policy_source(&config, settings, &config_path, &mut opened)
                        .await;
                    settings.interval
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One check, with the source opened again when its settings changed.
    async fn check_policy_source(
        &self,
        config: &Config,
        settings: &PolicySourceSettings,
        config_path: &Path,
        opened: &mut Option<(PolicySourceSettings, Source)>,
    ) {
        if opened.as_ref().is_none_or(|(known, _)| known != settings) {
            *opened = match Source::open(settings, &config.agent.state_dir) {
                Ok(source) => Some((settings.clone(), source)),
                Err(why) => {
                    self.policy_source_checked(Check::Unreachable(why));
                    return;
                }
            };
        }
        let Some((_, source)) = opened.as_ref() else {
            return;
        };
        let check = policy_source::check(
            source,
            settings,
            config_path,
            config.bundle.as_ref(),
            &config.agent.state_dir,
        )
        .await;
        let applied = matches!(check, Check::Applied(_));
        self.policy_source_checked(check);
        if applied {
            // Logged (and counted) by `reload`.
            let _ = self.reload().await;
        }
    }

    fn policy_source_checked(&self, check: Check) {
        let url = self
            .config
            .load()
            .policy_source
            .as_ref()
            .map(|s| policy_source::display_url(&s.url))
            .unwrap_or_default();
        match &check {
            Check::Applied(info) => tracing::info!(
                %url,
                version = %info.version,
                serial = info.serial,
                digest = %info.digest,
                "policy bundle accepted"
            ),
            Check::Unchanged => {}
            Check::Refused(why) => {
                tracing::error!(%url, "policy bundle refused, keeping the running policy: {why}")
            }
            Check::Unreachable(why) => {
                tracing::warn!(%url, "policy source unreachable, keeping the running policy: {why}")
            }
        }
        crate::metrics::get()
            .bundle_checks
            .get_or_create(&crate::metrics::OutcomeLabels {
                outcome: check.outcome(),
            })
            .inc();
        self.source_status.lock().record(&check);
    }

    /// Host-name targets are resolved again every `resolve_interval`; the
    /// system resolver does not expose TTLs, so the interval stands in.
    async fn re_resolve(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let interval = self.config.load().agent.resolve_interval;
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.changed() => return,
            }
            let config = self.config.load_full();
            let has_hosts = config
                .policy
                .targets
                .iter()
                .any(|t| matches!(t.address, TargetAddress::Host(..)));
            if !has_hosts {
                continue;
            }
            let active = activate(&config).await;
            if active.table != self.proxy.gate.active.load().table
                && let Err(error) = self.apply(active)
            {
                tracing::error!("updating resolved targets failed: {error:#}");
            }
        }
    }
}

/// The pre-flight checks; the cgroup tree and the cgroup to attach to.
fn preflight(config: &Config) -> anyhow::Result<(CgroupFs, PathBuf)> {
    preflight::check_kernel()?;
    preflight::check_capabilities()?;
    let cgroups = CgroupFs::discover();
    let cgroup_dir = match &config.agent.cgroup {
        CgroupSetting::Auto => cgroups
            .as_ref()
            .map(|c| c.root().to_owned())
            .ok_or(preflight::PreflightError::NoCgroup2)?,
        CgroupSetting::Path(path) => path.clone(),
    };
    preflight::check_cgroup(cgroups.as_ref(), &cgroup_dir)?;
    let cgroups = cgroups.expect("checked above");
    preflight::ensure_bpffs()?;
    raise_fd_limit();
    Ok((cgroups, cgroup_dir))
}

/// Attaches the kernel programs to `cgroup_dir`, redirecting the policy's
/// protected destinations to the agent's port.
fn attach(
    config: &Config,
    cgroup_dir: &Path,
    started_boot_ns: u64,
    active: &ActivePolicy,
) -> anyhow::Result<Arc<Interceptor>> {
    let port = config.agent.listen_port;
    let interceptor = Interceptor::attach(AttachOptions {
        cgroup_dir: cgroup_dir.to_owned(),
        bpffs_dir: config.agent.bpffs_dir.clone(),
        redirect: RedirectConfig {
            listener_v4: [127, 0, 0, 1],
            listener_port: port,
            _pad: 0,
            listener_v6: std::net::Ipv6Addr::LOCALHOST.octets(),
            enabled: 1,
        },
        started_boot_ns,
        ci_runners: config.agent.ci_runners.clone(),
    })
    .with_context(|| {
        format!(
            "attaching the eBPF programs to cgroup {}",
            cgroup_dir.display()
        )
    })?;
    interceptor.set_targets(&active.table.kernel_keys())?;
    tracing::info!(cgroup = %cgroup_dir.display(), port, targets = active.policy.targets.len(), "interception attached");
    Ok(Arc::new(interceptor))
}

/// What the agent keeps in its state directory (0700): its local CA, the
/// masking key, its SSH host key and the session store.
struct StateFiles {
    local_ca: crate::tls::LocalCa,
    mask_key: crate::masking::MaskKey,
    ssh_host_key: russh::keys::PrivateKey,
    store: Arc<crate::sessions::Store>,
}

impl StateFiles {
    fn open(config: &Config) -> anyhow::Result<Self> {
        let state_dir = &config.agent.state_dir;
        let local_ca = crate::keyfile::open_private_dir(state_dir)
            .map_err(anyhow::Error::from)
            .and_then(|()| {
                let scope = crate::tls::CaScope::of(config);
                Ok(crate::tls::LocalCa::load_or_create(
                    &state_dir.join("ca"),
                    &scope,
                )?)
            })
            .with_context(|| format!("preparing the state directory {}", state_dir.display()))?;
        if local_ca.reissued() {
            tracing::warn!(
                "the local CA's certificate was issued again for the targets' names: run \
                 `interlock ca install` again on hosts that trust the old one"
            );
        }
        let mask_key_path = state_dir.join("mask.key");
        let mask_key = crate::masking::MaskKey::load_or_create(&mask_key_path)
            .with_context(|| format!("loading the masking key {}", mask_key_path.display()))?;
        let ssh_host_key = crate::proxy::ssh::load_or_create_host_key(state_dir)
            .context("loading the SSH host key")?;
        let store = crate::sessions::Store::open(
            &state_dir.join("sessions"),
            &state_dir.join("host.key"),
            crate::sessions::host_name(),
            config.sessions.max_store_bytes,
        )
        .context("opening the session store")?;
        Ok(Self {
            local_ca,
            mask_key,
            ssh_host_key,
            store,
        })
    }

    fn proxy_context(self, gate: conn::Gate, config: &Config) -> ProxyContext {
        ProxyContext {
            gate,
            tls: Some(Arc::new(self.local_ca)),
            mask_key: Arc::new(self.mask_key),
            literals: if config.agent.redact_literals {
                crate::proxy::postgres::Literals::Redact
            } else {
                crate::proxy::postgres::Literals::Keep
            },
            pg_cancels: Default::default(),
            pg: crate::proxy::postgres::Shared::new(&config.agent),
            ssh_server: crate::proxy::ssh::server_config(self.ssh_host_key),
        }
    }
}

/// The approval records (in the session store's database), their
/// webhook, and the HTTP callback when one is configured.
async fn start_approvals(
    config: &Config,
    store: &crate::sessions::Store,
) -> anyhow::Result<(Arc<crate::approvals::Approvals>, Option<JoinHandle<()>>)> {
    let notifier = crate::approvals::Notifier::start(&config.approvals)
        .map_err(anyhow::Error::msg)
        .context("[approvals] webhook")?;
    let approvals = crate::approvals::Approvals::open(store.db(), store.host.clone(), notifier)
        .context("opening the approval records")?;
    let callback = match (config.approvals.callback_listen, &config.approvals.token) {
        (Some(addr), Some(token)) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the approvals callback on {addr}"))?;
            tracing::info!(%addr, "approvals callback listening");
            Some(tokio::spawn(crate::approvals::callback::serve(
                listener,
                approvals.clone(),
                token.clone(),
            )))
        }
        _ => None,
    };
    Ok((approvals, callback))
}

/// Creates `state_dir` (0700) when it does not exist yet.
/// Each proxied connection holds two sockets; lift the soft limit to the
/// hard one so bursts are bounded by the host, not by a default of 1024.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(%error, soft, hard, "cannot raise the open-files limit");
    }
}

fn restart_needed(old: &Config, new: &Config) -> bool {
    let (a, b) = (&old.agent, &new.agent);
    a.state_dir != b.state_dir
        || a.admin_socket != b.admin_socket
        || a.admins != b.admins
        || a.cgroup != b.cgroup
        || a.listen_port != b.listen_port
        || a.bpffs_dir != b.bpffs_dir
        || a.redact_literals != b.redact_literals
        || a.access_log_statements != b.access_log_statements
        || a.metrics_listen != b.metrics_listen
        || a.max_statement_bytes != b.max_statement_bytes
        || a.startup_timeout != b.startup_timeout
        || old.sessions != new.sessions
        || old.shipper != new.shipper
        || old.approvals != new.approvals
}

/// Resolves host names (blocking, off the async threads) and builds the
/// policy the proxy decides with.
async fn activate(config: &Config) -> ActivePolicy {
    let policy = config.policy.clone();
    let enforce = config.agent.mode == Mode::Enforce;
    let bundle = config.bundle.as_ref().map(|b| b.info());
    tokio::task::spawn_blocking(move || {
        let table = resolve_table(&policy);
        ActivePolicy {
            policy,
            table,
            enforce,
            bundle,
        }
    })
    .await
    .expect("resolution task")
}

pub fn resolve_table(policy: &Policy) -> TargetTable {
    TargetTable::build(&policy.targets, |host, port| {
        match (host, port).to_socket_addrs() {
            Ok(addrs) => addrs.map(|a| a.ip()).collect::<Vec<IpAddr>>(),
            Err(error) => {
                tracing::warn!(host, %error, "cannot resolve target host; it is not protected until it resolves");
                Vec::new()
            }
        }
    })
}
