//! A small etcd v3 client over tonic (the KV, Watch and Lease calls discovery needs), with the
//! protos compiled by protox: building it needs no protoc.
//!
//! [`Etcd::connect`] dials the given endpoints in turn and keeps the first that answers; callers
//! that lose it connect again (the registration and watch loops do). An `https://` endpoint is
//! dialed over mutual TLS with the process's mesh identity (`--tls-cert`, `--tls-key`,
//! `--tls-ca`, `--tls-server-name`); `http://` or a bare `host:port` in plaintext.

use ghostwriter_transport::Tls;
use ghostwriter_transport::client::connect_now;
use std::time::Duration;

use ghostwriter_proto::etcd::etcdserverpb::kv_client::KvClient;
use ghostwriter_proto::etcd::etcdserverpb::lease_client::LeaseClient;
use ghostwriter_proto::etcd::etcdserverpb::watch_client::WatchClient;
use ghostwriter_proto::etcd::etcdserverpb::watch_request::RequestUnion;
use ghostwriter_proto::etcd::etcdserverpb::{
    DeleteRangeRequest, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseRevokeRequest, PutRequest, RangeRequest, WatchCreateRequest, WatchRequest, WatchResponse,
};
use ghostwriter_proto::etcd::mvccpb::event::EventType;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

/// What can go wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint could be reached.
    #[error("no etcd endpoint reachable ({endpoints}): {last}")]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// The last connection error.
        last: String,
    },
    /// etcd answered with an error.
    #[error("etcd: {0}")]
    Status(#[from] tonic::Status),
    /// A stream (watch, keep-alive) ended.
    #[error("etcd closed the {0} stream")]
    Closed(&'static str),
    /// etcd refused a lease.
    #[error("etcd refused the lease: {0}")]
    Lease(String),
    /// etcd canceled a watch (e.g. its start revision was compacted).
    #[error("etcd canceled the watch: {0}")]
    Canceled(String),
}

/// A connection to one etcd member.
#[derive(Clone)]
pub struct Etcd {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    watch: WatchClient<Channel>,
}

/// One key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value (UTF-8 lossily).
    pub value: String,
}

/// A change under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The key was put.
    Put(KeyValue),
    /// The key was deleted (or its lease expired).
    Delete(String),
}

/// The end of the key range that holds every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

fn endpoint_url(e: &str) -> String {
    if e.contains("://") {
        e.to_string()
    } else {
        format!("http://{e}")
    }
}

/// Where etcd is: its endpoints (`host:port` or URLs), and the TLS an `https://` one is
/// dialed with (this process's mesh identity).
#[derive(Debug, Clone, Default)]
pub struct EtcdTarget {
    /// Endpoints, tried in turn.
    pub endpoints: Vec<String>,
    /// TLS for `https://` endpoints.
    pub tls: Option<Tls>,
}

impl EtcdTarget {
    /// Plain endpoints, no TLS.
    pub fn plain(endpoints: &[String]) -> Self {
        Self {
            endpoints: endpoints.to_vec(),
            tls: None,
        }
    }
}

impl Etcd {
    /// Connects to the first of the target's endpoints that answers.
    pub async fn connect(target: &EtcdTarget) -> Result<Self, EtcdError> {
        let endpoints = &target.endpoints;
        let mut last = String::from("no endpoints given");
        for e in endpoints {
            let endpoint = match Endpoint::from_shared(endpoint_url(e)) {
                Ok(endpoint) => endpoint
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(Duration::from_secs(5))
                    .tcp_nodelay(true),
                Err(err) => {
                    last = format!("{e}: {err}");
                    continue;
                }
            };
            // An https:// endpoint is dialed with this process's mesh TLS identity.
            let https = endpoint.uri().scheme_str() == Some("https");
            match connect_now(endpoint, https, target.tls.as_ref()).await {
                Ok(channel) => {
                    return Ok(Self {
                        kv: KvClient::new(channel.clone()),
                        lease: LeaseClient::new(channel.clone()),
                        watch: WatchClient::new(channel),
                    });
                }
                Err(err) => last = format!("{e}: {err}"),
            }
        }
        Err(EtcdError::Unreachable {
            endpoints: endpoints.join(","),
            last,
        })
    }

    /// Every key under `prefix` (with values unless `keys_only`), and the store's revision.
    pub async fn get_prefix(
        &mut self,
        prefix: &str,
        keys_only: bool,
    ) -> Result<(i64, Vec<KeyValue>), EtcdError> {
        let r = self
            .kv
            .range(RangeRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: prefix_end(prefix.as_bytes()),
                keys_only,
                ..Default::default()
            })
            .await?
            .into_inner();
        let revision = r.header.map_or(0, |h| h.revision);
        let kvs = r
            .kvs
            .into_iter()
            .map(|kv| KeyValue {
                key: String::from_utf8_lossy(&kv.key).into_owned(),
                value: String::from_utf8_lossy(&kv.value).into_owned(),
            })
            .collect();
        Ok((revision, kvs))
    }

    /// Puts `key` = `value`, attached to `lease` (0 = none).
    pub async fn put(&mut self, key: &str, value: &str, lease: i64) -> Result<(), EtcdError> {
        self.kv
            .put(PutRequest {
                key: key.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
                lease,
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// Deletes `key`; returns how many keys went.
    pub async fn delete(&mut self, key: &str) -> Result<i64, EtcdError> {
        Ok(self
            .kv
            .delete_range(DeleteRangeRequest {
                key: key.as_bytes().to_vec(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .deleted)
    }

    /// Grants a lease of `ttl` seconds; returns its id.
    pub async fn lease_grant(&mut self, ttl: i64) -> Result<i64, EtcdError> {
        let r = self
            .lease
            .lease_grant(LeaseGrantRequest { ttl, id: 0 })
            .await?
            .into_inner();
        if !r.error.is_empty() {
            return Err(EtcdError::Lease(r.error));
        }
        Ok(r.id)
    }

    /// Revokes a lease: its keys go at once.
    pub async fn lease_revoke(&mut self, id: i64) -> Result<(), EtcdError> {
        self.lease.lease_revoke(LeaseRevokeRequest { id }).await?;
        Ok(())
    }

    /// Opens a keep-alive stream for lease `id`, renewing it once.
    pub async fn keep_alive(&mut self, id: i64) -> Result<KeepAlive, EtcdError> {
        let (tx, rx) = mpsc::channel(4);
        // etcd answers the call (headers included) only once a request arrives: send the first
        // renewal before waiting for the response stream.
        tx.send(LeaseKeepAliveRequest { id })
            .await
            .map_err(|_| EtcdError::Closed("keep-alive"))?;
        let responses = self
            .lease
            .lease_keep_alive(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(KeepAlive {
            id,
            tx,
            responses,
            sent: true,
        })
    }

    /// Watches every key under `prefix` from `start_revision` on.
    pub async fn watch_prefix(
        &mut self,
        prefix: &str,
        start_revision: i64,
    ) -> Result<Watch, EtcdError> {
        let (tx, rx) = mpsc::channel(1);
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: prefix_end(prefix.as_bytes()),
                start_revision,
                ..Default::default()
            })),
        };
        tx.send(create)
            .await
            .map_err(|_| EtcdError::Closed("watch"))?;
        let responses = self
            .watch
            .watch(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Watch {
            _requests: tx,
            responses,
        })
    }
}

/// A lease's keep-alive stream.
pub struct KeepAlive {
    id: i64,
    tx: mpsc::Sender<LeaseKeepAliveRequest>,
    responses: Streaming<LeaseKeepAliveResponse>,
    /// A renewal was sent whose answer is not read yet.
    sent: bool,
}

impl KeepAlive {
    /// Renews the lease once; returns its remaining time-to-live in seconds (0 or less: the
    /// lease is gone).
    pub async fn renew(&mut self) -> Result<i64, EtcdError> {
        if !std::mem::take(&mut self.sent) {
            self.tx
                .send(LeaseKeepAliveRequest { id: self.id })
                .await
                .map_err(|_| EtcdError::Closed("keep-alive"))?;
        }
        match self.responses.message().await? {
            Some(r) => Ok(r.ttl),
            None => Err(EtcdError::Closed("keep-alive")),
        }
    }
}

/// A watch on a prefix.
pub struct Watch {
    // Kept open: etcd ends the watch when the request stream closes.
    _requests: mpsc::Sender<WatchRequest>,
    responses: Streaming<WatchResponse>,
}

impl Watch {
    /// The next batch of changes (empty for etcd's own notices, such as "created").
    pub async fn next(&mut self) -> Result<Vec<Change>, EtcdError> {
        let Some(r) = self.responses.message().await? else {
            return Err(EtcdError::Closed("watch"));
        };
        if r.canceled {
            return Err(EtcdError::Canceled(format!(
                "{} (compacted at {})",
                r.cancel_reason, r.compact_revision
            )));
        }
        Ok(r.events
            .into_iter()
            .filter_map(|e| {
                let kv = e.kv?;
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                Some(match EventType::try_from(e.r#type) {
                    Ok(EventType::Delete) => Change::Delete(key),
                    _ => Change::Put(KeyValue {
                        key,
                        value: String::from_utf8_lossy(&kv.value).into_owned(),
                    }),
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_covers_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(endpoint_url("127.0.0.1:2379"), "http://127.0.0.1:2379");
        assert_eq!(endpoint_url("https://etcd:2379"), "https://etcd:2379");
    }
}
