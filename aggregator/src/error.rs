//! Domain errors of the federation service and their one mapping to gRPC status codes.

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
    /// Too busy or budget spent: retry later.
    Exhausted,
    /// Shutting down.
    Unavailable,
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
        let code = match e.kind {
            Kind::Invalid => Code::InvalidArgument,
            Kind::Unauthenticated => Code::Unauthenticated,
            Kind::Denied => Code::PermissionDenied,
            Kind::WrongRound => Code::FailedPrecondition,
            Kind::Duplicate => Code::AlreadyExists,
            Kind::NotFound => Code::NotFound,
            Kind::Exhausted => Code::ResourceExhausted,
            Kind::Unavailable => Code::Unavailable,
            Kind::Internal => Code::Internal,
        };
        Status::new(code, e.message)
    }
}

impl From<crate::store::StoreError> for FedError {
    fn from(e: crate::store::StoreError) -> Self {
        FedError::internal("journal", e)
    }
}
