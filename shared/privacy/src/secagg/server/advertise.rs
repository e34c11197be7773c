//! Phase 0: key adverts, then the indices, parameters and assignments.

use std::collections::BTreeMap;

use super::state::{Roster, State};
use super::Server;
use crate::secagg::crypto;
use crate::secagg::error::SecAggError;
use crate::secagg::messages::{Assignment, KeyAdvert};
use crate::secagg::params::{Params, MAX_CLIENTS};

impl<P: Ord + Clone> Server<P> {
    /// Phase 0: records participant `p`'s public keys. The caller has
    /// verified `p`'s signature over
    /// [`advert_signing_bytes`](crate::secagg::advert_signing_bytes). Rejects a
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
}
