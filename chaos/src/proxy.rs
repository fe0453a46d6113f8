//! A TCP proxy on one link whose faults the runner turns on and off: resets,
//! a blackhole, added latency, a partition.
//!
//! It works on bytes, below HTTP/2 and AMQP, so the peers see what a real
//! network does to them: an RST in the middle of a frame, a connection that
//! goes silent, a connection refused.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{broadcast, watch},
    time::Instant,
};

/// What the link does to bytes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Condition {
    /// Bytes are held back (not lost: TCP would retransmit them) until it
    /// clears.
    pub blackhole: bool,
    /// Open connections are reset and new ones refused.
    pub partition: bool,
    /// Added before each chunk is forwarded.
    pub latency: Duration,
}

/// One fault in force until `until`.
#[derive(Debug, Clone, Copy)]
enum Active {
    Blackhole,
    Partition,
    Latency(Duration),
}

pub struct FaultyProxy {
    pub addr: SocketAddr,
    condition: watch::Sender<Condition>,
    resets: broadcast::Sender<()>,
    active: Arc<Mutex<Vec<(Active, Instant)>>>,
}

impl FaultyProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<FaultyProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (condition, _) = watch::channel(Condition::default());
        let (resets, _) = broadcast::channel(16);
        let (watching, resetting) = (condition.subscribe(), resets.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if watching.borrow().partition {
                    reset(&client);
                    continue;
                }
                let (condition, resets) = (watching.clone(), resetting.subscribe());
                tokio::spawn(serve(client, upstream, condition, resets));
            }
        });
        Ok(FaultyProxy {
            addr,
            condition,
            resets,
            active: Arc::default(),
        })
    }

    /// Resets every open connection now.
    pub fn reset_all(&self) {
        let _ = self.resets.send(());
    }

    pub fn blackhole_for(&self, duration: Duration) {
        self.hold(Active::Blackhole, duration);
    }

    pub fn partition_for(&self, duration: Duration) {
        self.hold(Active::Partition, duration);
        self.reset_all();
    }

    pub fn latency_for(&self, added: Duration, duration: Duration) {
        self.hold(Active::Latency(added), duration);
    }

    /// Ends every fault at once.
    pub fn heal(&self) {
        self.active.lock().unwrap().clear();
        self.condition.send_replace(Condition::default());
    }

    pub fn condition(&self) -> Condition {
        *self.condition.borrow()
    }

    /// Faults overlap: the link's condition is that of every fault still in
    /// force, recomputed when one starts and when one ends.
    fn hold(&self, fault: Active, duration: Duration) {
        let until = Instant::now() + duration;
        self.active.lock().unwrap().push((fault, until));
        recompute(&self.active, &self.condition);
        let (active, condition) = (self.active.clone(), self.condition.clone());
        tokio::spawn(async move {
            tokio::time::sleep_until(until).await;
            recompute(&active, &condition);
        });
    }
}

fn recompute(active: &Mutex<Vec<(Active, Instant)>>, condition: &watch::Sender<Condition>) {
    let now = Instant::now();
    let mut active = active.lock().unwrap();
    active.retain(|(_, until)| *until > now);
    let mut next = Condition::default();
    for (fault, _) in active.iter() {
        match fault {
            Active::Blackhole => next.blackhole = true,
            Active::Partition => next.partition = true,
            Active::Latency(added) => next.latency = next.latency.max(*added),
        }
    }
    condition.send_replace(next);
}

/// Closes with an RST instead of a FIN.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut condition: watch::Receiver<Condition>,
    mut resets: broadcast::Receiver<()>,
) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        // The upstream is down (killed, restarting): refuse as it would.
        reset(&client);
        return;
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let reset_now = {
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        let (upward, downward) = (condition.clone(), condition.clone());
        let forward = async {
            tokio::join!(
                pump(&mut client_read, &mut server_write, upward),
                pump(&mut server_read, &mut client_write, downward),
            )
        };
        tokio::select! {
            _ = forward => false,
            _ = resets.recv() => true,
            _ = condition.wait_for(|c| c.partition) => true,
        }
    };
    if reset_now {
        reset(&client);
        reset(&server);
    }
}

/// Forwards one direction until EOF or an error, honouring the link's
/// condition for each chunk.
async fn pump(
    from: &mut (impl AsyncReadExt + Unpin),
    to: &mut (impl AsyncWriteExt + Unpin),
    mut condition: watch::Receiver<Condition>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if condition
            .wait_for(|c| !c.blackhole && !c.partition)
            .await
            .is_err()
        {
            break;
        }
        let latency = condition.borrow().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
        stream.write_all(b"ping").await?;
        let mut got = [0u8; 4];
        stream.read_exact(&mut got).await?;
        Ok(got.to_vec())
    }

    #[tokio::test]
    async fn forwards_holds_resets_and_refuses() {
        let proxy = FaultyProxy::start(echo_server().await).await.unwrap();
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(round_trip(&mut stream).await.unwrap(), b"ping");

        // A blackhole holds the bytes until it heals, then delivers them.
        proxy.blackhole_for(Duration::from_millis(300));
        let started = Instant::now();
        assert_eq!(round_trip(&mut stream).await.unwrap(), b"ping");
        assert!(started.elapsed() >= Duration::from_millis(250));

        // A reset is an RST to the client.
        proxy.reset_all();
        let error = round_trip(&mut stream).await.unwrap_err();
        assert!(
            matches!(
                error.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            ),
            "{error:?}"
        );

        // A partition refuses new connections until it heals.
        proxy.partition_for(Duration::from_millis(300));
        let mut refused = TcpStream::connect(proxy.addr).await.unwrap();
        assert!(round_trip(&mut refused).await.is_err());
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(proxy.condition(), Condition::default());
        let mut healed = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(round_trip(&mut healed).await.unwrap(), b"ping");
    }
}
