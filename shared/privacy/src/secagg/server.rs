//! The server's side of one round.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

use super::crypto::{self, CombineError, CIPHERTEXT_LEN, SHARE_LEN};
use super::error::SecAggError;
use super::messages::{
    Aggregate, Assignment, EncryptedShare, KeyAdvert, Reveal, RevealKind, Survivors,
};
use super::params::{Params, MAX_CLIENTS};
use super::phase::Phase;

/// The server's state for one round, generic over the caller's opaque,
/// ordered participant key `P` (which fixes the index order).
///
/// Every `submit_*` and `advertise` checks the phase and the message and
/// either records it or returns an error leaving the state unchanged. The
/// `close_*` methods move to the next phase, or abort the round (phase
/// [`Phase::Aborted`]) when too few clients are left for it to complete.
pub struct Server<P> {
    round: u64,
    vector_len: usize,
    state: State<P>,
}

enum State<P> {
    Advertise {
        adverts: BTreeMap<P, ([u8; 32], [u8; 32])>,
        keys_seen: BTreeSet<[u8; 32]>,
    },
    ShareKeys {
        roster: Roster,
        submitted: BTreeMap<u32, Vec<EncryptedShare>>,
    },
    MaskedInput {
        roster: Roster,
        u2: Members,
        u3: Members,
        sum: Vec<u32>,
    },
    Unmask(Box<Unmasking>),
    Aborted,
}

struct Unmasking {
    roster: Roster,
    u2: Members,
    u3: Members,
    sum: Vec<u32>,
    revealed: Members,
    /// For each client, the shares revealed about it by x-coordinate. Which
    /// secret they are shares of follows from whether the client is in U3.
    shares: BTreeMap<u32, BTreeMap<u8, Zeroizing<Vec<u8>>>>,
}

/// The parameters and every client's public keys, by index.
struct Roster {
    params: Params,
    keys: Vec<KeyAdvert>,
}

/// A subset of `0..n`.
#[derive(Clone)]
struct Members(Vec<bool>);

impl Members {
    fn empty(n: u32) -> Members {
        Members(vec![false; n as usize])
    }
    fn contains(&self, i: u32) -> bool {
        self.0.get(i as usize).copied().unwrap_or(false)
    }
    fn insert(&mut self, i: u32) {
        if let Some(slot) = self.0.get_mut(i as usize) {
            *slot = true;
        }
    }
    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, &m)| m)
            .map(|(i, _)| i as u32)
    }
    fn len(&self) -> usize {
        self.0.iter().filter(|&&m| m).count()
    }
    fn is_empty(&self) -> bool {
        !self.0.contains(&true)
    }
    /// How many of `i`'s neighbours are members.
    fn neighbours_in(&self, params: &Params, i: u32) -> usize {
        params
            .neighbours_of(i)
            .into_iter()
            .filter(|&j| self.contains(j))
            .count()
    }
}

impl<P: Ord + Clone> Server<P> {
    /// A server for `round`, aggregating vectors of `vector_len` words.
    pub fn new(round: u64, vector_len: usize) -> Self {
        Server {
            round,
            vector_len,
            state: State::Advertise {
                adverts: BTreeMap::new(),
                keys_seen: BTreeSet::new(),
            },
        }
    }

    /// The round number.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The input length, in words.
    pub fn vector_len(&self) -> usize {
        self.vector_len
    }

    /// The parameters, once the advertise phase has closed.
    pub fn params(&self) -> Option<Params> {
        match &self.state {
            State::Advertise { .. } | State::Aborted => None,
            State::ShareKeys { roster, .. } | State::MaskedInput { roster, .. } => {
                Some(roster.params)
            }
            State::Unmask(u) => Some(u.roster.params),
        }
    }

    /// Where the round is.
    pub fn phase(&self) -> Phase {
        match self.state {
            State::Advertise { .. } => Phase::Advertise,
            State::ShareKeys { .. } => Phase::ShareKeys,
            State::MaskedInput { .. } => Phase::MaskedInput,
            State::Unmask(_) => Phase::Unmask,
            State::Aborted => Phase::Aborted,
        }
    }

    fn wrong_phase(&self, op: &'static str) -> SecAggError {
        SecAggError::WrongPhase {
            op,
            phase: self.phase(),
        }
    }

    /// Phase 0: records participant `p`'s public keys. The caller has
    /// verified `p`'s signature over
    /// [`advert_signing_bytes`](super::advert_signing_bytes). Rejects a
    /// second advert from `p`, a key already advertised this round (by
    /// anyone, including `c_pk == s_pk`), a low-order key, and more than
    /// [`MAX_CLIENTS`] participants.
    pub fn advertise(&mut self, p: P, c_pk: [u8; 32], s_pk: [u8; 32]) -> Result<(), SecAggError> {
        let State::Advertise { adverts, keys_seen } = &mut self.state else {
            return Err(self.wrong_phase("advertise"));
        };
        if adverts.contains_key(&p) {
            return Err(SecAggError::DuplicateParticipant);
        }
        if c_pk == s_pk || keys_seen.contains(&c_pk) || keys_seen.contains(&s_pk) {
            return Err(SecAggError::AdvertKeyReused);
        }
        if crypto::is_low_order(&c_pk) || crypto::is_low_order(&s_pk) {
            return Err(SecAggError::AdvertLowOrderKey);
        }
        if adverts.len() >= MAX_CLIENTS as usize {
            return Err(SecAggError::TooManyClients {
                clients: MAX_CLIENTS.saturating_add(1),
                max: MAX_CLIENTS,
            });
        }
        keys_seen.insert(c_pk);
        keys_seen.insert(s_pk);
        adverts.insert(p, (c_pk, s_pk));
        Ok(())
    }

    /// Closes phase 0: gives the participants indices `0..n` in the order of
    /// their keys `P`, fixes [`Params::for_cohort`]`(n, max_neighbours)` and
    /// returns each participant's [`Assignment`]. Adverts arriving later are
    /// refused. Aborts the round if the parameters are invalid (e.g. fewer
    /// than three participants).
    pub fn close_advertise(
        &mut self,
        max_neighbours: u32,
    ) -> Result<Vec<(P, Assignment)>, SecAggError> {
        let State::Advertise { adverts, .. } = &self.state else {
            return Err(self.wrong_phase("close the advertise phase"));
        };
        let planned = u32::try_from(adverts.len())
            .map_err(|_| SecAggError::TooManyClients {
                clients: u32::MAX,
                max: MAX_CLIENTS,
            })
            .and_then(|n| Params::for_cohort(n, max_neighbours))
            .and_then(|params| {
                let vector_len =
                    u32::try_from(self.vector_len).map_err(|_| SecAggError::VectorTooLong {
                        len: self.vector_len,
                    })?;
                Ok((params, vector_len))
            });
        let (params, vector_len) = match planned {
            Ok(v) => v,
            Err(e) => {
                self.state = State::Aborted;
                return Err(e);
            }
        };
        let keys: Vec<KeyAdvert> = adverts
            .values()
            .zip(0u32..)
            .map(|(&(c_pk, s_pk), index)| KeyAdvert { index, c_pk, s_pk })
            .collect();
        let assignments = adverts
            .keys()
            .zip(&keys)
            .map(|(p, own)| {
                let neighbours = params
                    .neighbours_of(own.index)
                    .into_iter()
                    .map(|j| keys[j as usize].clone())
                    .collect();
                let assignment = Assignment {
                    index: own.index,
                    params,
                    vector_len,
                    own: own.clone(),
                    neighbours,
                };
                (p.clone(), assignment)
            })
            .collect();
        self.state = State::ShareKeys {
            roster: Roster { params, keys },
            submitted: BTreeMap::new(),
        };
        Ok(assignments)
    }

    /// Phase 1: records client `from`'s encrypted shares, exactly one for
    /// each of its neighbours, each of the expected length.
    pub fn submit_shares(
        &mut self,
        from: u32,
        shares: Vec<EncryptedShare>,
    ) -> Result<(), SecAggError> {
        let State::ShareKeys { roster, submitted } = &mut self.state else {
            return Err(self.wrong_phase("submit shares"));
        };
        let params = roster.params;
        check_index(from, params.clients)?;
        if submitted.contains_key(&from) {
            return Err(SecAggError::AlreadySubmitted {
                index: from,
                phase: Phase::ShareKeys,
            });
        }
        let k = params.neighbours as usize;
        if shares.len() != k {
            return Err(SecAggError::ShareCount {
                from,
                expected: k,
                got: shares.len(),
            });
        }
        let mut recipients = BTreeSet::new();
        for share in &shares {
            if share.from != from {
                return Err(SecAggError::SenderMismatch {
                    from,
                    claimed: share.from,
                });
            }
            if !params.are_neighbours(from, share.to) {
                return Err(SecAggError::NotNeighbour { from, to: share.to });
            }
            if !recipients.insert(share.to) {
                return Err(SecAggError::DuplicateShare { from, to: share.to });
            }
            if share.ciphertext.len() != CIPHERTEXT_LEN {
                return Err(SecAggError::CiphertextLength {
                    from,
                    to: share.to,
                    len: share.ciphertext.len(),
                    expected: CIPHERTEXT_LEN,
                });
            }
        }
        // k distinct neighbours out of k: every neighbour exactly once.
        submitted.insert(from, shares);
        Ok(())
    }

    /// Closes phase 1. U2 is the set of clients that submitted shares; each
    /// member of U2 gets the shares addressed to it by other members of U2
    /// (shares from clients outside U2 do not exist; shares *to* clients
    /// outside U2 are discarded).
    ///
    /// Aborts if U2 is empty, or if some member has fewer than `t` neighbours
    /// in U2: that client's `b_u` could then never be reconstructed (only
    /// its neighbours in U2 hold shares of it), so its masked input could
    /// never be unmasked. Returns `(recipient, shares)` for each member.
    pub fn close_shares(&mut self) -> Result<Vec<(u32, Vec<EncryptedShare>)>, SecAggError> {
        let (roster, submitted) = match std::mem::replace(&mut self.state, State::Aborted) {
            State::ShareKeys { roster, submitted } => (roster, submitted),
            other => {
                self.state = other;
                return Err(self.wrong_phase("close the share phase"));
            }
        };
        // From here on an error leaves the round aborted.
        let params = roster.params;
        let mut u2 = Members::empty(params.clients);
        for &i in submitted.keys() {
            u2.insert(i);
        }
        if u2.is_empty() {
            return Err(SecAggError::NoneLeft {
                stage: "share-keys",
            });
        }
        check_neighbourhoods(&params, &u2, u2.iter(), "share-keys")?;

        let mut routed: BTreeMap<u32, Vec<EncryptedShare>> =
            u2.iter().map(|i| (i, Vec::new())).collect();
        for share in submitted.into_values().flatten() {
            if let Some(inbox) = routed.get_mut(&share.to) {
                inbox.push(share);
            }
        }
        self.state = State::MaskedInput {
            u3: Members::empty(params.clients),
            sum: vec![0; self.vector_len],
            roster,
            u2,
        };
        Ok(routed.into_iter().collect())
    }

    /// Phase 2: adds client `from`'s masked input to the running sum. Only
    /// members of U2, once each, with exactly `vector_len` words.
    pub fn submit_masked(&mut self, from: u32, masked: Vec<u32>) -> Result<(), SecAggError> {
        let State::MaskedInput {
            roster,
            u2,
            u3,
            sum,
        } = &mut self.state
        else {
            return Err(self.wrong_phase("submit a masked input"));
        };
        check_index(from, roster.params.clients)?;
        if !u2.contains(from) {
            return Err(SecAggError::NotInShareSet { index: from });
        }
        if u3.contains(from) {
            return Err(SecAggError::AlreadySubmitted {
                index: from,
                phase: Phase::MaskedInput,
            });
        }
        if masked.len() != sum.len() {
            return Err(SecAggError::VectorLength {
                index: from,
                expected: sum.len(),
                got: masked.len(),
            });
        }
        for (s, m) in sum.iter_mut().zip(&masked) {
            *s = s.wrapping_add(*m);
        }
        u3.insert(from);
        Ok(())
    }

    /// Closes phase 2. U3 is the set of clients whose masked input arrived;
    /// the result lists U3 and U2 \ U3 for every client (clients look only at
    /// their neighbours).
    ///
    /// Aborts if U3 is empty, if a member of U3 has fewer than `t`
    /// neighbours in U3 (too few could reveal shares of its `b_u`, and it
    /// would itself refuse to unmask), or if a dropped client has between
    /// 1 and `t - 1` neighbours in U3 (the masks it shares with them could
    /// not be removed).
    pub fn close_masked(&mut self) -> Result<Survivors, SecAggError> {
        let (roster, u2, u3, sum) = match std::mem::replace(&mut self.state, State::Aborted) {
            State::MaskedInput {
                roster,
                u2,
                u3,
                sum,
            } => (roster, u2, u3, sum),
            other => {
                self.state = other;
                return Err(self.wrong_phase("close the masked-input phase"));
            }
        };
        // From here on an error leaves the round aborted.
        let params = roster.params;
        if u3.is_empty() {
            return Err(SecAggError::NoneLeft {
                stage: "masked-input",
            });
        }
        check_neighbourhoods(&params, &u3, u3.iter(), "masked-input")?;
        let dropped: Vec<u32> = u2.iter().filter(|&i| !u3.contains(i)).collect();
        let affected = dropped
            .iter()
            .copied()
            .filter(|&d| u3.neighbours_in(&params, d) > 0);
        check_neighbourhoods(&params, &u3, affected, "masked-input")?;

        let survivors = Survivors {
            survivors: u3.iter().collect(),
            dropped,
        };
        self.state = State::Unmask(Box::new(Unmasking {
            revealed: Members::empty(params.clients),
            shares: BTreeMap::new(),
            roster,
            u2,
            u3,
            sum,
        }));
        Ok(survivors)
    }

    /// Phase 3: records client `from`'s reveals. `from` must be in U3 and
    /// reveal exactly one share about each of its neighbours in U2: of
    /// `b_v` for survivors, of `s_sk` for dropped clients, at the
    /// x-coordinate that `v` gave `from`.
    pub fn submit_reveals(&mut self, from: u32, reveals: Vec<Reveal>) -> Result<(), SecAggError> {
        let State::Unmask(state) = &mut self.state else {
            return Err(self.wrong_phase("submit reveals"));
        };
        let params = state.roster.params;
        check_index(from, params.clients)?;
        if !state.u3.contains(from) {
            return Err(SecAggError::NotSurvivor { index: from });
        }
        if state.revealed.contains(from) {
            return Err(SecAggError::AlreadySubmitted {
                index: from,
                phase: Phase::Unmask,
            });
        }
        let expected = state.u2.neighbours_in(&params, from);
        if reveals.len() != expected {
            return Err(SecAggError::RevealCount {
                from,
                expected,
                got: reveals.len(),
            });
        }
        let mut abouts = BTreeSet::new();
        for r in &reveals {
            if r.from != from {
                return Err(SecAggError::SenderMismatch {
                    from,
                    claimed: r.from,
                });
            }
            if !params.are_neighbours(from, r.about) || !state.u2.contains(r.about) {
                return Err(SecAggError::RevealNotExpected {
                    from,
                    about: r.about,
                });
            }
            if !abouts.insert(r.about) {
                return Err(SecAggError::DuplicateReveal {
                    from,
                    about: r.about,
                });
            }
            let expected_kind = if state.u3.contains(r.about) {
                RevealKind::SelfMaskSeed
            } else {
                RevealKind::MaskKey
            };
            if r.kind != expected_kind {
                return Err(SecAggError::WrongRevealKind {
                    from,
                    about: r.about,
                    expected: expected_kind,
                });
            }
            let x = params.neighbour_position(r.about, from).map(|j| j + 1);
            if r.share.len() != SHARE_LEN || x != Some(usize::from(r.share[0])) {
                return Err(SecAggError::MalformedReveal {
                    from,
                    about: r.about,
                });
            }
        }

        for r in reveals {
            let x = r.share[0];
            state
                .shares
                .entry(r.about)
                .or_default()
                .insert(x, Zeroizing::new(r.share));
        }
        state.revealed.insert(from);
        Ok(())
    }

    /// Closes the round: reconstructs `b_u` for every survivor and `s_sk`
    /// for every dropped client with surviving neighbours, from at least `t`
    /// revealed shares each, then removes every self mask and every pairwise
    /// mask a survivor shares with a dropped client. Masks between two
    /// survivors cancel in the sum, and no survivor masked with a client
    /// outside U2 (it never received that client's shares).
    ///
    /// Fails, returning no sum, if some secret has fewer than `t` shares
    /// (the error names the client), if shares disagree, or if a
    /// reconstructed mask key does not match its advert.
    pub fn finish(self) -> Result<Aggregate, SecAggError> {
        let phase = self.phase();
        let State::Unmask(state) = self.state else {
            return Err(SecAggError::WrongPhase {
                op: "finish",
                phase,
            });
        };
        let Unmasking {
            roster,
            u2,
            u3,
            mut sum,
            shares,
            ..
        } = *state;
        let params = roster.params;

        let mut self_seeds = Vec::new();
        for u in u3.iter() {
            let seed = reconstruct(&shares, u, RevealKind::SelfMaskSeed, params.threshold)?;
            self_seeds.push(seed);
        }
        let mut dropped_keys = Vec::new();
        for d in u2.iter().filter(|&d| !u3.contains(d)) {
            let survivors: Vec<u32> = params
                .neighbours_of(d)
                .into_iter()
                .filter(|&v| u3.contains(v))
                .collect();
            if survivors.is_empty() {
                continue;
            }
            let bytes = reconstruct(&shares, d, RevealKind::MaskKey, params.threshold)?;
            let sk = StaticSecret::from(*bytes);
            if crypto::public_of(&sk) != roster.keys[d as usize].s_pk {
                return Err(SecAggError::KeyMismatch { index: d });
            }
            dropped_keys.push((d, sk, survivors));
        }

        for seed in &self_seeds {
            crypto::expand_mask(seed, &mut sum, false);
        }
        for (d, sk, survivors) in &dropped_keys {
            for &v in survivors {
                let dh = crypto::agree(sk, &roster.keys[v as usize].s_pk, v)?;
                let seed = crypto::mask_seed(self.round, &dh, *d, v)?;
                // Survivor v added the mask if d > v and subtracted it if
                // d < v; undo that.
                crypto::expand_mask(&seed, &mut sum, *d < v);
            }
        }
        Ok(Aggregate {
            sum,
            contributors: u3.iter().collect(),
        })
    }
}

fn check_index(index: u32, clients: u32) -> Result<(), SecAggError> {
    if index < clients {
        Ok(())
    } else {
        Err(SecAggError::IndexOutOfRange { index, clients })
    }
}

/// Checks that each of `clients` has at least `t` neighbours in `set`.
fn check_neighbourhoods(
    params: &Params,
    set: &Members,
    clients: impl Iterator<Item = u32>,
    stage: &'static str,
) -> Result<(), SecAggError> {
    for i in clients {
        let have = set.neighbours_in(params, i);
        if have < params.threshold as usize {
            return Err(SecAggError::NeighbourhoodTooSmall {
                index: i,
                stage,
                have,
                threshold: params.threshold,
            });
        }
    }
    Ok(())
}

/// Reconstructs the secret of `kind` of client `index` from the shares
/// revealed about it.
fn reconstruct(
    shares: &BTreeMap<u32, BTreeMap<u8, Zeroizing<Vec<u8>>>>,
    index: u32,
    kind: RevealKind,
    threshold: u32,
) -> Result<Zeroizing<[u8; 32]>, SecAggError> {
    let about: Vec<&[u8]> = shares
        .get(&index)
        .map(|m| m.values().map(|s| &s[..]).collect())
        .unwrap_or_default();
    crypto::combine(&about, threshold).map_err(|e| match e {
        CombineError::TooFew => SecAggError::NotEnoughShares {
            index,
            kind,
            got: about.len(),
            threshold,
        },
        CombineError::Inconsistent => SecAggError::InconsistentShares { index, kind },
    })
}

impl<P> fmt::Debug for Server<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Server");
        d.field("round", &self.round)
            .field("vector_len", &self.vector_len);
        match &self.state {
            State::Advertise { adverts, .. } => d
                .field("phase", &Phase::Advertise)
                .field("adverts", &adverts.len()),
            State::ShareKeys { roster, submitted } => d
                .field("phase", &Phase::ShareKeys)
                .field("params", &roster.params)
                .field("submitted", &submitted.len()),
            State::MaskedInput { roster, u2, u3, .. } => d
                .field("phase", &Phase::MaskedInput)
                .field("params", &roster.params)
                .field("u2", &u2.len())
                .field("u3", &u3.len()),
            State::Unmask(u) => d
                .field("phase", &Phase::Unmask)
                .field("params", &u.roster.params)
                .field("u2", &u.u2.len())
                .field("u3", &u.u3.len())
                .field("revealed", &u.revealed.len()),
            State::Aborted => d.field("phase", &Phase::Aborted),
        };
        d.finish()
    }
}
