//! Plain uploads: the header checked against the round before any data is read, then the
//! bytes validated (hash, decoding, shapes, finiteness, norm), journaled and added to the sum.

use fedpersona_privacy::codec::{self, DecodeLimits};
use fedpersona_privacy::mode;

use super::Coordinator;
use crate::auth::{now_ms, DeviceId};
use crate::config::{Config, PrivacyMode, Weighting};
use crate::error::{FedError, Kind};
use crate::versions::sha256;

/// An upload whose header passed every check; its data follows.
#[derive(Debug)]
pub struct UploadTicket {
    device: DeviceId,
    round: u64,
    nonce: Vec<u8>,
    total_bytes: u64,
    sha256: Vec<u8>,
    num_examples: u32,
}

impl UploadTicket {
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    pub fn device(&self) -> &DeviceId {
        &self.device
    }
}

/// The header fields of an upload.
#[derive(Debug, Clone)]
pub struct UploadHeader {
    pub round: u64,
    pub nonce: Vec<u8>,
    pub total_bytes: u64,
    pub sha256: Vec<u8>,
    pub num_examples: u32,
}

impl Coordinator {
    /// Checks an upload's header against the round before any data is read.
    pub fn begin_upload(
        &self,
        device: DeviceId,
        h: UploadHeader,
    ) -> Result<UploadTicket, FedError> {
        let wrong = |reason, msg: String| FedError::new(Kind::WrongRound, reason, msg);
        if h.nonce.len() != fedpersona_proto::auth::NONCE_LEN {
            return Err(FedError::invalid(
                "bad_header",
                "upload nonce must be 16 bytes",
            ));
        }
        if h.sha256.len() != 32 {
            return Err(FedError::invalid(
                "bad_header",
                "upload sha256 must be 32 bytes",
            ));
        }
        if h.total_bytes == 0 {
            return Err(FedError::invalid("bad_header", "upload is empty"));
        }
        if h.total_bytes > self.config.update.max_upload_bytes {
            return Err(FedError::invalid(
                "oversized",
                format!(
                    "upload of {} bytes exceeds the limit of {} bytes",
                    h.total_bytes, self.config.update.max_upload_bytes
                ),
            ));
        }
        if self.config.secure_aggregation.is_some() {
            return Err(wrong(
                "secagg_only",
                "this aggregator takes updates only through secure aggregation".into(),
            ));
        }
        {
            let st = self.lock();
            // A second report is already done, not out of place: a device resending an upload
            // whose answer it lost sees ALREADY_EXISTS, as for a replayed nonce.
            self.check_round(&st, &device, h.round)
                .map_err(|(reason, msg)| match reason {
                    "already_reported" => FedError::new(Kind::Duplicate, reason, msg),
                    _ => wrong(reason, msg),
                })?;
        }
        if self.store.nonce_seen(&h.nonce)? {
            return Err(FedError::new(
                Kind::Duplicate,
                "replay",
                "upload nonce was already used",
            ));
        }
        Ok(UploadTicket {
            device,
            round: h.round,
            nonce: h.nonce,
            total_bytes: h.total_bytes,
            sha256: h.sha256,
            num_examples: h.num_examples,
        })
    }

    /// Validates the upload's bytes and adds them to the round's sum. On any error nothing
    /// changed.
    pub fn finish_upload(&self, t: UploadTicket, bytes: &[u8]) -> Result<u32, FedError> {
        if bytes.len() as u64 != t.total_bytes {
            return Err(FedError::invalid(
                "truncated",
                format!(
                    "upload has {} bytes, header declared {}",
                    bytes.len(),
                    t.total_bytes
                ),
            ));
        }
        if sha256(bytes).as_slice() != t.sha256.as_slice() {
            return Err(FedError::invalid(
                "hash",
                "upload SHA-256 does not match its header",
            ));
        }
        let limits = DecodeLimits {
            max_tensors: self.spec.shapes().len(),
            max_values: self.spec.num_values(),
        };
        let update = codec::decode(bytes, &limits)
            .map_err(|e| FedError::invalid("malformed", format!("update does not decode: {e}")))?;
        let bound = {
            let st = self.lock();
            st.round
                .as_ref()
                .filter(|r| r.id == t.round)
                .map_or(self.spec.clip_norm(), |r| r.upload_bound(&self.spec))
        };
        self.spec
            .check_within(&update, bound)
            .map_err(|e| FedError::invalid(rejection_reason(&e), e.to_string()))?;
        let weight = match self.config.update.weighting {
            Weighting::Uniform => 1.0,
            Weighting::Examples { cap } => {
                if t.num_examples == 0 {
                    return Err(FedError::invalid(
                        "bad_header",
                        "num_examples must be positive",
                    ));
                }
                f64::from(t.num_examples.min(cap))
            }
        };
        let mut st = self.lock();
        self.check_round(&st, &t.device, t.round)
            .map_err(|(reason, msg)| FedError::new(Kind::WrongRound, reason, msg))?;
        // Journal first: a replay or a second report is refused before the sum changes.
        match self
            .store
            .record_upload(&t.nonce, t.round, &t.device.0, t.total_bytes, now_ms())?
        {
            Ok(()) => {}
            Err(crate::store::UploadConflict::Replay) => {
                return Err(FedError::new(
                    Kind::Duplicate,
                    "replay",
                    "upload nonce was already used",
                ))
            }
            Err(crate::store::UploadConflict::AlreadyReported) => {
                return Err(FedError::new(
                    Kind::Duplicate,
                    "already_reported",
                    format!("device already reported in round {}", t.round),
                ))
            }
        }
        let round = st.round.as_mut().expect("checked above");
        round
            .sum
            .add(&update, weight)
            .map_err(|e| internal("adding a checked update", e))?;
        *round.cohort.get_mut(&t.device).expect("checked above") = true;
        let reports = round.sum.count() as u32;
        if round.full(&self.config.rounds) {
            round.closing = true;
            self.round_full.notify_one();
        }
        drop(st);
        self.metrics.report(bytes.len());
        Ok(reports)
    }
}

/// The L2 bound uploads are held to: the clip norm, or with local noise the clip norm plus
/// a bound on the noise's norm (σ·(√d + 10), over ten standard deviations of a χ_d above its
/// mean) and the 8-bit encoding's rounding.
pub(super) fn norm_bound(config: &Config, values: usize) -> f64 {
    let c = f64::from(config.update.clip_norm);
    if config.privacy.mode != PrivacyMode::Local {
        return c;
    }
    mode::local_upload_norm_bound(c, config.privacy.noise_multiplier, values)
}

fn rejection_reason(e: &crate::aggregate::UpdateRejection) -> &'static str {
    use crate::aggregate::UpdateRejection as R;
    match e {
        R::UnexpectedTensor(_) | R::MissingTensor(_) | R::WrongShape { .. } => "shape",
        R::NonFinite(_) => "non_finite",
        R::NormTooLarge { .. } => "norm",
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> FedError {
    FedError::internal(what, e)
}

#[cfg(test)]
mod tests {
    use fedpersona_privacy::AdapterTensors;

    use super::UploadHeader;
    use crate::error::Kind;
    use crate::round::testing::{device, encode, header, refusal, report, start, update};

    #[test]
    fn headers_that_do_not_fit_are_refused_before_any_data() {
        let f = start(2, 1, |f| f.update.max_upload_bytes = 65536);
        let c = &f.coordinator;
        c.check_in(&device(1), 0);
        let bytes = update(c, 1e-3);
        let begin = |d: u32, edit: &dyn Fn(&mut UploadHeader)| {
            let mut h = header(1, 1, &bytes);
            edit(&mut h);
            refusal(c.begin_upload(device(d), h))
        };
        let invalid = |reason| (Kind::Invalid, reason);
        assert_eq!(
            begin(1, &|h| h.nonce.pop().map(drop).unwrap()),
            invalid("bad_header")
        );
        assert_eq!(begin(1, &|h| h.sha256.truncate(31)), invalid("bad_header"));
        assert_eq!(begin(1, &|h| h.total_bytes = 0), invalid("bad_header"));
        assert_eq!(begin(1, &|h| h.total_bytes = 65537), invalid("oversized"));
        assert_eq!(
            begin(1, &|h| h.round = 7),
            (Kind::WrongRound, "wrong_round")
        );
        assert_eq!(begin(2, &|_| {}), (Kind::WrongRound, "not_in_cohort"));
        assert_eq!(c.view().reports, 0);
    }

    #[test]
    fn data_that_does_not_check_is_refused_and_changes_nothing() {
        let f = start(2, 1, |_| {});
        let c = &f.coordinator;
        let d = device(1);
        c.check_in(&d, 0);
        let theta = c.theta();
        let finish = |bytes: &[u8], h: UploadHeader| {
            let ticket = c.begin_upload(d.clone(), h).unwrap();
            refusal(c.finish_upload(ticket, bytes))
        };
        let good = update(c, 1e-3);
        let mut short = header(1, 1, &good);
        short.total_bytes += 1;
        assert_eq!(finish(&good, short), (Kind::Invalid, "truncated"));
        let mut other = header(1, 1, &good);
        other.sha256 = vec![0; 32];
        assert_eq!(finish(&good, other), (Kind::Invalid, "hash"));
        let garbage = b"not an update".to_vec();
        assert_eq!(
            finish(&garbage, header(1, 1, &garbage)),
            (Kind::Invalid, "malformed")
        );
        let mut wrong = AdapterTensors::default();
        wrong.insert(c.spec().shapes()[0].0.clone(), vec![3, 3], vec![0.0; 9]);
        let wrong = encode(&wrong);
        assert_eq!(
            finish(&wrong, header(1, 1, &wrong)),
            (Kind::Invalid, "shape")
        );
        // The codec already refuses a NaN, before the update's own checks.
        let nan = update(c, f32::NAN);
        assert_eq!(
            finish(&nan, header(1, 1, &nan)),
            (Kind::Invalid, "malformed")
        );
        let big = update(c, 1.0);
        assert_eq!(finish(&big, header(1, 1, &big)), (Kind::Invalid, "norm"));

        assert_eq!(c.view().reports, 0);
        assert_eq!(c.theta(), theta);
        // Neither the nonce nor the device's report was used up.
        assert_eq!(report(c, &d, 1, 1).unwrap(), 1);
    }

    #[test]
    fn a_replayed_nonce_or_a_second_report_is_refused() {
        let f = start(3, 1, |_| {});
        let c = &f.coordinator;
        for n in 1..=3 {
            c.check_in(&device(n), 0);
        }
        assert_eq!(report(c, &device(1), 1, 1).unwrap(), 1);
        assert_eq!(
            refusal(report(c, &device(2), 1, 1)),
            (Kind::Duplicate, "replay")
        );
        assert_eq!(
            refusal(report(c, &device(1), 1, 2)),
            (Kind::Duplicate, "already_reported")
        );
        // Two uploads begun with one nonce: the journal refuses the second.
        let bytes = update(c, 1e-3);
        let a = c.begin_upload(device(2), header(1, 5, &bytes)).unwrap();
        let b = c.begin_upload(device(3), header(1, 5, &bytes)).unwrap();
        assert_eq!(c.finish_upload(a, &bytes).unwrap(), 2);
        assert_eq!(
            refusal(c.finish_upload(b, &bytes)),
            (Kind::Duplicate, "replay")
        );
        assert_eq!(c.view().reports, 2);
    }

    #[test]
    fn weighting_by_examples_needs_a_positive_count() {
        let f = start(2, 1, |f| f.update.weighting = "examples".into());
        let c = &f.coordinator;
        c.check_in(&device(1), 0);
        let bytes = update(c, 1e-3);
        let mut h = header(1, 1, &bytes);
        h.num_examples = 0;
        let ticket = c.begin_upload(device(1), h).unwrap();
        assert_eq!(
            refusal(c.finish_upload(ticket, &bytes)),
            (Kind::Invalid, "bad_header")
        );
        assert_eq!(c.view().reports, 0);
    }

    #[test]
    fn with_secure_aggregation_plain_uploads_are_refused() {
        let f = start(3, 3, |f| f.secure_aggregation.enabled = true);
        let c = &f.coordinator;
        c.check_in(&device(1), 0);
        let bytes = update(c, 1e-3);
        assert_eq!(
            refusal(c.begin_upload(device(1), header(1, 1, &bytes))),
            (Kind::WrongRound, "secagg_only")
        );
    }
}
