//! Phase 2: masked inputs added to the running sum, then U3 and the survivor lists.

use std::collections::BTreeMap;

use super::state::{Members, State, Unmasking};
use super::{check_index, check_neighbourhoods, Server};
use crate::secagg::error::SecAggError;
use crate::secagg::messages::Survivors;
use crate::secagg::phase::Phase;

impl<P: Ord + Clone> Server<P> {
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
}
