//! Why a local API call failed, and the one mapping of it to gRPC status. Messages that reach
//! the app never carry the user's text; internal failures are logged here with their cause
//! and reach the app only as "<what> failed".

use tonic::Status;

use crate::user::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The request is malformed or out of range; nothing changed.
    #[error("{0}")]
    Invalid(String),
    /// The interaction store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Anything else (files, the model, the tokenizer).
    #[error("{what} failed")]
    Internal {
        what: &'static str,
        #[source]
        source: anyhow::Error,
    },
}

impl LocalError {
    pub fn invalid(message: impl Into<String>) -> LocalError {
        LocalError::Invalid(message.into())
    }

    /// A failure of `what`: a store error inside `source` keeps its own status.
    pub fn internal(what: &'static str, source: impl Into<anyhow::Error>) -> LocalError {
        match source.into().downcast::<StoreError>() {
            Ok(e) => LocalError::Store(e),
            Err(source) => LocalError::Internal { what, source },
        }
    }
}

impl From<LocalError> for Status {
    fn from(e: LocalError) -> Status {
        match e {
            LocalError::Invalid(m) | LocalError::Store(StoreError::Invalid(m)) => {
                Status::invalid_argument(m)
            }
            LocalError::Store(e @ StoreError::Tampered { .. }) => Status::data_loss(e.to_string()),
            LocalError::Store(e) => {
                tracing::error!(error = %e, "interaction store");
                Status::internal("interaction store error")
            }
            LocalError::Internal { what, source } => {
                tracing::error!(error = %format!("{source:#}"), "{what}");
                Status::internal(format!("{what} failed"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn each_failure_has_its_status() {
        let cases = [
            (LocalError::invalid("text is empty"), Code::InvalidArgument),
            (
                StoreError::Invalid("rating 9".into()).into(),
                Code::InvalidArgument,
            ),
            (StoreError::Tampered { id: 7 }.into(), Code::DataLoss),
            (StoreError::Random.into(), Code::Internal),
            (
                LocalError::internal("generation", anyhow::anyhow!("boom")),
                Code::Internal,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(Status::from(e).code(), code);
        }
    }

    #[test]
    fn a_store_error_inside_an_internal_failure_keeps_its_status() {
        let e = anyhow::Error::new(StoreError::Tampered { id: 3 }).context("reading");
        // The context wraps it: `downcast` finds the store error under it.
        let status = Status::from(LocalError::internal("exporting", e));
        assert_eq!(status.code(), Code::DataLoss);
    }

    #[test]
    fn internal_causes_stay_in_the_log() {
        let cause = anyhow::anyhow!("the user's text: to be or not to be");
        let status = Status::from(LocalError::internal("computing the profile", cause));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "computing the profile failed");
    }
}
