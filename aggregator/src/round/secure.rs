//! The round side of secure aggregation: a device's step in the current SecAgg+ phase routed
//! to the open round's [`SecureRound`] (in `crate::secure`), and its answer once the phase closes.

use fedpersona_privacy::secagg::{EncryptedShare, Phase, Reveal};
use tokio::sync::watch;

use super::{Coordinator, OpenRound};
use crate::auth::{now_ms, DeviceId};
use crate::error::{FedError, Kind};
use crate::secure::{Peer, Reply, SecureRound};

/// A device's part in one phase of secure aggregation.
#[derive(Debug)]
pub enum SecureStep {
    Advertise {
        c_pk: [u8; 32],
        s_pk: [u8; 32],
        signature: Vec<u8>,
    },
    Shares(Vec<EncryptedShare>),
    Masked(Vec<u32>),
    Reveals(Vec<Reveal>),
}

impl Coordinator {
    /// Records a device's part in the current phase of secure aggregation. Returns the phase
    /// it was part of and a receiver that changes when a phase closes; [`Self::secure_reply`]
    /// then has the device's answer.
    pub fn secure_submit(
        &self,
        device: &DeviceId,
        round: u64,
        step: SecureStep,
    ) -> Result<(Phase, watch::Receiver<u64>), FedError> {
        let wrong = |(reason, msg)| FedError::new(Kind::WrongRound, reason, msg);
        let device_key = match &step {
            SecureStep::Advertise { .. } => Some(
                self.store
                    .device(&device.0)?
                    .ok_or_else(|| FedError::internal("secagg", "enrolled device vanished"))?
                    .0,
            ),
            _ => None,
        };
        let mut st = self.lock();
        if matches!(step, SecureStep::Advertise { .. }) {
            self.check_round(&st, device, round).map_err(wrong)?;
        }
        let r = st.round.as_mut();
        let secure = OpenRound::secure_of(r, round)?;
        let phase = secure.phase();
        let mut advertised = false;
        let mut masked_bytes = None;
        match step {
            SecureStep::Advertise {
                c_pk,
                s_pk,
                signature,
            } => {
                let peer = Peer {
                    c_pk,
                    s_pk,
                    signature,
                    device_key: device_key.expect("looked up above"),
                };
                secure.advertise(device, round, peer)?;
                advertised = true;
            }
            SecureStep::Shares(shares) => secure.submit_shares(device, shares)?,
            SecureStep::Masked(values) => {
                secure.check_masked(device, values.len())?;
                // Journal first: a second report of this device is refused durably.
                let mut nonce = [0u8; 16];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
                    .map_err(|_| FedError::internal("secagg", "no system randomness"))?;
                let bytes = values.len() * 4;
                match self
                    .store
                    .record_upload(&nonce, round, &device.0, bytes as u64, now_ms())?
                {
                    Ok(()) => {}
                    Err(_) => {
                        return Err(FedError::new(
                            Kind::Duplicate,
                            "already_reported",
                            format!("device already reported in round {round}"),
                        ))
                    }
                }
                secure.submit_masked(device, values)?;
                masked_bytes = Some(bytes);
            }
            SecureStep::Reveals(reveals) => secure.submit_reveals(device, reveals)?,
        }
        let rx = secure.subscribe();
        let round = st.round.as_mut().expect("checked above");
        if let Some(bytes) = masked_bytes {
            round.cohort.insert(device.clone(), true);
            self.metrics.report(bytes);
        }
        if advertised && round.full(&self.config.rounds) {
            round.closing = true;
        }
        drop(st);
        // The driver re-checks whether the phase can close.
        self.round_full.notify_one();
        Ok((phase, rx))
    }

    /// The device's answer once `after`, a phase it took part in, has closed (None while it
    /// is still open).
    pub fn secure_reply(
        &self,
        device: &DeviceId,
        round: u64,
        after: Phase,
    ) -> Result<Option<Reply>, FedError> {
        let mut st = self.lock();
        let secure = OpenRound::secure_of(st.round.as_mut(), round)?;
        if secure.phase() == after {
            return Ok(None);
        }
        secure.reply(device, after).map(Some)
    }
}

impl OpenRound {
    /// The secure-aggregation state of round `id`, if that round is open and secure.
    fn secure_of(round: Option<&mut OpenRound>, id: u64) -> Result<&mut SecureRound, FedError> {
        let Some(r) = round.filter(|r| r.id == id) else {
            return Err(FedError::new(
                Kind::WrongRound,
                "wrong_round",
                format!("round {id} is not open"),
            ));
        };
        r.secure.as_mut().ok_or_else(|| {
            FedError::new(
                Kind::WrongRound,
                "no_secagg",
                "this round does not use secure aggregation",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use fedpersona_privacy::secagg::Phase;

    use super::SecureStep;
    use crate::auth::now_ms;
    use crate::error::Kind;
    use crate::round::testing::{device, refusal, start};

    #[test]
    fn secure_steps_need_an_open_secure_round() {
        let f = start(2, 1, |_| {});
        let c = &f.coordinator;
        c.check_in(&device(1), 0);
        let shares = |round| c.secure_submit(&device(1), round, SecureStep::Shares(Vec::new()));
        assert_eq!(refusal(shares(1)), (Kind::WrongRound, "no_secagg"));
        assert_eq!(refusal(shares(7)), (Kind::WrongRound, "wrong_round"));
        assert_eq!(
            refusal(c.secure_reply(&device(1), 1, Phase::Advertise)),
            (Kind::WrongRound, "no_secagg")
        );
    }

    #[test]
    fn an_advert_needs_an_assigned_device_and_waits_for_its_phase() {
        let f = start(3, 3, |f| f.secure_aggregation.enabled = true);
        let c = &f.coordinator;
        let d = device(1);
        c.store().enroll(&d.0, &[7; 32], now_ms()).unwrap();
        let advert = || SecureStep::Advertise {
            c_pk: [1; 32],
            s_pk: [2; 32],
            signature: vec![0; 64],
        };
        assert_eq!(
            refusal(c.secure_submit(&d, 1, advert())),
            (Kind::WrongRound, "not_in_cohort")
        );
        assert_eq!(
            c.secure_reply(&d, 1, Phase::Advertise).unwrap().map(drop),
            None
        );
        assert_eq!(c.view().reports, 0);
    }
}
