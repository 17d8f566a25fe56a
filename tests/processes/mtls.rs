//! Mutual TLS against a real stage process (the retriever): its internal API answers only
//! callers that present a certificate of the mesh's CA, never plaintext, an anonymous TLS caller
//! or another CA's certificate; when its certificate files are replaced (a rotation to a new
//! CA), new connections use the new ones without a restart; readiness stays readable over plain
//! HTTP (`/readyz` on the metrics port) for probes that cannot speak TLS.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ghostwriter::proto::RetrieveRequest;
use ghostwriter::proto::retriever_client::RetrieverClient;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tonic::transport::{Channel, Endpoint};

/// A CA and one certificate it signed, as PEM: (ca, cert, key).
fn authority(name: &str) -> (String, String, String) {
    let a = ghostwriter::processes::Authority::new(name).unwrap();
    (a.ca, a.cert, a.key)
}

/// Replaces the files the server watches, each atomically (write, then rename).
fn install(dir: &Path, (ca, cert, key): &(String, String, String)) {
    for (name, pem) in [("ca.pem", ca), ("cert.pem", cert), ("key.pem", key)] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, pem).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

/// A channel that trusts `ca` and presents `identity` (cert, key), or nothing.
fn tls_channel(addr: &str, ca: &str, identity: Option<(&str, &str)>) -> Channel {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let config = Arc::new(config);
    let addr = addr.to_string();
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
            let (config, addr) = (config.clone(), addr.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = ServerName::try_from("ghostwriter").unwrap();
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
}

async fn retrieve(channel: Channel) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(RetrieveRequest {
        user_id: "u".into(),
        query: "strings".into(),
        limit: 1,
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(5));
    RetrieverClient::new(channel)
        .retrieve(request)
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_apis_need_the_mesh_identity_and_certificates_reload() {
    let _slot = crate::common::slot(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let first = authority("mesh CA 1");
    let second = authority("mesh CA 2");
    install(&tls, &first);
    let mut cmd = common::ghostwriter();
    cmd.arg(format!("--tls-cert={}", tls.join("cert.pem").display()))
        .arg(format!("--tls-key={}", tls.join("key.pem").display()))
        .arg(format!("--tls-ca={}", tls.join("ca.pem").display()))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .arg("--model-dir")
        .arg(common::model_dir())
        .arg("retriever")
        .arg("--index-dir")
        .arg(dir.path().join("index"))
        .env("RUST_LOG", "warn");
    let server = common::start("retriever", cmd).await;
    assert!(server.url().starts_with("https://"), "{}", server.url());
    let addr = server.url().trim_start_matches("https://").to_string();
    let metrics = common::metrics_addr(&server);
    let member = |(ca, cert, key): &(String, String, String)| {
        tls_channel(&addr, ca, Some((cert.as_str(), key.as_str())))
    };
    let started = Instant::now();
    while let Err(e) = retrieve(member(&first)).await {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the retriever never answered a mesh member: {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Probes that cannot speak TLS gRPC (the kubelet's) read readiness over plain HTTP.
    let readyz = common::http_get(&metrics, "/readyz").await;
    assert!(readyz.starts_with("HTTP/1.1 200"), "{readyz}");

    // Plaintext, an anonymous TLS caller, and a certificate of another CA are all refused.
    let plain = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    assert!(retrieve(plain).await.is_err(), "plaintext reached Retrieve");
    let anonymous = tls_channel(&addr, &first.0, None);
    assert!(
        retrieve(anonymous).await.is_err(),
        "a caller without a certificate reached Retrieve"
    );
    let stranger = tls_channel(&addr, &first.0, Some((&second.1, &second.2)));
    assert!(
        retrieve(stranger).await.is_err(),
        "another CA's certificate reached Retrieve"
    );

    // Rotation: the files now hold the second CA's; new connections switch without a restart.
    install(&tls, &second);
    let started = Instant::now();
    while retrieve(member(&second)).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the new certificates were never used"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        retrieve(member(&first)).await.is_err(),
        "the old CA's certificate still works after the rotation"
    );
}
