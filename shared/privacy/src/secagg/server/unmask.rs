//! Phase 3: reveals, then the secrets reconstructed, the masks removed and the sum.

use std::collections::{BTreeMap, BTreeSet};

use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

use super::state::{State, Unmasking};
use super::{check_index, Server};
use crate::secagg::crypto::{self, CombineError, SHARE_LEN};
use crate::secagg::error::SecAggError;
use crate::secagg::messages::{Aggregate, Reveal};
use crate::secagg::phase::Phase;
use crate::secagg::secret::RevealKind;

impl<P: Ord + Clone> Server<P> {
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
