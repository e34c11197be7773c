//! Secure aggregation: the server learns the sum (mod 2^32) of the cohort's
//! `u32` input vectors and nothing else about any one input, even when
//! clients drop out mid-round.
//!
//! This is SecAgg+ (Bell et al., "Secure Single-Server Aggregation with
//! (Poly)Logarithmic Overhead", CCS 2020), which restricts the protocol of
//! Bonawitz et al. ("Practical Secure Aggregation for Privacy-Preserving
//! Machine Learning", CCS 2017) to a sparse neighbour graph. The module is a
//! pair of synchronous, in-memory state machines, [`Client`] and
//! [`Server`], plus plain message structs; moving the messages (and
//! deciding when a phase closes) is the caller's job.
//!
//! # Phases
//!
//! 0. **Advertise.** [`Client::new`] makes two X25519 key pairs from OS
//!    randomness: `c` (to encrypt key shares) and `s` (to agree pairwise
//!    masks). The caller signs [`advert_signing_bytes`] with the
//!    participant's long-term identity key and sends the keys;
//!    [`Server::advertise`] records them under an opaque participant key
//!    `P`. [`Server::close_advertise`] numbers the participants `0..n` in
//!    `P` order, fixes [`Params::for_cohort`] and returns each one's
//!    [`Assignment`]: its index and its neighbours' adverts. Adverts after
//!    that are refused.
//! 1. **Share keys.** Having verified its neighbours' signatures, the
//!    client calls [`Client::share_keys`]: it draws a self-mask seed `b_u`,
//!    Shamir-splits `b_u` and its `s` secret key into one share per
//!    neighbour (threshold `t`), and encrypts each neighbour's pair of
//!    shares to that neighbour. [`Server::close_shares`] fixes U2, the
//!    clients that sent shares, and routes to each member the shares that
//!    other members addressed to it.
//! 2. **Masked input.** [`Client::masked_input`] decrypts the shares (its
//!    neighbours in U2) and sends
//!    `y_u = x_u + PRG(b_u) + sum over v in N(u) ∩ U2 of ±PRG(s_uv)` mod
//!    2^32, with `+` for `v > u` and `-` for `v < u`, so that pairwise
//!    masks cancel in the sum. [`Server::close_masked`] fixes U3, the
//!    clients whose masked input arrived, and announces the [`Survivors`]
//!    (U3, and U2 \ U3 as dropped).
//! 3. **Unmask.** [`Client::unmask`] reveals, for each neighbour, the share
//!    of `b_v` if `v` survived or of `v`'s `s` key if it dropped — never
//!    both. [`Server::finish`] reconstructs those secrets, removes each
//!    survivor's self mask and each mask a survivor shares with a dropped
//!    client, and returns the [`Aggregate`]: the sum of the inputs of U3.
//!
//! # Cryptography
//!
//! - X25519 shared secrets (all-zero results refused) go through
//!   HKDF-SHA256 with salt = domain string || round; `info` names the
//!   purpose, and for share keys the ordered pair (from, to), so each
//!   direction has its own key.
//! - Shares are encrypted with ChaCha20-Poly1305, with round, from and to
//!   as associated data and a random 96-bit nonce sent with the ciphertext
//!   (see `crypto::seal` for why not a zero nonce).
//! - Masks are ChaCha20 streams ([`expand_mask`]) of a 32-byte seed: `b_u`
//!   itself, or `s_uv = HKDF(X25519(s_sk_u, s_pk_v))`.
//! - Secrets are Shamir-shared over GF(256) (the `blahaj` crate), byte by
//!   byte; the j-th neighbour in sorted order gets the share at x = j + 1.
//!
//! # Threat model
//!
//! The server is honest but curious: it follows the protocol and tries to
//! learn what it can from what it sees. It then learns the sum over U3 and
//! who was in U2 and U3, and nothing more about any input: every input in
//! the sum is hidden by its self mask until that mask's seed is
//! reconstructed, and only survivors' self masks are; a dropped client's
//! pairwise masks are removed only where they entered the sum.
//!
//! Colluding clients learn what they can reconstruct: a coalition holding
//! `t` shares of both secrets of client `u`, i.e. at least `t` of `u`'s
//! neighbours, together with the server, learns `x_u`. Fewer than `t` of
//! `u`'s neighbours learn nothing about `u`'s secrets: fewer than `t`
//! Shamir shares are uniformly distributed whatever the secret. Bell et al. bound the colluders per neighbourhood by drawing
//! the graph at random; here the graph is a ring over the `P` order, so the
//! caller must keep participants from choosing their position, e.g. by
//! making `P` a keyed hash of identity and round that clients cannot grind.
//!
//! Outside the model, some protection remains. Signed adverts (the caller
//! signs and verifies; this module only supplies the bytes) stop a server
//! from substituting keys and reading shares. Because `t > k/2` and an
//! honest neighbour reveals at most one of its two shares about a client,
//! a server that tells different neighbours different survivor lists still
//! cannot gather `t` shares of both secrets of a client all of whose
//! neighbours are honest. There is no consistency-check round (Bonawitz et
//! al.'s signed U3 lists), so an actively malicious server colluding with
//! even one neighbour of `u` is not covered. Nothing checks the inputs
//! themselves: a client can add any vector to the sum. A client sending bad
//! shares makes [`Server::finish`] fail ([`SecAggError::KeyMismatch`],
//! [`SecAggError::InconsistentShares`]) when that can be detected — a bad
//! `b_u` share is caught only if more than `t` shares of it arrive.
//!
//! # Parameters and dropouts
//!
//! [`Params::new`] documents each rule. In short: `n >= 3`; `k` even (ring)
//! or `n - 1` (complete); `2 <= k <= 254` (GF(256) has 255 non-zero
//! x-coordinates); `k/2 < t <= k` (the majority rule above). A round
//! completes when every survivor has at least `t` neighbours that survive
//! and send their reveals, and every client that dropped after sharing
//! either has no surviving neighbour or at least `t` of them reveal. The
//! server aborts early ([`Phase::Aborted`]) when the counts already rule
//! that out, and [`Server::finish`] names the client whose secret could not
//! be reconstructed otherwise.
//!
//! Cost per client: 3k X25519 operations and k + 1 mask expansions of
//! the vector. The server expands one mask per survivor plus one per
//! (dropped client, surviving neighbour) pair, and keeps one running sum
//! rather than every masked vector.
//!
//! Sums are taken mod 2^32. Signed values embed with [`from_signed`] and
//! read back with [`to_signed`]; [`check_headroom`] tells whether `n`
//! inputs of a given magnitude can be summed without wrapping.
//!
//! Secret keys, seeds, shares and plaintexts are wiped on drop. Not wiped:
//! the ChaCha20 generator's internal state in [`expand_mask`], and the
//! polynomial coefficients inside `blahaj`'s dealer, which draws them from
//! `rand`'s OS-seeded thread generator.

#![deny(unsafe_code)]
#![warn(missing_debug_implementations)]

mod client;
mod crypto;
mod error;
mod messages;
mod params;
mod phase;
mod secret;
mod server;

#[cfg(test)]
mod tests;

pub use client::Client;
pub use crypto::expand_mask;
pub use error::SecAggError;
pub use messages::{
    advert_signing_bytes, Aggregate, Assignment, EncryptedShare, KeyAdvert, Reveal, Survivors,
};
pub use params::{
    check_headroom, from_signed, to_signed, Params, MAX_CLIENTS, MAX_NEIGHBOURS, MIN_CLIENTS,
    MIN_NEIGHBOURS,
};
pub use phase::{ClientPhase, Phase};
pub use secret::RevealKind;
pub use server::Server;
