//! The server's side of one round: [`Server`], its state, and one module per phase
//! (`advertise`, `shares`, `masked`, `unmask`), each adding the phase's `submit_*` and
//! `close_*` (or `finish`).

mod advertise;
mod masked;
mod shares;
mod state;
mod unmask;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::error::SecAggError;
use super::params::Params;
use super::phase::Phase;
use state::{Members, State};

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
