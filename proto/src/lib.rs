//! The `fedpersona.v1` wire contract, generated from `proto/fedpersona/v1/*.proto` at build time.
//!
//! Only the gRPC edge modules of the aggregator and the device agent (and their conversions)
//! use these types; everything else works with domain types.

#![allow(missing_debug_implementations)]

pub mod auth;

/// `fedpersona.v1`: enrollment, check-in, tasks, model download, update upload, round status.
pub mod v1 {
    tonic::include_proto!("fedpersona.v1");

    /// The encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fedpersona_v1");
}

/// `fedpersona.local.v1`: the device agent's local API for apps on the device (Unix socket).
pub mod local {
    tonic::include_proto!("fedpersona.local.v1");
}
