//! The bytes a device signs for each request (see `DeviceAuth` in the contract), built the same
//! way on both sides.

use prost::Message;

/// Length of a request or upload nonce.
pub const NONCE_LEN: usize = 16;
/// Length of a raw Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;

/// `"fedpersona.v1\n" METHOD "\n" device_id "\n" timestamp_ms "\n" hex(nonce) "\n" hex(sha256(body))`
/// where `body` is the request with its `auth` field unset.
pub fn signing_message(
    method: &str,
    device_id: &str,
    timestamp_ms: u64,
    nonce: &[u8],
    body: &impl Message,
) -> Vec<u8> {
    let digest = ring::digest::digest(&ring::digest::SHA256, &body.encode_to_vec());
    format!(
        "fedpersona.v1\n{method}\n{device_id}\n{timestamp_ms}\n{}\n{}",
        hex::encode(nonce),
        hex::encode(digest.as_ref())
    )
    .into_bytes()
}

/// A device's Ed25519 identity, signing its requests.
pub struct Signer {
    device_id: String,
    key: ring::signature::Ed25519KeyPair,
    rng: ring::rand::SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

/// Errors of key handling.
#[derive(Debug)]
pub struct KeyError(pub &'static str);

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for KeyError {}

/// A new Ed25519 key pair as PKCS#8 bytes (keep them secret).
pub fn generate_key() -> Result<Vec<u8>, KeyError> {
    ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
        .map(|d| d.as_ref().to_vec())
        .map_err(|_| KeyError("system random number generator failed"))
}

/// The raw public key of a PKCS#8 Ed25519 key.
pub fn public_key(pkcs8: &[u8]) -> Result<Vec<u8>, KeyError> {
    use ring::signature::KeyPair;
    let key = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
        .map_err(|_| KeyError("not a PKCS#8 Ed25519 key"))?;
    Ok(key.public_key().as_ref().to_vec())
}

impl Signer {
    pub fn new(device_id: String, pkcs8: &[u8]) -> Result<Self, KeyError> {
        let key = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(|_| KeyError("not a PKCS#8 Ed25519 key"))?;
        Ok(Signer {
            device_id,
            key,
            rng: ring::rand::SystemRandom::new(),
        })
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// Fresh random bytes (request and upload nonces).
    pub fn nonce(&self) -> [u8; NONCE_LEN] {
        let mut n = [0u8; NONCE_LEN];
        ring::rand::SecureRandom::fill(&self.rng, &mut n)
            .expect("the system random number generator works");
        n
    }

    /// Ed25519 signature of `message` (a secure-aggregation key advert: peers check it).
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign(message).as_ref().to_vec()
    }

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> Vec<u8> {
        use ring::signature::KeyPair;
        self.key.public_key().as_ref().to_vec()
    }

    /// The `DeviceAuth` for `body` (the request with `auth` unset), timestamped now.
    pub fn auth(&self, method: &str, body: &impl Message) -> crate::v1::DeviceAuth {
        let timestamp_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.auth_at(method, body, timestamp_ms)
    }

    /// As [`Signer::auth`] with a given timestamp (tests of freshness checks).
    pub fn auth_at(
        &self,
        method: &str,
        body: &impl Message,
        timestamp_ms: u64,
    ) -> crate::v1::DeviceAuth {
        let nonce = self.nonce();
        let msg = signing_message(method, &self.device_id, timestamp_ms, &nonce, body);
        crate::v1::DeviceAuth {
            device_id: self.device_id.clone(),
            timestamp_ms,
            nonce: nonce.to_vec(),
            signature: self.key.sign(&msg).as_ref().to_vec(),
        }
    }
}

/// Whether `signature` is `public_key`'s Ed25519 signature of `message`.
pub fn verify(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
        .verify(message, signature)
        .is_ok()
}
