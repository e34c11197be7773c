//! The server's state in each phase, and the membership sets U2, U3 and the revealers.

use std::collections::{BTreeMap, BTreeSet};

use zeroize::Zeroizing;

use crate::secagg::messages::{EncryptedShare, KeyAdvert};
use crate::secagg::params::Params;

pub(super) enum State<P> {
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

pub(super) struct Unmasking {
    pub(super) roster: Roster,
    pub(super) u2: Members,
    pub(super) u3: Members,
    pub(super) sum: Vec<u32>,
    pub(super) revealed: Members,
    /// For each client, the shares revealed about it by x-coordinate. Which
    /// secret they are shares of follows from whether the client is in U3.
    pub(super) shares: BTreeMap<u32, BTreeMap<u8, Zeroizing<Vec<u8>>>>,
}

/// The parameters and every client's public keys, by index.
pub(super) struct Roster {
    pub(super) params: Params,
    pub(super) keys: Vec<KeyAdvert>,
}

/// A subset of `0..n`.
#[derive(Clone)]
pub(super) struct Members(Vec<bool>);

impl Members {
    pub(super) fn empty(n: u32) -> Members {
        Members(vec![false; n as usize])
    }
    pub(super) fn contains(&self, i: u32) -> bool {
        self.0.get(i as usize).copied().unwrap_or(false)
    }
    pub(super) fn insert(&mut self, i: u32) {
        if let Some(slot) = self.0.get_mut(i as usize) {
            *slot = true;
        }
    }
    pub(super) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, &m)| m)
            .map(|(i, _)| i as u32)
    }
    pub(super) fn len(&self) -> usize {
        self.0.iter().filter(|&&m| m).count()
    }
    pub(super) fn is_empty(&self) -> bool {
        !self.0.contains(&true)
    }
    /// How many of `i`'s neighbours are members.
    pub(super) fn neighbours_in(&self, params: &Params, i: u32) -> usize {
        params
            .neighbours_of(i)
            .into_iter()
            .filter(|&j| self.contains(j))
            .count()
    }
}
