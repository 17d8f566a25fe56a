//! DNS discovery (the chart's default: a headless Service per stage, no etcd) against real stage
//! processes and a real nameserver on loopback, answering A queries over UDP the way cluster DNS
//! answers for a headless Service (one record per ready pod, all on the same port):
//! - two generator replicas behind one name both get traffic, from the orchestrator and from
//!   the summarizer (`sum-ctx-ind`), as their own `/metrics` show;
//! - a replica that disappears from DNS leaves the set and gets no more traffic;
//! - a name with no records empties a set, and a nameserver that stops answering leaves the last
//!   known endpoints in place.

#![allow(clippy::unwrap_used)]

use crate::common;

use common::{StageProcess, generated_tokens};

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ghostwriter::proto::Document;
use ghostwriter_discovery::DiscoveryArgs;
use tokio::net::UdpSocket;

/// An authoritative nameserver for a few names: A records from a table the test edits, TTL 0;
/// AAAA queries get an empty answer, unknown names NXDOMAIN. Silent while `paused`.
struct Nameserver {
    addr: SocketAddr,
    zone: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>>,
    paused: Arc<AtomicBool>,
}

impl Nameserver {
    async fn start() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let zone: Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>> = Arc::default();
        let paused = Arc::new(AtomicBool::new(false));
        let (z, p) = (zone.clone(), paused.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else { return };
                if p.load(Ordering::Relaxed) {
                    continue;
                }
                let reply = answer(&buf[..n], &z.lock().unwrap());
                if let Some(reply) = reply {
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        });
        Self { addr, zone, paused }
    }

    fn set(&self, name: &str, ips: &[Ipv4Addr]) {
        let mut zone = self.zone.lock().unwrap();
        if ips.is_empty() {
            zone.remove(name);
        } else {
            zone.insert(name.to_string(), ips.to_vec());
        }
    }
}

/// The reply to one DNS query (RFC 1035 wire format), or `None` for a malformed one.
fn answer(query: &[u8], zone: &HashMap<String, Vec<Ipv4Addr>>) -> Option<Vec<u8>> {
    if query.len() < 12 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    // The question: labels, then type and class.
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(i..i + len)?).to_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]);
    let question = &query[12..i + 4];
    let name = labels.join(".");
    let records = zone.get(&name);
    let ips: &[Ipv4Addr] = match (records, qtype) {
        (Some(ips), 1) => ips,
        _ => &[],
    };
    let rcode = if records.is_some() { 0 } else { 3 }; // NXDOMAIN for unknown names
    let mut reply = Vec::with_capacity(512);
    reply.extend_from_slice(&query[0..2]); // id
    reply.push(0x84 | (query[2] & 0x01)); // QR, AA, RD copied
    reply.push(rcode);
    reply.extend_from_slice(&1u16.to_be_bytes());
    reply.extend_from_slice(&(ips.len() as u16).to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]);
    reply.extend_from_slice(question);
    for ip in ips {
        reply.extend_from_slice(&[0xc0, 0x0c]); // the question's name
        reply.extend_from_slice(&[0, 1, 0, 1]); // A, IN
        reply.extend_from_slice(&0u32.to_be_bytes()); // TTL
        reply.extend_from_slice(&4u16.to_be_bytes());
        reply.extend_from_slice(&ip.octets());
    }
    Some(reply)
}

fn discovery(ns: &Nameserver) -> DiscoveryArgs {
    DiscoveryArgs {
        dns_server: Some(ns.addr),
        dns_refresh_secs: 0.2,
        ..Default::default()
    }
}

async fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ok() {
        assert!(started.elapsed() < within, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_dns_set_follows_the_records() {
    let _slot = crate::common::slot(module_path!());
    let ns = Nameserver::start().await;
    ns.set(
        "gen.test",
        &[Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)],
    );
    let set = discovery(&ns)
        .stage_set(
            ghostwriter_common::stage::StageKind::Generator,
            "dns:///gen.test:50051",
            None,
        )
        .unwrap();
    let urls = || {
        let mut u: Vec<String> = set.snapshot().iter().map(|e| e.info.url.clone()).collect();
        u.sort();
        u
    };
    wait_for("both records", Duration::from_secs(10), || {
        urls().len() == 2
    })
    .await;
    assert_eq!(urls(), ["http://10.0.0.1:50051", "http://10.0.0.2:50051"]);
    let kept = set.snapshot()[0].clone();

    // A replica goes away: it leaves; the one that stays keeps its state (same endpoint).
    ns.set("gen.test", &[Ipv4Addr::new(10, 0, 0, 1)]);
    wait_for("the removal", Duration::from_secs(10), || urls().len() == 1).await;
    assert_eq!(urls(), ["http://10.0.0.1:50051"]);
    assert!(Arc::ptr_eq(&kept, &set.snapshot()[0]));

    // A new one joins.
    ns.set(
        "gen.test",
        &[Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 3)],
    );
    wait_for("the new record", Duration::from_secs(10), || {
        urls().len() == 2
    })
    .await;

    // The nameserver stops answering: the last known endpoints stay.
    ns.paused.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(urls(), ["http://10.0.0.1:50051", "http://10.0.0.3:50051"]);
    ns.paused.store(false, Ordering::Relaxed);

    // The name is gone (every pod unready): no endpoints.
    ns.set("gen.test", &[]);
    wait_for("the empty set", Duration::from_secs(20), || {
        urls().is_empty()
    })
    .await;

    // Bad URLs are refused with a reason.
    let bad = discovery(&ns)
        .stage_set(
            ghostwriter_common::stage::StageKind::Generator,
            "dns:///gen.test",
            None,
        )
        .err()
        .unwrap();
    assert!(bad.to_string().contains("no port"), "{bad}");
    let mixed = discovery(&ns)
        .stage_set(
            ghostwriter_common::stage::StageKind::Generator,
            "dns:///gen.test:1,http://127.0.0.1:2",
            None,
        )
        .err()
        .unwrap();
    assert!(mixed.to_string().contains("only URL"), "{mixed}");
}

/// `ghostwriter serve STAGE` on `listen`, resolving through `ns`.
async fn serve(
    ns: &Nameserver,
    listen: &str,
    serve_args: &[&str],
    stage: &str,
    args: &[String],
) -> StageProcess {
    let mut cmd = common::ghostwriter();
    cmd.args(["serve", "--listen", listen])
        .args([
            "--dns-server",
            &ns.addr.to_string(),
            "--dns-refresh-secs",
            "0.2",
        ])
        .args(serve_args)
        .arg("--model-dir")
        .arg(common::model_dir())
        .arg(stage)
        .args(args)
        .env("RUST_LOG", "warn");
    common::start(&format!("{stage} on {listen}"), cmd).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_behind_one_name_share_the_traffic() {
    let _slot = crate::common::slot(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let ns = Nameserver::start().await;
    let mut procs = Vec::new();

    // Two generator "pods": one port, two addresses (127.0.0.2 is loopback too on Linux). The
    // first takes any free port; the second binds the same port on its own address.
    let pods = [Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2)];
    let metrics_port = ["--metrics-listen", "127.0.0.1:0"];
    let first = serve(&ns, "127.0.0.1:0", &metrics_port, "generator", &[]).await;
    let port = first.url().rsplit(':').next().unwrap().to_string();
    let second = serve(
        &ns,
        &format!("{}:{port}", pods[1]),
        &metrics_port,
        "generator",
        &[],
    )
    .await;
    assert_eq!(second.url(), format!("http://{}:{port}", pods[1]));
    let metrics = [common::metrics_addr(&first), common::metrics_addr(&second)];
    procs.extend([first, second]);
    ns.set("generator.test", &pods);
    let generator = format!("dns:///generator.test:{port}");

    let mut url = std::collections::BTreeMap::new();
    for stage in ["retriever", "ranker", "synthesizer", "summarizer"] {
        let args = match stage {
            "retriever" => vec![
                "--index-dir".into(),
                dir.path().join("index").display().to_string(),
            ],
            "summarizer" => vec!["--generator-url".into(), generator.clone()],
            _ => vec![],
        };
        let process = serve(&ns, "127.0.0.1:0", &[], stage, &args).await;
        url.insert(stage, process.url().to_string());
        procs.push(process);
    }
    let flags = [
        ("--retriever-url", url["retriever"].clone()),
        ("--ranker-url", url["ranker"].clone()),
        ("--synthesizer-url", url["synthesizer"].clone()),
        ("--summarizer-url", url["summarizer"].clone()),
        ("--generator-url", generator.clone()),
    ];
    let args: Vec<String> = flags.iter().map(|(f, v)| format!("{f}={v}")).collect();
    let process = serve(&ns, "127.0.0.1:0", &[], "orchestrator", &args).await;
    let orchestrator = process.url().to_string();
    procs.push(process);

    // Every stage, the orchestrator and both pods.
    for process in &mut procs {
        common::wait_serving(process, 120).await;
    }
    let docs: Vec<Document> = (0..4)
        .map(|i| Document {
            user_id: "dns-user".into(),
            doc_id: format!("d{i}"),
            timestamp: i,
            title: String::new(),
            text: format!("My tuner number {i} holds pitch on stage, even on cold nights."),
        })
        .collect();
    common::ingest(&orchestrator, &docs).await;

    let writes = |n: usize| {
        let orchestrator = orchestrator.clone();
        async move {
            let calls = (0..n).map(|i| {
                let orchestrator = orchestrator.clone();
                async move {
                    let preset = if i % 2 == 0 {
                        "rank-doc-bm25"
                    } else {
                        "sum-ctx-ind"
                    };
                    let mut c = common::client(&orchestrator).await;
                    c.write(common::short_write("dns-user", "This tuner", preset, 4))
                        .await
                        .unwrap_or_else(|e| panic!("{preset}: {e}"))
                }
            });
            futures::future::join_all(calls).await
        }
    };
    writes(12).await;
    let before = [
        generated_tokens(&metrics[0]).await,
        generated_tokens(&metrics[1]).await,
    ];
    assert!(
        before[0] > 0 && before[1] > 0,
        "both replicas get traffic: {before:?}"
    );

    // The second pod leaves DNS (as when it stops being ready): it gets nothing more, and every
    // write, summaries included, still succeeds on the first.
    ns.set("generator.test", &pods[..1]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    writes(6).await;
    let after = [
        generated_tokens(&metrics[0]).await,
        generated_tokens(&metrics[1]).await,
    ];
    assert!(after[0] > before[0], "{before:?} -> {after:?}");
    assert_eq!(
        after[1], before[1],
        "the removed replica got traffic: {before:?} -> {after:?}"
    );
    drop(dir);
}

/// A health server for `service` on `addr` (a real gRPC server, in this process), SERVING.
async fn health_server(addr: SocketAddr) -> ghostwriter_common::shutdown::ShutdownTrigger {
    let transport = ghostwriter_transport::Transport::default();
    let (server, routes) =
        ghostwriter_transport::StageServer::new("ghostwriter.v1.Generator", &transport).await;
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (trigger, stop) = ghostwriter_common::shutdown::channel();
    tokio::spawn(server.serve_after(routes, listener, stop, async { Ok(()) }));
    trigger
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_cannot_connect_resolves_the_name_again_at_once() {
    let _slot = crate::common::slot(module_path!());
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let ns = Nameserver::start().await;
    // Two "pods" on one port, at two loopback addresses.
    let port = common::free_port("127.0.0.2");
    let (old, new) = (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3));
    let old_pod = health_server(SocketAddr::from((old, port))).await;
    let _new_pod = health_server(SocketAddr::from((new, port))).await;
    ns.set("gen.test", &[old]);
    // Resolved again on the timer only once a minute: a quick change must come from a failure.
    let args = DiscoveryArgs {
        dns_server: Some(ns.addr),
        dns_refresh_secs: 60.0,
        ..Default::default()
    };
    let set = args
        .stage_set(
            ghostwriter_common::stage::StageKind::Generator,
            &format!("dns:///gen.test:{port}"),
            None,
        )
        .unwrap();
    wait_for("the first record", Duration::from_secs(10), || {
        set.snapshot().len() == 1
    })
    .await;
    let balancer = ghostwriter_discovery::Balancer::default();
    let check = |set: ghostwriter_discovery::EndpointSet| {
        let balancer = &balancer;
        async move {
            balancer
                .call(
                    &set,
                    "generator",
                    |tried| set.pick(tried),
                    true,
                    |e| async move {
                        HealthClient::new(e.channel.clone())
                            .check(HealthCheckRequest::default())
                            .await
                            .map(|_| e.info.url.clone())
                    },
                )
                .await
        }
    };
    assert_eq!(
        check(set.clone()).await.unwrap(),
        format!("http://{old}:{port}")
    );
    // The pod goes away and another takes its place in DNS: the next call fails to connect,
    // and the set looks again at once, not a minute later.
    ns.set("gen.test", &[new]);
    old_pod.trigger();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let served = loop {
        if let Ok(url) = check(set.clone()).await {
            break url;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still no endpoint after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(served, format!("http://{new}:{port}"));
    assert!(started.elapsed() < Duration::from_secs(5));
}
