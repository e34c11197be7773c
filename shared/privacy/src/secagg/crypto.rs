//! The primitives: OS randomness, X25519 + HKDF key derivation, share
//! encryption, Shamir sharing and the mask PRG.

use blahaj::{Share, Sharks};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf::{self, Salt, HKDF_SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

use super::error::SecAggError;

/// HKDF salt prefix; the round number follows it.
const KDF_DOMAIN: &[u8] = b"fedpersona/secagg/v1/kdf";
/// HKDF `info` prefix for share-encryption keys; `from` and `to` follow.
const SHARE_KEY_INFO: &[u8] = b"share-key";
/// HKDF `info` prefix for pairwise mask seeds; the two indices follow,
/// smaller first, so both ends derive the same seed.
const MASK_SEED_INFO: &[u8] = b"mask-seed";
/// AEAD associated-data prefix; round, `from` and `to` follow.
const AAD_DOMAIN: &[u8] = b"fedpersona/secagg/v1/share";

/// Bytes of one Shamir share of a 32-byte secret: x-coordinate, then 32 y bytes.
pub(crate) const SHARE_LEN: usize = 33;
/// Plaintext of an [`EncryptedShare`](super::EncryptedShare): the share of
/// `b_u`, then the share of `s_sk`.
pub(crate) const PLAINTEXT_LEN: usize = 2 * SHARE_LEN;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Exact length of a well-formed encrypted share.
pub(crate) const CIPHERTEXT_LEN: usize = NONCE_LEN + PLAINTEXT_LEN + TAG_LEN;

const AEAD_ALG: &aead::Algorithm = &aead::CHACHA20_POLY1305;

/// 32 bytes from the operating system's CSPRNG.
pub(crate) fn random_32() -> Result<Zeroizing<[u8; 32]>, SecAggError> {
    let mut out = Zeroizing::new([0u8; 32]);
    SystemRandom::new()
        .fill(&mut out[..])
        .map_err(|_| SecAggError::Rng)?;
    Ok(out)
}

/// A fresh X25519 secret key from OS randomness.
pub(crate) fn new_secret() -> Result<StaticSecret, SecAggError> {
    let bytes = random_32()?;
    Ok(StaticSecret::from(*bytes))
}

/// The public key of `sk`.
pub(crate) fn public_of(sk: &StaticSecret) -> [u8; 32] {
    PublicKey::from(sk).to_bytes()
}

/// X25519 of `sk` with `peer_pk`, refusing the all-zero output that a
/// low-order public key forces (it would make every derived key public).
/// `peer` names the other client in the error.
pub(crate) fn agree(
    sk: &StaticSecret,
    peer_pk: &[u8; 32],
    peer: u32,
) -> Result<Zeroizing<[u8; 32]>, SecAggError> {
    let shared = sk.diffie_hellman(&PublicKey::from(*peer_pk));
    if !shared.was_contributory() {
        return Err(SecAggError::LowOrderKey { peer });
    }
    Ok(Zeroizing::new(shared.to_bytes()))
}

/// Whether `pk` is a low-order point (of the curve or its twist). X25519
/// clamps every scalar to a multiple of the cofactor 8, which sends exactly
/// the low-order points to zero, so any fixed scalar works as a probe.
pub(crate) fn is_low_order(pk: &[u8; 32]) -> bool {
    let probe = StaticSecret::from([0x5a; 32]);
    !probe
        .diffie_hellman(&PublicKey::from(*pk))
        .was_contributory()
}

fn prk(round: u64, shared: &[u8; 32]) -> hkdf::Prk {
    let mut salt = Vec::with_capacity(KDF_DOMAIN.len() + 8);
    salt.extend_from_slice(KDF_DOMAIN);
    salt.extend_from_slice(&round.to_be_bytes());
    Salt::new(HKDF_SHA256, &salt).extract(shared)
}

/// The AEAD key for shares sent `from` → `to` in `round`. Each direction has
/// its own key because `from`, `to` are in the HKDF `info`.
fn share_key(
    round: u64,
    shared: &[u8; 32],
    from: u32,
    to: u32,
) -> Result<LessSafeKey, SecAggError> {
    let (f, t) = (from.to_be_bytes(), to.to_be_bytes());
    let info: [&[u8]; 3] = [SHARE_KEY_INFO, &f, &t];
    let prk = prk(round, shared);
    let okm = prk
        .expand(&info, AEAD_ALG)
        .map_err(|_| SecAggError::Crypto("HKDF expand of share key"))?;
    Ok(LessSafeKey::new(UnboundKey::from(okm)))
}

/// The pairwise mask seed `s_uv` of clients `a` and `b` in `round`, from
/// their X25519 shared secret. Symmetric in `a`, `b`.
pub(crate) fn mask_seed(
    round: u64,
    shared: &[u8; 32],
    a: u32,
    b: u32,
) -> Result<Zeroizing<[u8; 32]>, SecAggError> {
    let (lo, hi) = (a.min(b).to_be_bytes(), a.max(b).to_be_bytes());
    let info: [&[u8]; 3] = [MASK_SEED_INFO, &lo, &hi];
    let mut seed = Zeroizing::new([0u8; 32]);
    prk(round, shared)
        .expand(&info, HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut seed[..]))
        .map_err(|_| SecAggError::Crypto("HKDF expand of mask seed"))?;
    Ok(seed)
}

fn aad(round: u64, from: u32, to: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(AAD_DOMAIN.len() + 16);
    out.extend_from_slice(AAD_DOMAIN);
    out.extend_from_slice(&round.to_be_bytes());
    out.extend_from_slice(&from.to_be_bytes());
    out.extend_from_slice(&to.to_be_bytes());
    out
}

/// Encrypts the share plaintext `from` → `to` under the key derived from
/// `shared` (the X25519 secret of `from`'s and `to`'s `c` keys).
///
/// The nonce is 12 random bytes sent in front of the ciphertext. The key is
/// already unique per round, key pair and direction and used once, so an
/// all-zero nonce would be safe *if* that single use were guaranteed; a
/// random nonce keeps the scheme safe even if a caller re-runs a client from
/// saved state or a bug encrypts twice, for 12 bytes per share.
pub(crate) fn seal(
    round: u64,
    shared: &[u8; 32],
    from: u32,
    to: u32,
    plaintext: &[u8],
) -> Result<Vec<u8>, SecAggError> {
    let key = share_key(round, shared, from, to)?;
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| SecAggError::Rng)?;
    let mut body = plaintext.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad(round, from, to)),
        &mut body,
    )
    .map_err(|_| SecAggError::Crypto("AEAD seal"))?;
    let mut out = Vec::with_capacity(NONCE_LEN + body.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decrypts what [`seal`] produced; [`SecAggError::DecryptFailed`] if the
/// ciphertext is malformed or does not authenticate for this round, sender
/// and recipient.
pub(crate) fn open(
    round: u64,
    shared: &[u8; 32],
    from: u32,
    to: u32,
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, SecAggError> {
    let failed = SecAggError::DecryptFailed { from, to };
    if ciphertext.len() < NONCE_LEN + TAG_LEN {
        return Err(failed);
    }
    let key = share_key(round, shared, from, to)?;
    let (nonce, body) = ciphertext.split_at(NONCE_LEN);
    let mut nonce_bytes = [0u8; NONCE_LEN];
    nonce_bytes.copy_from_slice(nonce);
    let mut buf = Zeroizing::new(body.to_vec());
    let len = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce_bytes),
            Aad::from(aad(round, from, to)),
            &mut buf,
        )
        .map_err(|_| failed)?
        .len();
    buf.truncate(len);
    Ok(buf)
}

/// Splits a 32-byte secret into `count` Shamir shares with threshold `t`
/// over GF(256); share `j` has x-coordinate `j + 1`. Each share is
/// [`SHARE_LEN`] bytes. The polynomial coefficients come from blahaj's
/// dealer, i.e. `rand` 0.8's OS-seeded CSPRNG.
pub(crate) fn split(secret: &[u8; 32], t: u32, count: usize) -> Vec<Zeroizing<Vec<u8>>> {
    let t = u8::try_from(t).unwrap_or(u8::MAX);
    Sharks(t)
        .dealer(secret)
        .take(count)
        .map(|s| Zeroizing::new(Vec::from(&s)))
        .collect()
}

/// Why [`combine`] failed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CombineError {
    TooFew,
    Inconsistent,
}

/// Reconstructs a 32-byte secret from shares of [`SHARE_LEN`] bytes with
/// distinct non-zero x-coordinates (the caller checks both). Uses the first
/// `t`; when more are present, also reconstructs from the last `t` and
/// requires agreement, which catches a corrupted share among them.
pub(crate) fn combine(shares: &[&[u8]], t: u32) -> Result<Zeroizing<[u8; 32]>, CombineError> {
    let t_usize = t as usize;
    if t == 0 || shares.len() < t_usize {
        return Err(CombineError::TooFew);
    }
    let first = recover(&shares[..t_usize], t)?;
    if shares.len() > t_usize {
        let last = recover(&shares[shares.len() - t_usize..], t)?;
        if *first != *last {
            return Err(CombineError::Inconsistent);
        }
    }
    Ok(first)
}

fn recover(shares: &[&[u8]], t: u32) -> Result<Zeroizing<[u8; 32]>, CombineError> {
    let t = u8::try_from(t).map_err(|_| CombineError::TooFew)?;
    let parsed = shares
        .iter()
        .map(|s| {
            if s.len() != SHARE_LEN {
                return Err(CombineError::Inconsistent);
            }
            Share::try_from(*s).map_err(|_| CombineError::Inconsistent)
        })
        .collect::<Result<Vec<Share>, _>>()?;
    let secret = Zeroizing::new(
        Sharks(t)
            .recover(parsed.iter())
            .map_err(|_| CombineError::TooFew)?,
    );
    let mut out = Zeroizing::new([0u8; 32]);
    if secret.len() != out.len() {
        return Err(CombineError::Inconsistent);
    }
    out.copy_from_slice(&secret);
    Ok(out)
}

/// Adds (`add`) or subtracts the ChaCha20 expansion of `seed` to `out`, word
/// by word mod 2^32. Words are the PRG's bytes read little-endian, so the
/// mask is the same on every platform.
pub fn expand_mask(seed: &[u8; 32], out: &mut [u32], add: bool) {
    const WORDS: usize = 256;
    let mut rng = ChaCha20Rng::from_seed(*seed);
    let mut buf = [0u8; WORDS * 4];
    for chunk in out.chunks_mut(WORDS) {
        let bytes = &mut buf[..chunk.len() * 4];
        rng.fill_bytes(bytes);
        let words = bytes
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        if add {
            for (o, m) in chunk.iter_mut().zip(words) {
                *o = o.wrapping_add(m);
            }
        } else {
            for (o, m) in chunk.iter_mut().zip(words) {
                *o = o.wrapping_sub(m);
            }
        }
    }
    buf.zeroize();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_add_then_subtract_is_identity() {
        let seed = [9u8; 32];
        let orig: Vec<u32> = (0..1000).map(|i| i * 7919).collect();
        let mut v = orig.clone();
        expand_mask(&seed, &mut v, true);
        assert_ne!(v, orig);
        expand_mask(&seed, &mut v, false);
        assert_eq!(v, orig);
    }

    #[test]
    fn mask_is_a_prefix_stable_stream() {
        // The mask of a shorter vector is the prefix of a longer one's, and
        // chunking does not change the stream.
        let seed = [3u8; 32];
        let mut long = vec![0u32; 1000];
        expand_mask(&seed, &mut long, true);
        let mut short = vec![0u32; 300];
        expand_mask(&seed, &mut short, true);
        assert_eq!(&long[..300], &short[..]);
        let mut rng = ChaCha20Rng::from_seed(seed);
        let direct: Vec<u32> = (0..1000).map(|_| rng.next_u32()).collect();
        assert_eq!(long, direct);
    }

    #[test]
    fn agreement_and_seeds_are_symmetric() {
        let a = new_secret().unwrap();
        let b = new_secret().unwrap();
        let ab = agree(&a, &public_of(&b), 1).unwrap();
        let ba = agree(&b, &public_of(&a), 0).unwrap();
        assert_eq!(*ab, *ba);
        assert_eq!(
            *mask_seed(5, &ab, 0, 1).unwrap(),
            *mask_seed(5, &ba, 1, 0).unwrap()
        );
        assert_ne!(
            *mask_seed(5, &ab, 0, 1).unwrap(),
            *mask_seed(6, &ab, 0, 1).unwrap()
        );
    }

    #[test]
    fn low_order_keys_are_rejected() {
        let a = new_secret().unwrap();
        assert_eq!(
            agree(&a, &[0u8; 32], 4).unwrap_err(),
            SecAggError::LowOrderKey { peer: 4 }
        );
        let mut one = [0u8; 32];
        one[0] = 1;
        assert!(agree(&a, &one, 4).is_err());
        assert!(is_low_order(&[0u8; 32]));
        assert!(is_low_order(&one));
        assert!(!is_low_order(&public_of(&a)));
    }

    #[test]
    fn seal_open_round_trip_and_binding() {
        let shared = [7u8; 32];
        let msg = [42u8; PLAINTEXT_LEN];
        let ct = seal(1, &shared, 2, 3, &msg).unwrap();
        assert_eq!(ct.len(), CIPHERTEXT_LEN);
        assert_eq!(&open(1, &shared, 2, 3, &ct).unwrap()[..], &msg[..]);
        // Wrong direction, round or key: rejected.
        assert_eq!(
            open(1, &shared, 3, 2, &ct).unwrap_err(),
            SecAggError::DecryptFailed { from: 3, to: 2 }
        );
        assert!(open(2, &shared, 2, 3, &ct).is_err());
        assert!(open(1, &[8u8; 32], 2, 3, &ct).is_err());
        // Truncated or flipped: rejected, never a panic.
        for len in 0..ct.len() {
            assert!(open(1, &shared, 2, 3, &ct[..len]).is_err());
        }
        let mut bad = ct.clone();
        bad[20] ^= 1;
        assert!(open(1, &shared, 2, 3, &bad).is_err());
        // Random nonces: two encryptions differ.
        assert_ne!(seal(1, &shared, 2, 3, &msg).unwrap(), ct);
    }

    #[test]
    fn shamir_round_trip_and_consistency_check() {
        let secret = random_32().unwrap();
        let shares = split(&secret, 4, 7);
        assert_eq!(shares.len(), 7);
        for (j, s) in shares.iter().enumerate() {
            assert_eq!(s.len(), SHARE_LEN);
            assert_eq!(s[0] as usize, j + 1);
        }
        let refs: Vec<&[u8]> = shares.iter().map(|s| &s[..]).collect();
        assert_eq!(*combine(&refs[..4], 4).unwrap(), *secret);
        assert_eq!(*combine(&refs[2..], 4).unwrap(), *secret);
        assert_eq!(*combine(&refs, 4).unwrap(), *secret);
        assert_eq!(combine(&refs[..3], 4).unwrap_err(), CombineError::TooFew);
        let mut corrupt = shares[6].to_vec();
        corrupt[5] ^= 0x55;
        let mut with_bad = refs[..6].to_vec();
        with_bad.push(&corrupt);
        assert_eq!(
            combine(&with_bad, 4).unwrap_err(),
            CombineError::Inconsistent
        );
        // Garbage lengths: an error, not a panic.
        assert!(combine(&[&[1u8][..], &[2u8; 40][..]], 2).is_err());
        assert!(combine(&[], 0).is_err());
    }
}
