//! The client's side of one round.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

use super::crypto::{self, CIPHERTEXT_LEN, PLAINTEXT_LEN, SHARE_LEN};
use super::error::SecAggError;
use super::messages::{Assignment, EncryptedShare, KeyAdvert, Reveal, Survivors};
use super::params::Params;
use super::phase::ClientPhase;
use super::secret::RevealKind;

/// One client's state for one round. Every method either succeeds and moves
/// to the next phase, or fails and leaves the client as it was (nothing was
/// sent, so trying again with correct input is safe). Each phase produces
/// output at most once: a second masked input with a different mask set
/// would let the server subtract the two.
///
/// Secrets (`c_sk`, `s_sk`, `b_u`, the neighbours' shares) are wiped on drop
/// and as soon as the protocol no longer needs them.
pub struct Client {
    round: u64,
    c_pk: [u8; 32],
    s_pk: [u8; 32],
    state: State,
}

enum State {
    Fresh {
        c_sk: StaticSecret,
        s_sk: StaticSecret,
    },
    Shared(Box<Shared>),
    Masked(Masked),
    Done,
}

struct Shared {
    c_sk: StaticSecret,
    s_sk: StaticSecret,
    b: Zeroizing<[u8; 32]>,
    index: u32,
    params: Params,
    vector_len: usize,
    /// Adverts of `params.neighbours_of(index)`, sorted by index.
    neighbours: Vec<KeyAdvert>,
}

struct Masked {
    index: u32,
    params: Params,
    /// Shares received from the neighbours in U2, by sender.
    held: BTreeMap<u32, Held>,
}

struct Held {
    b_share: Zeroizing<Vec<u8>>,
    s_share: Zeroizing<Vec<u8>>,
}

impl Client {
    /// Starts a round: makes the two key pairs from OS randomness and returns
    /// the client with its public keys `(c_pk, s_pk)` to advertise (signed by
    /// the caller over [`advert_signing_bytes`](super::advert_signing_bytes)).
    pub fn new(round: u64) -> Result<(Client, [u8; 32], [u8; 32]), SecAggError> {
        let c_sk = crypto::new_secret()?;
        let s_sk = crypto::new_secret()?;
        let c_pk = crypto::public_of(&c_sk);
        let s_pk = crypto::public_of(&s_sk);
        let client = Client {
            round,
            c_pk,
            s_pk,
            state: State::Fresh { c_sk, s_sk },
        };
        Ok((client, c_pk, s_pk))
    }

    /// The round this client belongs to.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The client's `(c_pk, s_pk)`.
    pub fn public_keys(&self) -> ([u8; 32], [u8; 32]) {
        (self.c_pk, self.s_pk)
    }

    /// The index assigned to this client, once it has one.
    pub fn index(&self) -> Option<u32> {
        match &self.state {
            State::Fresh { .. } | State::Done => None,
            State::Shared(s) => Some(s.index),
            State::Masked(m) => Some(m.index),
        }
    }

    /// Where the client is in the round.
    pub fn phase(&self) -> ClientPhase {
        match self.state {
            State::Fresh { .. } => ClientPhase::ShareKeys,
            State::Shared(_) => ClientPhase::MaskedInput,
            State::Masked(_) => ClientPhase::Unmask,
            State::Done => ClientPhase::Done,
        }
    }

    fn wrong_phase(&self, op: &'static str) -> SecAggError {
        SecAggError::WrongClientPhase {
            op,
            phase: self.phase(),
        }
    }

    /// Phase 1: checks the assignment, draws the self-mask seed `b_u`, splits
    /// `b_u` and `s_sk` into one Shamir share per neighbour (threshold `t`)
    /// and encrypts each neighbour's pair of shares to it.
    ///
    /// The caller must already have verified the neighbours' advert
    /// signatures; this checks the structure: valid parameters, its own keys
    /// at its index, exactly `params.neighbours_of(index)` in order, and no
    /// public key used twice.
    pub fn share_keys(
        &mut self,
        assignment: &Assignment,
    ) -> Result<Vec<EncryptedShare>, SecAggError> {
        let (c_sk, s_sk) = match std::mem::replace(&mut self.state, State::Done) {
            State::Fresh { c_sk, s_sk } => (c_sk, s_sk),
            other => {
                self.state = other;
                return Err(self.wrong_phase("share keys"));
            }
        };
        match self.make_shares(&c_sk, &s_sk, assignment) {
            Ok((params, b, out)) => {
                self.state = State::Shared(Box::new(Shared {
                    c_sk,
                    s_sk,
                    b,
                    index: assignment.index,
                    params,
                    vector_len: assignment.vector_len as usize,
                    neighbours: assignment.neighbours.clone(),
                }));
                Ok(out)
            }
            Err(e) => {
                self.state = State::Fresh { c_sk, s_sk };
                Err(e)
            }
        }
    }

    /// The fallible part of [`Client::share_keys`], which changes nothing.
    #[allow(clippy::type_complexity)]
    fn make_shares(
        &self,
        c_sk: &StaticSecret,
        s_sk: &StaticSecret,
        assignment: &Assignment,
    ) -> Result<(Params, Zeroizing<[u8; 32]>, Vec<EncryptedShare>), SecAggError> {
        let params = Params::new(
            assignment.params.clients,
            assignment.params.neighbours,
            assignment.params.threshold,
        )?;
        let index = assignment.index;
        if index >= params.clients {
            return Err(SecAggError::IndexOutOfRange {
                index,
                clients: params.clients,
            });
        }
        let own = &assignment.own;
        if own.index != index || own.c_pk != self.c_pk || own.s_pk != self.s_pk {
            return Err(SecAggError::AssignmentOwnKeys { index });
        }
        let expected = params.neighbours_of(index);
        let got: Vec<u32> = assignment.neighbours.iter().map(|a| a.index).collect();
        if got != expected {
            return Err(SecAggError::AssignmentNeighbours {
                index,
                expected,
                got,
            });
        }
        let mut seen: BTreeMap<[u8; 32], u32> = BTreeMap::new();
        for advert in std::iter::once(own).chain(&assignment.neighbours) {
            for key in [advert.c_pk, advert.s_pk] {
                if let Some(&other) = seen.get(&key) {
                    return Err(SecAggError::DuplicateKey {
                        index: advert.index,
                        other,
                    });
                }
                seen.insert(key, advert.index);
            }
        }

        let b = crypto::random_32()?;
        let k = expected.len();
        let b_shares = crypto::split(&b, params.threshold, k);
        let s_shares = crypto::split(&Zeroizing::new(s_sk.to_bytes()), params.threshold, k);
        let mut out = Vec::with_capacity(k);
        let pairs = b_shares.iter().zip(&s_shares);
        for (neighbour, (b_share, s_share)) in assignment.neighbours.iter().zip(pairs) {
            let shared = crypto::agree(c_sk, &neighbour.c_pk, neighbour.index)?;
            let mut plaintext = Zeroizing::new(Vec::with_capacity(PLAINTEXT_LEN));
            plaintext.extend_from_slice(b_share);
            plaintext.extend_from_slice(s_share);
            let ciphertext = crypto::seal(self.round, &shared, index, neighbour.index, &plaintext)?;
            out.push(EncryptedShare {
                from: index,
                to: neighbour.index,
                ciphertext,
            });
        }
        Ok((params, b, out))
    }

    /// Phase 2: decrypts the shares the server routed to this client (one
    /// from each neighbour that completed phase 1: this client's view of
    /// U2), then returns `y = x + PRG(b_u) + sum over v in U2 of
    /// ±PRG(s_uv)`, `+` for `v > u` and `-` for `v < u`, mod 2^32.
    ///
    /// `input.len()` must equal the assignment's `vector_len`. Refuses (and
    /// sends nothing) if fewer than `t` neighbours shared keys, since then
    /// the server could never remove this client's self mask.
    pub fn masked_input(
        &mut self,
        input: &[u32],
        shares_for_me: Vec<EncryptedShare>,
    ) -> Result<Vec<u32>, SecAggError> {
        let State::Shared(shared) = &self.state else {
            return Err(self.wrong_phase("mask its input"));
        };
        let index = shared.index;
        if input.len() != shared.vector_len {
            return Err(SecAggError::VectorLength {
                index,
                expected: shared.vector_len,
                got: input.len(),
            });
        }
        let mut held = BTreeMap::new();
        let mut mask_keys = Vec::with_capacity(shares_for_me.len());
        for share in &shares_for_me {
            if share.to != index {
                return Err(SecAggError::WrongRecipient {
                    to: share.to,
                    me: index,
                });
            }
            let Ok(pos) = shared
                .neighbours
                .binary_search_by_key(&share.from, |a| a.index)
            else {
                return Err(SecAggError::NotNeighbour {
                    from: share.from,
                    to: index,
                });
            };
            if held.contains_key(&share.from) {
                return Err(SecAggError::DuplicateShare {
                    from: share.from,
                    to: index,
                });
            }
            if share.ciphertext.len() != CIPHERTEXT_LEN {
                return Err(SecAggError::CiphertextLength {
                    from: share.from,
                    to: index,
                    len: share.ciphertext.len(),
                    expected: CIPHERTEXT_LEN,
                });
            }
            let sender = &shared.neighbours[pos];
            let key = crypto::agree(&shared.c_sk, &sender.c_pk, sender.index)?;
            let plain = crypto::open(self.round, &key, share.from, index, &share.ciphertext)?;
            // The sender gave its j-th neighbour the share at x = j + 1.
            let x = shared
                .params
                .neighbour_position(share.from, index)
                .map(|j| j + 1);
            if plain.len() != PLAINTEXT_LEN
                || x != Some(usize::from(plain[0]))
                || x != Some(usize::from(plain[SHARE_LEN]))
            {
                return Err(SecAggError::MalformedShare {
                    from: share.from,
                    to: index,
                });
            }
            mask_keys.push((share.from, sender.s_pk));
            held.insert(
                share.from,
                Held {
                    b_share: Zeroizing::new(plain[..SHARE_LEN].to_vec()),
                    s_share: Zeroizing::new(plain[SHARE_LEN..].to_vec()),
                },
            );
        }
        if held.len() < shared.params.threshold as usize {
            return Err(SecAggError::NeighbourhoodTooSmall {
                index,
                stage: "share-keys",
                have: held.len(),
                threshold: shared.params.threshold,
            });
        }

        let mut y = input.to_vec();
        crypto::expand_mask(&shared.b, &mut y, true);
        for (v, s_pk) in mask_keys {
            let dh = crypto::agree(&shared.s_sk, &s_pk, v)?;
            let seed = crypto::mask_seed(self.round, &dh, index, v)?;
            crypto::expand_mask(&seed, &mut y, v > index);
        }

        // Drops c_sk, s_sk and b_u (all wiped on drop): from here on the
        // client only holds its neighbours' shares.
        let params = shared.params;
        self.state = State::Masked(Masked {
            index,
            params,
            held,
        });
        Ok(y)
    }

    /// Phase 3: for each neighbour listed as a survivor, reveals its share of
    /// that neighbour's `b_v`; for each neighbour listed as dropped (it shared
    /// keys but sent no masked input), its share of that neighbour's `s_sk`.
    ///
    /// Refuses, revealing nothing, when the lists are inconsistent: an index
    /// out of range, twice in a list or in both lists; this client marked
    /// dropped or missing from the survivors (it did send its input); a
    /// neighbour listed that never shared keys with it, or one that did but
    /// is in neither list. Also refuses when fewer than `t` of its neighbours
    /// survived: then the server cannot reconstruct this client's `b_u`
    /// anyway, so revealing would only hand out shares for nothing.
    ///
    /// Against an honest-but-curious server these checks never fire. What
    /// keeps a server from learning both secrets of a client is that each
    /// honest neighbour reveals at most one share per client and `t > k/2`.
    pub fn unmask(&mut self, survivors: &Survivors) -> Result<Vec<Reveal>, SecAggError> {
        let State::Masked(masked) = &self.state else {
            return Err(self.wrong_phase("unmask"));
        };
        let index = masked.index;
        let n = masked.params.clients;
        let survived = checked_set(&survivors.survivors, n, "survivors")?;
        let dropped = checked_set(&survivors.dropped, n, "dropped")?;
        if let Some(&both) = survived.intersection(&dropped).next() {
            return Err(SecAggError::ListedAsBoth { index: both });
        }
        if dropped.contains(&index) {
            return Err(SecAggError::SelfDropped { index });
        }
        if !survived.contains(&index) {
            return Err(SecAggError::SelfNotSurvivor { index });
        }
        let mut surviving_neighbours = 0usize;
        for v in masked.params.neighbours_of(index) {
            let listed = survived.contains(&v) || dropped.contains(&v);
            let holds = masked.held.contains_key(&v);
            if listed && !holds {
                return Err(SecAggError::InconsistentLists {
                    index,
                    neighbour: v,
                    reason: "is listed but never shared keys with this client",
                });
            }
            if holds && !listed {
                return Err(SecAggError::InconsistentLists {
                    index,
                    neighbour: v,
                    reason: "shared keys but is in neither list",
                });
            }
            if survived.contains(&v) {
                surviving_neighbours += 1;
            }
        }
        if surviving_neighbours < masked.params.threshold as usize {
            return Err(SecAggError::NeighbourhoodTooSmall {
                index,
                stage: "masked-input",
                have: surviving_neighbours,
                threshold: masked.params.threshold,
            });
        }

        let reveals = masked
            .held
            .iter()
            .map(|(&about, held)| {
                let (kind, share) = if survived.contains(&about) {
                    (RevealKind::SelfMaskSeed, &held.b_share)
                } else {
                    (RevealKind::MaskKey, &held.s_share)
                };
                Reveal {
                    from: index,
                    about,
                    kind,
                    share: share.to_vec(),
                }
            })
            .collect();
        self.state = State::Done;
        Ok(reveals)
    }
}

/// The entries of one survivor list as a set, rejecting out-of-range and
/// repeated indices.
fn checked_set(
    list: &[u32],
    clients: u32,
    name: &'static str,
) -> Result<BTreeSet<u32>, SecAggError> {
    let mut set = BTreeSet::new();
    for &i in list {
        if i >= clients {
            return Err(SecAggError::IndexOutOfRange { index: i, clients });
        }
        if !set.insert(i) {
            return Err(SecAggError::DuplicateInList {
                index: i,
                list: name,
            });
        }
    }
    Ok(set)
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("round", &self.round)
            .field("index", &self.index())
            .field("phase", &self.phase())
            .finish_non_exhaustive()
    }
}
