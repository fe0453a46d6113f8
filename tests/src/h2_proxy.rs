//! An HTTP/2 proxy the test controls, between the orchestrator and a service.
//!
//! It passes gRPC calls through, or, for the calls whose path matches a rule,
//! forwards the call, waits for the callee's whole reply, and then resets the
//! caller's stream instead of relaying it: the effect happened, the reply is
//! lost, as when a sidecar or a load balancer drops a stream. The reset is a
//! real `RST_STREAM` frame with the rule's reason, so the caller's gRPC stack
//! classifies it exactly as it would in production (tonic maps INTERNAL_ERROR
//! to INTERNAL and CANCEL to CANCELLED).
//!
//! It also records the streams the caller itself reset before the reply
//! came, with how long each had been open: calls it gave up on.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream, client::SendRequest, server::SendResponse};
use http::{HeaderMap, Request, Response};
use tokio::net::{TcpListener, TcpStream};

/// Which calls lose their reply, and how.
#[derive(Debug, Clone)]
pub enum Rule {
    /// Every call passes through.
    Pass,
    /// Calls whose path ends with `path_suffix` are forwarded, then their
    /// stream is reset with `reason` once the callee has replied.
    ResetAfterReply { path_suffix: String, reason: Reason },
}

pub struct H2Proxy {
    pub addr: SocketAddr,
    rule: Arc<Mutex<Rule>>,
    resets: Arc<Mutex<u64>>,
    caller_resets: Arc<Mutex<Vec<Duration>>>,
    task: tokio::task::JoinHandle<()>,
}

impl H2Proxy {
    /// Listens on a loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr, rule: Rule) -> H2Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let rule = Arc::new(Mutex::new(rule));
        let resets = Arc::new(Mutex::new(0));
        let caller_resets = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(accept_loop(
            listener,
            upstream,
            rule.clone(),
            Counters {
                resets: resets.clone(),
                caller_resets: caller_resets.clone(),
            },
        ));
        H2Proxy {
            addr,
            rule,
            resets,
            caller_resets,
            task,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes the rule for calls that start from now on.
    pub fn set_rule(&self, rule: Rule) {
        *self.rule.lock().unwrap() = rule;
    }

    /// How many streams the proxy reset so far.
    pub fn resets(&self) -> u64 {
        *self.resets.lock().unwrap()
    }

    /// The streams the caller reset before their reply came: how long each
    /// had been open.
    pub fn caller_resets(&self) -> Vec<Duration> {
        self.caller_resets.lock().unwrap().clone()
    }
}

impl Drop for H2Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Counters {
    resets: Arc<Mutex<u64>>,
    caller_resets: Arc<Mutex<Vec<Duration>>>,
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    rule: Arc<Mutex<Rule>>,
    counters: Counters,
) {
    loop {
        let Ok((downstream, _)) = listener.accept().await else {
            return;
        };
        let (rule, counters) = (rule.clone(), counters.clone());
        tokio::spawn(async move {
            let _ = serve_connection(downstream, upstream, rule, counters).await;
        });
    }
}

/// One caller connection, with one upstream connection of its own.
async fn serve_connection(
    downstream: TcpStream,
    upstream: SocketAddr,
    rule: Arc<Mutex<Rule>>,
    counters: Counters,
) -> Result<(), h2::Error> {
    let mut incoming = h2::server::handshake(downstream).await?;
    let Ok(upstream) = TcpStream::connect(upstream).await else {
        // The callee is down: the caller sees its connection refused.
        return Err(h2::Error::from(Reason::REFUSED_STREAM));
    };
    let (sender, connection) = h2::client::handshake(upstream).await?;
    tokio::spawn(connection);
    while let Some(call) = incoming.accept().await {
        let (request, respond) = call?;
        let reset = match &*rule.lock().unwrap() {
            Rule::Pass => None,
            Rule::ResetAfterReply {
                path_suffix,
                reason,
            } => request
                .uri()
                .path()
                .ends_with(path_suffix.as_str())
                .then_some(*reason),
        };
        let (sender, counters) = (sender.clone(), counters.clone());
        tokio::spawn(async move {
            let _ = forward(sender, request, respond, reset, counters).await;
        });
    }
    Ok(())
}

async fn forward(
    sender: SendRequest<Bytes>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    reset: Option<Reason>,
    counters: Counters,
) -> Result<(), h2::Error> {
    let opened = Instant::now();
    let (parts, body) = request.into_parts();
    let mut sender = sender.ready().await?;
    let (reply, mut upstream_body) = sender.send_request(Request::from_parts(parts, ()), false)?;
    let forwarded = async {
        copy_body(body, &mut upstream_body).await?;
        reply.await
    };
    let caller_gave_up = std::future::poll_fn(|cx| respond.poll_reset(cx));
    let reply = tokio::select! {
        reply = forwarded => reply?,
        _ = caller_gave_up => {
            counters.caller_resets.lock().unwrap().push(opened.elapsed());
            upstream_body.send_reset(Reason::CANCEL);
            return Ok(());
        }
    };
    let (parts, body) = reply.into_parts();
    match reset {
        Some(reason) => {
            // The callee has done the work and answered; the caller never hears it.
            drain(body).await?;
            respond.send_reset(reason);
            *counters.resets.lock().unwrap() += 1;
        }
        None => {
            let mut downstream_body =
                respond.send_response(Response::from_parts(parts, ()), false)?;
            copy_body(body, &mut downstream_body).await?;
        }
    }
    Ok(())
}

/// Copies data frames, then the trailers (gRPC's status travels in them).
async fn copy_body(mut from: RecvStream, to: &mut SendStream<Bytes>) -> Result<(), h2::Error> {
    while let Some(chunk) = from.data().await {
        let chunk = chunk?;
        let _ = from.flow_control().release_capacity(chunk.len());
        to.send_data(chunk, false)?;
    }
    match from.trailers().await? {
        Some(trailers) => to.send_trailers(trailers),
        None => to.send_data(Bytes::new(), true),
    }
}

async fn drain(mut body: RecvStream) -> Result<Option<HeaderMap>, h2::Error> {
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    body.trailers().await
}
