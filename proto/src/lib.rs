//! Generated gRPC types and clients/servers of the `ghostwriter.v1` package.

#![allow(clippy::all, missing_docs)]

/// The `ghostwriter.v1` package.
pub mod v1 {
    tonic::include_proto!("ghostwriter.v1");
}

/// Encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("ghostwriter_descriptor");
