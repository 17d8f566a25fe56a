//! Generated gRPC types and clients/servers of the `ghostwriter.v1` package, and the clients of
//! the subset of etcd's v3 API that discovery uses.

#![allow(clippy::all, missing_docs)]

/// The `ghostwriter.v1` package.
pub mod v1 {
    tonic::include_proto!("ghostwriter.v1");
}

/// etcd's v3 API (KV, Watch, Lease), trimmed to what discovery uses; clients only.
pub mod etcd {
    /// Keys, values and watch events (`mvccpb`).
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    /// The KV, Watch and Lease services (`etcdserverpb`).
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

/// Encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("ghostwriter_descriptor");
