//! Signed policy bundles: the policy files a fleet shares, signed once by
//! whoever publishes them (`interlock policy sign`) and accepted by an
//! agent only under a key its own configuration trusts.
//!
//! A bundle is a DSSE envelope (the in-toto / Sigstore signing envelope:
//! `{"payloadType", "payload", "signatures": [{"keyid", "sig"}]}`), so any
//! DSSE tool can inspect it; the signature is ed25519 over DSSE's
//! pre-authentication encoding of the payload, which is the manifest as
//! JSON. The format is small enough that a dependency would add more than
//! it saves.
use std::path::Path;

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::policy::BundleInfo;

pub const PAYLOAD_TYPE: &str = "application/vnd.interlock.policy-bundle+json";

/// Bundles over this size are refused before they are parsed.
pub const MAX_BUNDLE_BYTES: usize = 8 << 20;

/// Signatures an envelope may carry.
const MAX_SIGNATURES: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("not a signed policy bundle (a DSSE envelope): {0}")]
    Malformed(String),
    #[error("not signed by a trusted key (signed by {0})")]
    Untrusted(String),
    #[error("the signature does not match the bundle (altered after signing)")]
    BadSignature,
    #[error("{0}")]
    Key(String),
}

/// `ed25519:BASE64`: a public key in `trusted_keys`, and the key id of a
/// signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedKey {
    pub id: String,
    key: VerifyingKey,
}

impl TrustedKey {
    pub fn parse(text: &str) -> Result<Self, BundleError> {
        let bad = |why: &str| {
            BundleError::Key(format!(
                "{text:?} is not an ed25519:BASE64 public key: {why}"
            ))
        };
        let encoded = text
            .strip_prefix("ed25519:")
            .ok_or_else(|| bad("no ed25519: prefix"))?;
        let bytes: [u8; 32] = B64
            .decode(encoded)
            .map_err(|_| bad("not base64"))?
            .try_into()
            .map_err(|_| bad("not 32 bytes"))?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| bad("not a curve point"))?;
        Ok(Self {
            id: key_id(&key),
            key,
        })
    }
}

pub fn key_id(key: &VerifyingKey) -> String {
    format!("ed25519:{}", B64.encode(key.as_bytes()))
}

/// What is signed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The bundle format, 1.
    pub format: u32,
    /// What people call this bundle (a release name, a commit); recorded in
    /// every session started under it.
    pub version: String,
    /// Increases with every bundle: an agent never goes back to an older
    /// one (a replayed bundle stays refused).
    pub serial: u64,
    /// RFC 3339.
    pub signed_at: String,
    /// Policy files, as a `policy_dir` would hold them: `[[target]]`,
    /// `[[workload]]`, `[[rule]]`.
    pub files: Vec<BundleFile>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleFile {
    pub name: String,
    pub text: String,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    #[serde(rename = "payloadType")]
    payload_type: String,
    payload: String,
    signatures: Vec<EnvelopeSignature>,
}

#[derive(Serialize, Deserialize)]
struct EnvelopeSignature {
    keyid: String,
    sig: String,
}

/// A bundle whose signature was checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    pub manifest: Manifest,
    /// `sha256:HEX` of the signed payload.
    pub digest: String,
    /// The trusted key that signed it.
    pub signed_by: String,
}

impl Bundle {
    pub fn info(&self) -> BundleInfo {
        BundleInfo {
            version: self.manifest.version.clone(),
            serial: self.manifest.serial,
            digest: self.digest.clone(),
            signed_at: self.manifest.signed_at.clone(),
            signed_by: self.signed_by.clone(),
        }
    }
}

/// DSSE's pre-authentication encoding: what the signature covers.
fn pae(payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {PAYLOAD_TYPE} {} ",
        PAYLOAD_TYPE.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// The envelope of `manifest` signed with `key`, as written to the source.
pub fn sign(key: &SigningKey, manifest: &Manifest) -> Vec<u8> {
    let payload = serde_json::to_vec(manifest).expect("a manifest serializes");
    let signature = key.sign(&pae(&payload));
    let envelope = Envelope {
        payload_type: PAYLOAD_TYPE.into(),
        payload: B64.encode(&payload),
        signatures: vec![EnvelopeSignature {
            keyid: key_id(&key.verifying_key()),
            sig: B64.encode(signature.to_bytes()),
        }],
    };
    let mut out = serde_json::to_vec_pretty(&envelope).expect("an envelope serializes");
    out.push(b'\n');
    out
}

/// Checks an envelope's signature against `trusted` and reads its manifest.
/// Nothing of the payload is parsed before its signature is checked.
pub fn open(bytes: &[u8], trusted: &[TrustedKey]) -> Result<Bundle, BundleError> {
    if bytes.len() > MAX_BUNDLE_BYTES {
        return Err(BundleError::Malformed(format!(
            "{} bytes, over the {MAX_BUNDLE_BYTES}-byte limit",
            bytes.len()
        )));
    }
    let envelope: Envelope =
        serde_json::from_slice(bytes).map_err(|e| BundleError::Malformed(e.to_string()))?;
    if envelope.payload_type != PAYLOAD_TYPE {
        return Err(BundleError::Malformed(format!(
            "payloadType {:?}, not {PAYLOAD_TYPE:?}",
            envelope.payload_type
        )));
    }
    // Every trusted key is tried on every signature: a bound keeps a
    // bundle from costing more than a few verifications.
    if envelope.signatures.len() > MAX_SIGNATURES {
        return Err(BundleError::Malformed(format!(
            "{} signatures (at most {MAX_SIGNATURES})",
            envelope.signatures.len()
        )));
    }
    let payload = B64
        .decode(&envelope.payload)
        .map_err(|_| BundleError::Malformed("the payload is not base64".into()))?;
    let signed = pae(&payload);
    // One valid signature by a trusted key is enough. A `keyid` is only a
    // hint (DSSE's rule), so every trusted key is tried on every
    // signature; a signature whose keyid names a trusted key and that no
    // trusted key verifies means the bundle was altered.
    let mut altered = false;
    let mut verified = None;
    for signature in &envelope.signatures {
        let sig = B64
            .decode(&signature.sig)
            .ok()
            .and_then(|b| Signature::from_slice(&b).ok());
        verified = sig.and_then(|sig| {
            trusted
                .iter()
                .find(|key| key.key.verify_strict(&signed, &sig).is_ok())
        });
        if verified.is_some() {
            break;
        }
        altered |= trusted.iter().any(|key| key.id == signature.keyid);
    }
    let Some(signed_by) = verified.map(|key| key.id.clone()) else {
        if altered {
            return Err(BundleError::BadSignature);
        }
        let signers: Vec<&str> = envelope
            .signatures
            .iter()
            .map(|s| s.keyid.as_str())
            .collect();
        return Err(BundleError::Untrusted(if signers.is_empty() {
            "nobody".into()
        } else {
            signers.join(", ")
        }));
    };
    let manifest: Manifest = serde_json::from_slice(&payload)
        .map_err(|e| BundleError::Malformed(format!("manifest: {e}")))?;
    if manifest.format != 1 {
        return Err(BundleError::Malformed(format!(
            "format {} (this agent reads format 1)",
            manifest.format
        )));
    }
    check_version(&manifest.version).map_err(BundleError::Malformed)?;
    for (i, file) in manifest.files.iter().enumerate() {
        if !valid_name(&file.name) {
            return Err(BundleError::Malformed(format!(
                "file name {:?} (a plain NAME.toml)",
                file.name
            )));
        }
        if manifest.files[..i].iter().any(|f| f.name == file.name) {
            return Err(BundleError::Malformed(format!("{} twice", file.name)));
        }
    }
    Ok(Bundle {
        manifest,
        digest: format!("sha256:{}", hex::encode(Sha256::digest(&payload))),
        signed_by,
    })
}

/// A version is named in every session: short and printable.
fn check_version(version: &str) -> Result<(), String> {
    if version.is_empty() || version.len() > 128 || version.chars().any(char::is_control) {
        return Err(format!(
            "version {version:?} (1 to 128 printable characters)"
        ));
    }
    Ok(())
}

fn valid_name(name: &str) -> bool {
    name.ends_with(".toml")
        && name.len() > 5
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// The manifest of `paths` (files, or directories whose `*.toml` files are
/// taken in name order), as `interlock policy sign` bundles them.
pub fn manifest_of(
    paths: &[impl AsRef<Path>],
    version: String,
    serial: u64,
    signed_at: String,
) -> Result<Manifest, String> {
    let mut files: Vec<BundleFile> = Vec::new();
    for path in paths {
        let path = path.as_ref();
        let mut found = Vec::new();
        if path.is_dir() {
            let entries =
                std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))?;
            for entry in entries {
                let entry = entry.map_err(|e| format!("{}: {e}", path.display()))?;
                if entry.path().extension().is_some_and(|e| e == "toml") {
                    found.push(entry.path());
                }
            }
            found.sort();
        } else {
            found.push(path.to_owned());
        }
        for file in found {
            let name = file
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            if !valid_name(&name) {
                return Err(format!(
                    "{}: a bundle holds plain NAME.toml files",
                    file.display()
                ));
            }
            if files.iter().any(|f| f.name == name) {
                return Err(format!("{}: a second file named {name}", file.display()));
            }
            let text =
                std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            files.push(BundleFile { name, text });
        }
    }
    if files.is_empty() {
        return Err("no policy files to sign".into());
    }
    check_version(&version)?;
    Ok(Manifest {
        format: 1,
        version,
        serial,
        signed_at,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            format: 1,
            version: "v1".into(),
            serial: 7,
            signed_at: "2026-11-30T00:00:00Z".into(),
            files: vec![BundleFile {
                name: "10-ci.toml".into(),
                text: "[[rule]]\n".into(),
            }],
        }
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn trusted(seed: u8) -> TrustedKey {
        TrustedKey::parse(&key_id(&key(seed).verifying_key())).unwrap()
    }

    #[test]
    fn a_signed_bundle_opens_under_its_key_only() {
        let bytes = sign(&key(1), &manifest());
        let bundle = open(&bytes, &[trusted(2), trusted(1)]).unwrap();
        assert_eq!(bundle.manifest, manifest());
        assert_eq!(bundle.signed_by, trusted(1).id);
        assert!(bundle.digest.starts_with("sha256:"));
        assert!(matches!(
            open(&bytes, &[trusted(2)]),
            Err(BundleError::Untrusted(_))
        ));
    }

    #[test]
    fn an_altered_payload_or_signature_is_refused() {
        let bytes = sign(&key(1), &manifest());
        let mut envelope: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let mut altered = manifest();
        altered.files[0].text = "[[rule]]\nname = \"everything\"\n".into();
        envelope["payload"] = B64.encode(serde_json::to_vec(&altered).unwrap()).into();
        let tampered = serde_json::to_vec(&envelope).unwrap();
        assert!(matches!(
            open(&tampered, &[trusted(1)]),
            Err(BundleError::BadSignature)
        ));
        // A signature by another key under the trusted key's id.
        let other = sign(&key(3), &manifest());
        let other: serde_json::Value = serde_json::from_slice(&other).unwrap();
        let mut envelope: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        envelope["signatures"][0]["sig"] = other["signatures"][0]["sig"].clone();
        let forged = serde_json::to_vec(&envelope).unwrap();
        assert!(matches!(
            open(&forged, &[trusted(1)]),
            Err(BundleError::BadSignature)
        ));
    }

    #[test]
    fn a_keyid_is_a_hint_only() {
        let bytes = sign(&key(1), &manifest());
        let mut envelope: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        envelope["signatures"][0]["keyid"] = "".into();
        let unnamed = serde_json::to_vec(&envelope).unwrap();
        assert_eq!(
            open(&unnamed, &[trusted(1)]).unwrap().signed_by,
            trusted(1).id
        );
        assert!(matches!(
            open(&unnamed, &[trusted(2)]),
            Err(BundleError::Untrusted(_))
        ));
    }

    #[test]
    fn one_valid_trusted_signature_is_enough() {
        let bytes = sign(&key(1), &manifest());
        let mut envelope: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let good = envelope["signatures"][0].clone();
        let mut bad = good.clone();
        bad["sig"] = B64.encode([0u8; 64]).into();
        envelope["signatures"] = serde_json::json!([bad, good]);
        let both = serde_json::to_vec(&envelope).unwrap();
        assert_eq!(open(&both, &[trusted(1)]).unwrap().signed_by, trusted(1).id);
        envelope["signatures"] = serde_json::json!([]);
        let none = serde_json::to_vec(&envelope).unwrap();
        assert!(matches!(
            open(&none, &[trusted(1)]),
            Err(BundleError::Untrusted(who)) if who == "nobody"
        ));
    }

    #[test]
    fn malformed_envelopes_and_names_are_refused() {
        for bytes in [
            &b""[..],
            b"{}",
            b"[1]",
            b"{\"payloadType\":\"x\",\"payload\":\"\",\"signatures\":[]}",
        ] {
            assert!(matches!(
                open(bytes, &[trusted(1)]),
                Err(BundleError::Malformed(_))
            ));
        }
        let mut bad = manifest();
        bad.files[0].name = "../etc/passwd.toml".into();
        assert!(matches!(
            open(&sign(&key(1), &bad), &[trusted(1)]),
            Err(BundleError::Malformed(_))
        ));
        let mut bad = manifest();
        bad.version = "v1\n{\"forged\": true}".into();
        assert!(matches!(
            open(&sign(&key(1), &bad), &[trusted(1)]),
            Err(BundleError::Malformed(_))
        ));
        assert!(TrustedKey::parse("ed25519:AAAA").is_err());
        assert!(TrustedKey::parse("rsa:AAAA").is_err());
    }
}
