//! One round's secure aggregation at the aggregator: the SecAgg+ server state machine
//! (`fedpersona_privacy::secagg`) behind the four `SecureAggregate` calls, with a deadline
//! per phase.
//!
//! Phases: *advertise* (open while the round is; a device advertises once it has trained, so
//! the phase closes when the round has its target reports or at the round's deadline), then
//! *share keys*, *masked input* and *unmask*, each closing when every device that can still
//! take part has answered or after `phase_timeout`. A device that misses a phase is out of
//! the round; its mask is removed with its neighbours' shares. Each submission waits (in the
//! service) until its phase closes, then gets what the next phase needs.

use std::collections::HashMap;
use std::time::Instant;

use fedpersona_privacy::secagg::{self, Assignment, EncryptedShare, Phase, Reveal, Survivors};
use tokio::sync::watch;

use crate::auth::DeviceId;
use crate::config::SecAggPolicy;
use crate::error::{FedError, Kind};

/// A device's signed key advert, as its neighbours receive it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub c_pk: [u8; 32],
    pub s_pk: [u8; 32],
    pub signature: Vec<u8>,
    pub device_key: Vec<u8>,
}

/// What a device gets once a phase it took part in has closed.
#[derive(Debug, Clone)]
pub enum Reply {
    /// After advertise: its index, the parameters, and its neighbours' signed adverts.
    Assignment {
        assignment: Assignment,
        peers: Vec<(u32, Peer)>,
    },
    /// After share keys: the encrypted shares addressed to it.
    Shares(Vec<EncryptedShare>),
    /// After masked input: who survived and who dropped.
    Survivors(Survivors),
    /// After unmask.
    Done,
}

/// What closing the current phase led to.
#[derive(Debug)]
pub enum Advance {
    /// The next phase is open.
    Next,
    /// Every phase is done: the caller unmasks the sum (slow; outside any lock).
    Finish(secagg::Server<Participant>),
    /// Too few devices were left: the round ends without a result.
    Aborted(String),
}

/// The secure-aggregation state of an open round.
#[derive(Debug)]
pub struct SecureRound {
    server: Option<secagg::Server<Participant>>,
    policy: SecAggPolicy,
    peers: HashMap<DeviceId, Peer>,
    assignments: HashMap<DeviceId, Assignment>,
    shares_for: HashMap<u32, Vec<EncryptedShare>>,
    survivors: Option<Survivors>,
    /// Devices that may still submit in the current phase (after advertise).
    waiting_for: usize,
    phase_deadline: Option<Instant>,
    aborted: Option<String>,
    /// Bumped whenever a phase closes (or the round ends), to wake waiting calls.
    changed: watch::Sender<u64>,
}

/// The order that fixes indices, and so the neighbour graph: SHA-256 of the round and the
/// device id, which no device can choose to sit next to another.
type Participant = ([u8; 32], DeviceId);

fn participant(round: u64, device: &DeviceId) -> Participant {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"fedpersona/secagg/order");
    ctx.update(&round.to_be_bytes());
    ctx.update(device.0.as_bytes());
    let digest = ctx.finish();
    (
        digest.as_ref().try_into().expect("SHA-256 is 32 bytes"),
        device.clone(),
    )
}

fn refuse(e: secagg::SecAggError) -> FedError {
    FedError::invalid("secagg", e.to_string())
}

impl SecureRound {
    pub fn new(round: u64, vector_len: usize, policy: SecAggPolicy) -> Self {
        SecureRound {
            server: Some(secagg::Server::new(round, vector_len)),
            policy,
            peers: HashMap::new(),
            assignments: HashMap::new(),
            shares_for: HashMap::new(),
            survivors: None,
            waiting_for: 0,
            phase_deadline: None,
            aborted: None,
            changed: watch::Sender::new(0),
        }
    }

    fn server(&mut self) -> Result<&mut secagg::Server<Participant>, FedError> {
        self.server.as_mut().ok_or_else(|| {
            FedError::new(
                Kind::WrongRound,
                "secagg_done",
                "secure aggregation is over",
            )
        })
    }

    /// The phase open now (Aborted once the round has no result coming).
    pub fn phase(&self) -> Phase {
        match (&self.aborted, &self.server) {
            (Some(_), _) | (None, None) => Phase::Aborted,
            (None, Some(s)) => s.phase(),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// When the current phase (after advertise) should close: now if nobody is left to wait
    /// for, else at its deadline.
    pub fn phase_due(&self) -> Option<Instant> {
        match self.phase() {
            Phase::Advertise | Phase::Aborted => None,
            _ if self.waiting_for == 0 => Some(Instant::now()),
            _ => self.phase_deadline,
        }
    }

    /// Records a device's key advert; `device_key` is its enrolled Ed25519 key, which must
    /// have signed the advert. Returns the number of adverts so far.
    pub fn advertise(
        &mut self,
        device: &DeviceId,
        round: u64,
        peer: Peer,
    ) -> Result<usize, FedError> {
        let msg = secagg::advert_signing_bytes(round, &peer.c_pk, &peer.s_pk);
        if !fedpersona_proto::auth::verify(&peer.device_key, &msg, &peer.signature) {
            return Err(FedError::new(
                Kind::Unauthenticated,
                "bad_signature",
                "key advert signature does not verify",
            ));
        }
        self.server()?
            .advertise(participant(round, device), peer.c_pk, peer.s_pk)
            .map_err(refuse)?;
        self.peers.insert(device.clone(), peer);
        Ok(self.peers.len())
    }

    /// Key adverts received so far.
    pub fn adverts(&self) -> usize {
        self.peers.len()
    }

    fn index(&self, device: &DeviceId) -> Result<u32, FedError> {
        self.assignments
            .get(device)
            .map(|a| a.index)
            .ok_or_else(|| {
                FedError::new(
                    Kind::WrongRound,
                    "not_in_secagg",
                    "device has no part in this round's secure aggregation",
                )
            })
    }

    fn submitted(&mut self) {
        self.waiting_for = self.waiting_for.saturating_sub(1);
    }

    pub fn submit_shares(
        &mut self,
        device: &DeviceId,
        shares: Vec<EncryptedShare>,
    ) -> Result<(), FedError> {
        let index = self.index(device)?;
        self.server()?
            .submit_shares(index, shares)
            .map_err(refuse)?;
        self.submitted();
        Ok(())
    }

    /// Whether `device` may send a masked input of `len` words now: the phase, its part in
    /// the key sharing, the length. Checked before the upload is journaled, so a refused
    /// input leaves no trace.
    pub fn check_masked(&self, device: &DeviceId, len: usize) -> Result<(), FedError> {
        let phase = self.phase();
        if phase != Phase::MaskedInput {
            return Err(FedError::new(
                Kind::WrongRound,
                "secagg_phase",
                format!("secure aggregation is in phase {phase}, not masked-input"),
            ));
        }
        let index = self.index(device)?;
        if !self.shares_for.contains_key(&index) {
            return Err(FedError::new(
                Kind::WrongRound,
                "not_in_secagg",
                "device did not share its keys in this round",
            ));
        }
        let want = self.server.as_ref().map_or(0, |s| s.vector_len());
        if len != want {
            return Err(FedError::invalid(
                "shape",
                format!("masked input has {len} words, expected {want}"),
            ));
        }
        Ok(())
    }

    pub fn submit_masked(&mut self, device: &DeviceId, masked: Vec<u32>) -> Result<(), FedError> {
        let index = self.index(device)?;
        self.server()?
            .submit_masked(index, masked)
            .map_err(refuse)?;
        self.submitted();
        Ok(())
    }

    pub fn submit_reveals(
        &mut self,
        device: &DeviceId,
        reveals: Vec<Reveal>,
    ) -> Result<(), FedError> {
        let index = self.index(device)?;
        self.server()?
            .submit_reveals(index, reveals)
            .map_err(refuse)?;
        self.submitted();
        Ok(())
    }

    /// What `device` gets after the phase `after` closed (an error if it was not part of it,
    /// or the round was aborted).
    pub fn reply(&self, device: &DeviceId, after: Phase) -> Result<Reply, FedError> {
        if let Some(why) = &self.aborted {
            return Err(FedError::new(
                Kind::WrongRound,
                "secagg_aborted",
                format!("secure aggregation of this round was aborted: {why}"),
            ));
        }
        let index = self.index(device);
        Ok(match after {
            Phase::Advertise => {
                let assignment = self
                    .assignments
                    .get(device)
                    .cloned()
                    .ok_or_else(|| index.clone().unwrap_err())?;
                let by_index: HashMap<u32, &DeviceId> =
                    self.assignments.iter().map(|(d, a)| (a.index, d)).collect();
                let peers = assignment
                    .neighbours
                    .iter()
                    .map(|n| (n.index, self.peers[by_index[&n.index]].clone()))
                    .collect();
                Reply::Assignment { assignment, peers }
            }
            Phase::ShareKeys => {
                Reply::Shares(self.shares_for.get(&index?).cloned().unwrap_or_default())
            }
            Phase::MaskedInput => {
                index?;
                Reply::Survivors(self.survivors.clone().unwrap_or_default())
            }
            Phase::Unmask | Phase::Aborted => {
                index?;
                Reply::Done
            }
        })
    }

    /// Closes the current phase and opens the next.
    pub fn advance(&mut self) -> Advance {
        let Some(server) = self.server.as_mut() else {
            return Advance::Aborted("secure aggregation is over".into());
        };
        let deadline = Instant::now() + self.policy.phase_timeout;
        let result = match server.phase() {
            Phase::Advertise => {
                server
                    .close_advertise(self.policy.max_neighbours)
                    .map(|assigned| {
                        self.waiting_for = assigned.len();
                        self.assignments = assigned.into_iter().map(|((_, d), a)| (d, a)).collect();
                    })
            }
            Phase::ShareKeys => server.close_shares().map(|routed| {
                self.waiting_for = routed.len();
                self.shares_for = routed.into_iter().collect();
            }),
            Phase::MaskedInput => server.close_masked().map(|s| {
                self.waiting_for = s.survivors.len();
                self.survivors = Some(s);
            }),
            Phase::Unmask => {
                let server = self.server.take().expect("checked above");
                self.changed.send_modify(|g| *g += 1);
                return Advance::Finish(server);
            }
            Phase::Aborted => Err(secagg::SecAggError::NoneLeft { stage: "aborted" }),
        };
        let advance = match result {
            Ok(()) => {
                self.phase_deadline = Some(deadline);
                Advance::Next
            }
            Err(e) => {
                let why = e.to_string();
                self.aborted = Some(why.clone());
                self.server = None;
                Advance::Aborted(why)
            }
        };
        self.changed.send_modify(|g| *g += 1);
        advance
    }

    /// Marks the round's secure aggregation as failed (unmasking went wrong).
    pub fn abort(&mut self, why: String) {
        self.aborted = Some(why);
        self.server = None;
        self.changed.send_modify(|g| *g += 1);
    }
}
