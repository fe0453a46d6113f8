//! The local RabbitMQ, as the tests see it: a consumer bound to a test's own
//! exchange, and a TCP proxy the test can cut and restore.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use lapin::{
    Connection, ConnectionProperties,
    options::{BasicAckOptions, BasicGetOptions},
    types::{AMQPValue, ShortString},
};
use serde_json::Value;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};

/// The broker the tests use; `TEST_RABBITMQ_URL` overrides it.
pub fn rabbitmq_url() -> String {
    std::env::var("TEST_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A fresh exchange name, so parallel tests never see each other's events.
pub fn unique_exchange() -> String {
    format!("test.orders.{}", uuid::Uuid::new_v4().simple())
}

/// One delivered message.
#[derive(Debug, Clone)]
pub struct Received {
    pub routing_key: String,
    pub message_id: String,
    pub traceparent_header: String,
    pub persistent: bool,
    pub body: Value,
}

impl Received {
    pub fn field(&self, key: &str) -> &Value {
        &self.body[key]
    }
}

/// Binds a private queue to `exchange` (all routing keys) and forwards every
/// message, acked after it is handed over.
pub async fn consume(exchange: &str) -> mpsc::UnboundedReceiver<Received> {
    let (connection, mut consumer) = chaos::events::subscribe(&rabbitmq_url(), exchange, "tests")
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ at {} is unreachable: {e}", rabbitmq_url()));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _connection = connection;
        while let Some(Ok(delivery)) = consumer.next().await {
            let received = received(&delivery);
            let _ = delivery.ack(BasicAckOptions::default()).await;
            if tx.send(received).is_err() {
                break;
            }
        }
    });
    rx
}

fn received(delivery: &lapin::message::Delivery) -> Received {
    let properties = &delivery.properties;
    let traceparent_header = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("traceparent").cloned())
        .and_then(|v| match v {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            _ => None,
        })
        .unwrap_or_default();
    Received {
        routing_key: delivery.routing_key.as_str().to_owned(),
        message_id: properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned())
            .unwrap_or_default(),
        traceparent_header,
        persistent: *properties.delivery_mode() == Some(2),
        body: serde_json::from_slice(&delivery.data).unwrap_or(Value::Null),
    }
}

/// Takes every message waiting in the durable queue `queue` (acked), oldest
/// first. Panics if the queue does not exist.
pub async fn drain_queue(queue: &str) -> Vec<Received> {
    let connection = Connection::connect(&rabbitmq_url(), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ at {} is unreachable: {e}", rabbitmq_url()));
    let channel = connection.create_channel().await.unwrap();
    let mut messages = Vec::new();
    loop {
        let got = channel
            .basic_get(
                ShortString::from(queue.to_owned()),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap_or_else(|e| panic!("queue {queue} cannot be read: {e}"));
        let Some(message) = got else {
            break;
        };
        messages.push(received(&message.delivery));
    }
    let _ = connection.close(200, "done".into()).await;
    messages
}

/// Receives until `done` says the events so far are enough, deduplicating by
/// `message_id` (delivery is at least once). Panics after `timeout`.
pub async fn collect_until(
    rx: &mut mpsc::UnboundedReceiver<Received>,
    timeout: Duration,
    mut done: impl FnMut(&[Received]) -> bool,
) -> Vec<Received> {
    let mut seen: HashMap<String, ()> = HashMap::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while !done(&events) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(event)) => {
                if seen.insert(event.message_id.clone(), ()).is_none() {
                    events.push(event);
                }
            }
            Ok(None) => panic!("the consumer stopped"),
            Err(_) => panic!(
                "timed out after {timeout:?} with {} events: {events:#?}",
                events.len()
            ),
        }
    }
    events
}

/// A TCP proxy to RabbitMQ that a test can cut (every connection dropped, new
/// ones refused), stall (the open connections go silent, as behind a network
/// partition, while new ones pass) and restore.
pub struct TcpProxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Up,
    Cut,
    /// The connections open now carry nothing more; they stay open.
    Stalled,
}

impl TcpProxy {
    pub async fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, _) = watch::channel(Mode::Up);
        let state = mode.subscribe();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *state.borrow() == Mode::Cut {
                    drop(client);
                    continue;
                }
                let mut state = state.clone();
                // A connection made while stalled is a new path: it passes.
                let born_stalled = *state.borrow() == Mode::Stalled;
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    let left = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
                        left = state.wait_for(|m| *m == Mode::Cut || (*m == Mode::Stalled && !born_stalled)) => left.map(|m| *m),
                    };
                    if matches!(left, Ok(Mode::Stalled)) {
                        // Silent, not closed: no byte either way until a cut.
                        let _ = state.wait_for(|m| *m == Mode::Cut).await;
                    }
                });
            }
        });
        TcpProxy { addr, mode }
    }

    /// The AMQP URL through the proxy.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// The connections open now go silent; new ones pass.
    pub fn stall(&self) {
        self.mode.send_replace(Mode::Stalled);
    }

    pub fn restore(&self) {
        self.mode.send_replace(Mode::Up);
    }
}

/// A TLS front for RabbitMQ, as a broker's TLS listener is: it takes TLS
/// with the given certificate and passes the plaintext on to `upstream`. It
/// counts handshakes that succeeded and that failed, so a test sees a client
/// refuse the certificate rather than only that nothing arrived.
pub struct TlsFront {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
}

impl TlsFront {
    pub async fn start(cert: &Path, key: &Path, upstream: SocketAddr) -> TlsFront {
        use tokio_rustls::rustls::{
            self,
            pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, refused): (Arc<AtomicUsize>, Arc<AtomicUsize>) = Default::default();
        let (ok, failed) = (Arc::clone(&accepted), Arc::clone(&refused));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (acceptor, ok, failed) = (acceptor.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    let Ok(mut client) = acceptor.accept(client).await else {
                        failed.fetch_add(1, Ordering::SeqCst);
                        return;
                    };
                    ok.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        TlsFront {
            addr,
            accepted,
            refused,
        }
    }

    /// The AMQPS URL of the front, by the name its certificate carries.
    pub fn url(&self) -> String {
        format!("amqps://guest:guest@localhost:{}/%2f", self.addr.port())
    }

    /// Handshakes completed so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Handshakes a client broke off (or that were not TLS) so far.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}
