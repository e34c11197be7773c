//! Device identity: enrollment tokens, per-device Ed25519 keys, signed requests, freshness
//! and replay checks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fedpersona_proto::auth::{signing_message, NONCE_LEN, PUBLIC_KEY_LEN};
use fedpersona_proto::v1::DeviceAuth;
use ring::signature::{UnparsedPublicKey, ED25519};

use crate::error::{FedError, Kind};
use crate::store::Store;

/// How far a request's timestamp may be from the server's clock.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// A device whose request signature checked out.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub String);

impl std::fmt::Debug for DeviceId {
    // Device ids are identifiers of people's devices: never in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceId(..)")
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Verifies enrollments and signed requests.
#[derive(Debug)]
pub struct Authenticator {
    store: Arc<Store>,
    token_digests: Vec<[u8; 32]>,
    /// Request nonces seen within the freshness window, with their expiry (ms).
    recent: Mutex<HashMap<[u8; NONCE_LEN], i64>>,
}

impl Authenticator {
    pub fn new(store: Arc<Store>, token_digests: Vec<[u8; 32]>) -> Self {
        Authenticator {
            store,
            token_digests,
            recent: Mutex::new(HashMap::new()),
        }
    }

    /// Enrolls a public key with a valid token; enrolling the same key again returns its id.
    pub fn enroll(&self, token: &str, public_key: &[u8]) -> Result<DeviceId, FedError> {
        let digest = crate::config::token_digest(token);
        if !self.token_digests.iter().any(|d| d == &digest) {
            return Err(FedError::new(
                Kind::Denied,
                "bad_token",
                "enrollment token not accepted",
            ));
        }
        if public_key.len() != PUBLIC_KEY_LEN {
            return Err(FedError::invalid(
                "bad_key",
                format!("public key must be {PUBLIC_KEY_LEN} bytes (raw Ed25519)"),
            ));
        }
        if let Some((id, revoked)) = self.store.device_by_key(public_key)? {
            if revoked {
                return Err(FedError::new(Kind::Denied, "revoked", "device is revoked"));
            }
            return Ok(DeviceId(id));
        }
        let mut raw = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .map_err(|_| FedError::internal("enroll", "system random number generator failed"))?;
        let id = hex::encode(raw);
        if !self.store.enroll(&id, public_key, now_ms())? {
            // Raced with another enrollment of the same key.
            return self
                .store
                .device_by_key(public_key)?
                .map(|(id, _)| DeviceId(id))
                .ok_or_else(|| FedError::internal("enroll", "device vanished"));
        }
        Ok(DeviceId(id))
    }

    /// Checks a request's `DeviceAuth` against `body` (the request with `auth` unset).
    pub fn verify(
        &self,
        method: &str,
        auth: Option<&DeviceAuth>,
        body: &impl prost::Message,
    ) -> Result<DeviceId, FedError> {
        let unauth = |reason, msg: &str| FedError::new(Kind::Unauthenticated, reason, msg);
        let auth =
            auth.ok_or_else(|| unauth("no_auth", "request carries no device authentication"))?;
        let nonce: [u8; NONCE_LEN] = auth
            .nonce
            .as_slice()
            .try_into()
            .map_err(|_| unauth("bad_auth", "auth nonce must be 16 bytes"))?;
        let now = now_ms();
        let skew = MAX_CLOCK_SKEW.as_millis() as i64;
        let ts = i64::try_from(auth.timestamp_ms).unwrap_or(i64::MAX);
        if (ts - now).abs() > skew {
            return Err(unauth(
                "stale",
                "request timestamp is too far from the server clock",
            ));
        }
        if auth.device_id.len() != 32 || !auth.device_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(unauth("bad_auth", "malformed device id"));
        }
        let (key, revoked) = self
            .store
            .device(&auth.device_id)?
            .ok_or_else(|| unauth("unknown_device", "unknown device"))?;
        if revoked {
            return Err(FedError::new(Kind::Denied, "revoked", "device is revoked"));
        }
        let msg = signing_message(method, &auth.device_id, auth.timestamp_ms, &nonce, body);
        UnparsedPublicKey::new(&ED25519, &key)
            .verify(&msg, &auth.signature)
            .map_err(|_| unauth("bad_signature", "request signature does not verify"))?;
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() > 100_000 {
            recent.retain(|_, exp| *exp > now);
        }
        if recent.get(&nonce).is_some_and(|exp| *exp > now) {
            return Err(FedError::new(
                Kind::Duplicate,
                "replay",
                "request nonce was already used",
            ));
        }
        recent.insert(nonce, ts + skew);
        Ok(DeviceId(auth.device_id.clone()))
    }
}
