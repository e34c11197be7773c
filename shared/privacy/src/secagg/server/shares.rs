//! Phase 1: encrypted shares, then U2 and the shares routed to each of its members.

use std::collections::{BTreeMap, BTreeSet};

use super::state::{Members, State};
use super::{check_index, check_neighbourhoods, Server};
use crate::secagg::crypto::CIPHERTEXT_LEN;
use crate::secagg::error::SecAggError;
use crate::secagg::messages::EncryptedShare;
use crate::secagg::phase::Phase;

impl<P: Ord + Clone> Server<P> {
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
}
