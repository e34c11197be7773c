//! The `fedpersona.v1` wire contract, generated from `proto/fedpersona/v1/*.proto` at build time.
//!
//! Only the gRPC edge modules of the aggregator and the device agent (and their conversions)
//! use these types; everything else works with domain types.

#![allow(missing_debug_implementations)]

pub mod auth;
pub mod convert;

/// `fedpersona.v1`: enrollment, check-in, tasks, model download, update upload, round status.
pub mod v1 {
    tonic::include_proto!("fedpersona.v1");

    /// The encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fedpersona_v1");
}

/// Typed refusals shared by both sides: the aggregator puts a [`v1::Refusal`] in the status
/// details of a refusal the device must act on; the device reads it back. Neither side
/// parses status messages.
pub mod refusal {
    use prost::Message;

    pub use crate::v1::RefusalReason as Reason;

    /// A status of `code` whose details carry `reason`.
    pub fn status(code: tonic::Code, reason: Reason, message: impl Into<String>) -> tonic::Status {
        let details = crate::v1::Refusal {
            reason: reason as i32,
        }
        .encode_to_vec();
        tonic::Status::with_details(code, message, details.into())
    }

    /// The reason a status carries; [`Reason::Unspecified`] when it carries none (an older
    /// aggregator, a transport error) or an unknown one.
    pub fn reason(s: &tonic::Status) -> Reason {
        crate::v1::Refusal::decode(s.details())
            .ok()
            .and_then(|r| Reason::try_from(r.reason).ok())
            .unwrap_or(Reason::Unspecified)
    }
}

/// `fedpersona.local.v1`: the device agent's local API for apps on the device (Unix socket).
pub mod local {
    tonic::include_proto!("fedpersona.local.v1");
}
