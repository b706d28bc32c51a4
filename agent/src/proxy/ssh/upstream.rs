//! The agent's own SSH connection to the target: an exempted socket, the
//! server's key checked against what the configuration names (never
//! trusted on first use), then a login with the held credential.
use std::{sync::Arc, time::Duration};

use russh::{
    ChannelId, ChannelOpenFailure,
    client::{self, Session},
    keys::{HashAlg, PrivateKeyWithHashAlg, PublicKeyOrCertificate},
};

use crate::{
    addr::OrigDstAddr,
    policy::{HostKeyCheck, SshAuth, SshUpstream},
};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {dst}: {cause}")]
    Connect {
        dst: OrigDstAddr,
        cause: std::io::Error,
    },
    #[error(
        "the server's host key {fingerprint} is not the one configured for {host} ({expected})"
    )]
    HostKey {
        host: String,
        fingerprint: String,
        expected: String,
    },
    #[error("SSH with the server: {0}")]
    Protocol(String),
    #[error("the server refused the agent's credential for user {user:?}")]
    Login { user: String },
}

impl From<russh::Error> for UpstreamError {
    fn from(error: russh::Error) -> Self {
        UpstreamError::Protocol(error.to_string())
    }
}

pub type Upstream = client::Handle<ServerCheck>;

/// Connects, checks the server and logs in.
pub async fn connect(
    dst: OrigDstAddr,
    kernel: Arc<dyn crate::intercept::Interception>,
    host: String,
    settings: Arc<SshUpstream>,
) -> Result<Upstream, UpstreamError> {
    let stream = crate::proxy::tcp::connect_upstream(dst, &*kernel)
        .await
        .map_err(|cause| UpstreamError::Connect { dst, cause })?;
    let _ = stream.set_nodelay(true);
    let config = Arc::new(client::Config {
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        window_size: super::WINDOW_SIZE,
        channel_buffer_size: super::CHANNEL_BUFFER,
        nodelay: true,
        preferred: super::preferred(&[
            russh::cipher::AES_256_GCM,
            russh::cipher::AES_128_GCM,
            russh::cipher::CHACHA20_POLY1305,
            russh::cipher::AES_256_CTR,
            russh::cipher::AES_128_CTR,
        ]),
        ..Default::default()
    });
    let checker = ServerCheck {
        host: host.clone(),
        port: dst.0.port(),
        check: settings.host_key.clone(),
        mismatch: Arc::new(parking_lot::Mutex::new(None)),
    };
    let mismatch = checker.mismatch.clone();
    let mut handle = match client::connect_stream(config, stream, checker).await {
        Ok(handle) => handle,
        Err(error) => {
            return Err(mismatch.lock().take().unwrap_or(error));
        }
    };
    let user = settings.user.clone();
    let result = match &settings.auth {
        SshAuth::Key {
            key,
            certificate: Some(certificate),
        } => {
            handle
                .authenticate_openssh_cert(&user, key.clone(), (**certificate).clone())
                .await?
        }
        SshAuth::Key {
            key,
            certificate: None,
        } => {
            let hash = if key.algorithm().is_rsa() {
                handle
                    .best_supported_rsa_hash()
                    .await?
                    .flatten()
                    .or(Some(HashAlg::Sha256))
            } else {
                None
            };
            handle
                .authenticate_publickey(&user, PrivateKeyWithHashAlg::new(key.clone(), hash))
                .await?
        }
        SshAuth::Password(password) => {
            handle
                .authenticate_password(&user, password.expose())
                .await?
        }
    };
    if !result.success() {
        return Err(UpstreamError::Login { user });
    }
    Ok(handle)
}

/// The client side's handler: checks the server's key, and refuses every
/// channel the server would open towards us (forwarded ports, agent, X11:
/// nothing was asked for).
pub struct ServerCheck {
    host: String,
    port: u16,
    check: HostKeyCheck,
    /// Why the key was refused, to report it rather than russh's generic
    /// error.
    mismatch: Arc<parking_lot::Mutex<Option<UpstreamError>>>,
}

impl client::Handler for ServerCheck {
    type Error = UpstreamError;

    async fn check_server_key(
        &mut self,
        offered: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match offered {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            PublicKeyOrCertificate::Certificate(cert) => {
                russh::keys::PublicKey::from(cert.public_key().clone())
            }
        };
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let known = match &self.check {
            HostKeyCheck::Fingerprint(pinned) => Ok(*pinned == fingerprint),
            HostKeyCheck::KnownHosts(path) => {
                russh::keys::check_known_hosts_path(&self.host, self.port, &key, path)
                    .map_err(|e| e.to_string())
            }
        };
        if known == Ok(true) {
            return Ok(true);
        }
        let expected = match (&self.check, known) {
            (HostKeyCheck::Fingerprint(pinned), _) => format!("pinned {pinned}"),
            (HostKeyCheck::KnownHosts(path), Ok(_)) => {
                format!("no key for it in {}", path.display())
            }
            (HostKeyCheck::KnownHosts(path), Err(e)) => format!("{}: {e}", path.display()),
        };
        let error = UpstreamError::HostKey {
            host: self.host.clone(),
            fingerprint,
            expected,
        };
        tracing::error!(%error, "upstream host key refused");
        *self.mismatch.lock() = Some(error);
        Ok(false)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _connected_address: &str,
        _connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn channel_open_failure(
        &mut self,
        channel: ChannelId,
        reason: ChannelOpenFailure,
        description: &str,
        _language: &str,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        tracing::debug!(?channel, ?reason, description, "upstream refused a channel");
        Ok(())
    }
}
