//! The messages exchanged in a round, as plain structs for the transport to
//! convert. `Debug` never prints secret material.

use std::fmt;

use zeroize::Zeroize;

use super::params::Params;
use super::secret::RevealKind;

/// Domain string for [`advert_signing_bytes`].
const ADVERT_DOMAIN: &[u8] = b"fedpersona/secagg/v1/key-advert";

/// A client's two public keys for one round, with the index the server gave
/// it (meaningless before the advertise phase closes).
#[derive(Clone, PartialEq, Eq)]
pub struct KeyAdvert {
    /// The client's index in `0..n`.
    pub index: u32,
    /// X25519 public key for encrypting key shares.
    pub c_pk: [u8; 32],
    /// X25519 public key for pairwise mask agreement.
    pub s_pk: [u8; 32],
}

impl fmt::Debug for KeyAdvert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyAdvert")
            .field("index", &self.index)
            .field("c_pk", &Hex(&self.c_pk[..4]))
            .field("s_pk", &Hex(&self.s_pk[..4]))
            .finish()
    }
}

/// The exact bytes a client signs (with its long-term identity key, which
/// this module does not handle) to vouch for its adverts in `round`.
/// Neighbours must verify that signature before calling
/// [`Client::share_keys`](super::Client::share_keys): without it the server
/// could substitute its own keys and read the shares.
///
/// Layout: domain string, `round` as 8 bytes big-endian, `c_pk`, `s_pk`.
pub fn advert_signing_bytes(round: u64, c_pk: &[u8; 32], s_pk: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ADVERT_DOMAIN.len() + 8 + 64);
    out.extend_from_slice(ADVERT_DOMAIN);
    out.extend_from_slice(&round.to_be_bytes());
    out.extend_from_slice(c_pk);
    out.extend_from_slice(s_pk);
    out
}

/// What the server tells one participant when the advertise phase closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The participant's index in `0..params.clients`.
    pub index: u32,
    /// The round's parameters (re-validated by the client).
    pub params: Params,
    /// Length of the input vector, in `u32` words.
    pub vector_len: u32,
    /// The participant's own advert as the server recorded it, so the client
    /// can check that the server and transport did not mix participants up.
    pub own: KeyAdvert,
    /// The adverts of `params.neighbours_of(index)`, in that (sorted) order.
    pub neighbours: Vec<KeyAdvert>,
}

/// One client's shares of its two secrets for one neighbour, encrypted to
/// that neighbour.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptedShare {
    /// The index of the client whose secrets are shared.
    pub from: u32,
    /// The index of the neighbour that can decrypt it.
    pub to: u32,
    /// `nonce (12 bytes) || ciphertext || tag (16 bytes)`.
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for EncryptedShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptedShare")
            .field("from", &self.from)
            .field("to", &self.to)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}

/// Who the server heard from in the masked-input phase.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Survivors {
    /// Sorted indices whose masked input arrived (U3).
    pub survivors: Vec<u32>,
    /// Sorted indices that took part in the share phase (U2) but sent no
    /// masked input.
    pub dropped: Vec<u32>,
}

/// A share revealed to the server in the unmask phase. The share is secret
/// until `t` of them are pooled; `Debug` prints only its length, and
/// [`Zeroize`] lets the caller wipe it once serialised.
#[derive(Clone, PartialEq, Eq)]
pub struct Reveal {
    /// The neighbour revealing the share.
    pub from: u32,
    /// The client whose secret it is a share of.
    pub about: u32,
    /// Which of that client's secrets.
    pub kind: RevealKind,
    /// The share: x-coordinate byte followed by 32 bytes.
    pub share: Vec<u8>,
}

impl fmt::Debug for Reveal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reveal")
            .field("from", &self.from)
            .field("about", &self.about)
            .field("kind", &self.kind)
            .field("share_len", &self.share.len())
            .finish()
    }
}

impl Zeroize for Reveal {
    fn zeroize(&mut self) {
        self.share.zeroize();
    }
}

/// The result of a round.
#[derive(Clone, PartialEq, Eq)]
pub struct Aggregate {
    /// The wrapping sum (mod 2^32) of the contributors' inputs.
    pub sum: Vec<u32>,
    /// Sorted indices whose inputs are in `sum` (U3).
    pub contributors: Vec<u32>,
}

impl fmt::Debug for Aggregate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Aggregate")
            .field("sum_len", &self.sum.len())
            .field("contributors", &self.contributors)
            .finish()
    }
}

/// Lower-case hex of a few public bytes, for `Debug`.
struct Hex<'a>(&'a [u8]);

impl fmt::Debug for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        f.write_str("..")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signing_bytes_are_domain_separated_and_bind_everything() {
        let a = advert_signing_bytes(7, &[1; 32], &[2; 32]);
        assert!(a.starts_with(ADVERT_DOMAIN));
        assert_eq!(a.len(), ADVERT_DOMAIN.len() + 8 + 64);
        assert_ne!(a, advert_signing_bytes(8, &[1; 32], &[2; 32]));
        assert_ne!(a, advert_signing_bytes(7, &[2; 32], &[1; 32]));
    }

    #[test]
    fn debug_hides_share_bytes() {
        let r = Reveal {
            from: 1,
            about: 2,
            kind: RevealKind::MaskKey,
            share: vec![0xab; 33],
        };
        let s = format!("{r:?}");
        assert!(s.contains("share_len: 33"), "{s}");
        assert!(!s.contains("171"), "{s}");
        let mut r = r;
        r.zeroize();
        assert!(r.share.is_empty());
    }
}
