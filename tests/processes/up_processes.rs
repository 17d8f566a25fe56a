//! `up --processes` through the real binary and a real etcd: the processes speak mutual TLS with
//! a throwaway CA, every preset works (the summarizer process reaches the generator process),
//! and ctrl-c stops the processes in order. In its own
//! test binary so its etcd and stage processes never race the discovery tests for ports.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::{Duration, Instant};

use ghostwriter::proto::Document;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_processes_serves_every_preset_and_stops_in_order() {
    let _slot = crate::common::slot(module_path!());
    let dir = tempfile::tempdir().unwrap();
    if !common::etcd_installed() {
        return;
    }
    let mut cmd = common::ghostwriter();
    cmd.args(["up", "--processes", "--listen", "127.0.0.1:0"])
        .arg("--model-dir")
        .arg(common::model_dir())
        .arg("--index-dir")
        .arg(dir.path().join("index"))
        .env("RUST_LOG", "warn");
    // `up --processes` says where it listens once every stage process serves; its whole log
    // is kept. Stopped by ctrl-c even when an assertion fails: the stage processes have their
    // own process groups, so only the parent can stop them.
    struct Interrupt(common::StageProcess);
    impl Drop for Interrupt {
        fn drop(&mut self) {
            if self.0.try_wait().is_none() && self.0.signal("INT").is_ok() {
                let started = Instant::now();
                while self.0.try_wait().is_none() && started.elapsed() < Duration::from_secs(30) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
    let mut guard = Interrupt(
        common::StageProcess::spawn_keeping("up --processes", cmd, usize::MAX)
            .await
            .unwrap_or_else(|e| panic!("{e:#}")),
    );
    let up = &mut guard.0;
    let url = up.url().to_string();
    assert!(url.starts_with("https://"), "{url}");
    // The processes speak mutual TLS with a throwaway CA; callers of the public API need only
    // the CA (they authenticate with tokens, not certificates).
    // The listening line comes first; the addresses it reports (the CA, etcd, each stage) follow.
    up.wait_log(Duration::from_secs(30), |l| l.trim().starts_with("etcd "))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let log = up.log_lines().join("\n");
    let ca = log
        .lines()
        .find_map(|l| l.trim().strip_prefix("callers: --tls-ca "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no CA in the log:\n{log}"));
    let tls = ghostwriter_transport::Tls::from_args(&ghostwriter_transport::tls::TlsArgs {
        ca: Some(ca.into()),
        server_name: ghostwriter_transport::tls::DEFAULT_SERVER_NAME.into(),
        ..Default::default()
    })
    .unwrap();
    let tls = tls.as_ref();
    // Without TLS the public API does not answer.
    let plain =
        ghostwriter::proto::ghostwriter_client::GhostwriterClient::connect(url.clone()).await;
    if let Ok(mut plain) = plain {
        plain
            .ingest(ghostwriter::proto::IngestRequest::default())
            .await
            .expect_err("plaintext must not reach the TLS-only API");
    }
    // etcd is on the mesh too: https, and neither a plaintext client nor a TLS client without
    // a certificate of the CA (this test process has only the CA) reads it.
    let etcd = log
        .lines()
        .find_map(|l| l.trim().strip_prefix("etcd "))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no etcd URL in the log:\n{log}"));
    assert!(etcd.starts_with("https://127.0.0.1:"), "{etcd}");
    for refused in [etcd.replace("https://", "http://"), etcd.to_string()] {
        use ghostwriter_discovery::etcd::Etcd;
        let read = async {
            let target = ghostwriter_discovery::EtcdTarget {
                endpoints: vec![refused.clone()],
                tls: tls.cloned(),
            };
            let mut e = Etcd::connect(&target).await?;
            e.get_prefix("ghostwriter/", true).await
        };
        let r = tokio::time::timeout(Duration::from_secs(10), read).await;
        assert!(
            !matches!(r, Ok(Ok(_))),
            "{refused} answered a client without the mesh identity"
        );
    }
    // The orchestrator learns the stages from etcd: wait until it knows the retriever.
    let started = Instant::now();
    loop {
        let mut c = common::client_over(&url, tls);
        let probe = c
            .ingest(ghostwriter::proto::IngestRequest {
                documents: vec![Document {
                    user_id: "probe".into(),
                    doc_id: "probe".into(),
                    timestamp: 0,
                    title: String::new(),
                    text: "probe".into(),
                }],
            })
            .await;
        if probe.is_ok() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{probe:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let docs: Vec<Document> = (0..4)
        .map(|i| Document {
            user_id: "maya".into(),
            doc_id: format!("m{i}"),
            timestamp: i,
            title: String::new(),
            text: format!("Review {i}: these strings stay in tune through a long wedding gig."),
        })
        .collect();
    let mut client = common::client_over(&url, tls);
    ghostwriter::embedded::ingest_batches(client.clone(), &docs, 1000, None, |_| {})
        .await
        .unwrap();
    // sum-ctx-ind: the summarizer process reaches the generator process.
    let response = client
        .write(common::short_write(
            "maya",
            "These strings",
            "sum-ctx-ind",
            4,
        ))
        .await
        .expect("sum-ctx-ind through up --processes")
        .into_inner();
    assert!(!response.provenance.unwrap().summary.is_empty());
    // ctrl-c reaches only the parent, which stops the orchestrator, the stages, then etcd:
    // every stage deregisters cleanly.
    up.signal("INT").unwrap();
    let status = up
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("up did not stop");
    assert!(status.success(), "{status:?}");
    let log = up.log_lines().join("\n");
    assert!(!log.contains("revoking the etcd lease failed"), "{log}");
}
