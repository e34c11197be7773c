//! Domain errors of the federation service and their one mapping to gRPC status codes.

use fedpersona_proto::refusal::{self, Reason};
use tonic::{Code, Status};

/// What went wrong, by what the caller should do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Malformed or out-of-bounds input: do not retry as is.
    Invalid,
    /// No valid credentials.
    Unauthenticated,
    /// Valid credentials, not allowed (revoked device, bad enrollment token, not in cohort).
    Denied,
    /// Not for this round (wrong or closed round, late).
    WrongRound,
    /// Already done (a replayed nonce, a second report).
    Duplicate,
    NotFound,
    /// The privacy budget is spent for good: no round will open again, so retrying cannot
    /// help (FAILED_PRECONDITION, refusal reason PRIVACY_BUDGET_EXHAUSTED).
    BudgetSpent,
    /// Shutting down.
    Unavailable,
    /// The client was too slow (a stalled upload).
    TimedOut,
    /// A fault of the server (storage, bug): logged, no detail leaves.
    Internal,
}

/// A refused or failed request. `reason` is a short, fixed label for metrics.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct FedError {
    pub kind: Kind,
    pub reason: &'static str,
    pub message: String,
}

impl FedError {
    pub fn new(kind: Kind, reason: &'static str, message: impl Into<String>) -> Self {
        FedError {
            kind,
            reason,
            message: message.into(),
        }
    }

    pub fn invalid(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(Kind::Invalid, reason, message)
    }

    /// A server-side fault; the detail is logged here and not sent.
    pub fn internal(what: &str, err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "{what}");
        Self::new(Kind::Internal, "internal", "internal error")
    }
}

impl From<FedError> for Status {
    fn from(e: FedError) -> Status {
        let (code, reason) = match e.kind {
            Kind::Invalid => (Code::InvalidArgument, None),
            Kind::Unauthenticated => (Code::Unauthenticated, None),
            Kind::Denied => (Code::PermissionDenied, None),
            Kind::WrongRound => (Code::FailedPrecondition, None),
            Kind::Duplicate => (Code::AlreadyExists, None),
            Kind::NotFound => (Code::NotFound, None),
            Kind::BudgetSpent => (
                Code::FailedPrecondition,
                Some(Reason::PrivacyBudgetExhausted),
            ),
            Kind::Unavailable => (Code::Unavailable, None),
            Kind::TimedOut => (Code::DeadlineExceeded, None),
            Kind::Internal => (Code::Internal, None),
        };
        match reason {
            Some(reason) => refusal::status(code, reason, e.message),
            None => Status::new(code, e.message),
        }
    }
}

impl From<crate::store::StoreError> for FedError {
    fn from(e: crate::store::StoreError) -> Self {
        FedError::internal("journal", e)
    }
}
