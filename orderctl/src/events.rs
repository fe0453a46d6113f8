//! `orderctl events`: a RabbitMQ consumer of the order events the
//! orchestrator's outbox relay publishes, and the example consumer of the
//! README.
//!
//! - The relay publishes each event as JSON to a durable topic exchange, with
//!   the event type (`order.completed`, …) as routing key, the event ID as
//!   `message_id` and the W3C `traceparent` as a header (and in the body).
//! - Delivery is at least once, so a consumer that acts on events dedupes them
//!   by event ID; this one only prints them, marking redeliveries.
//! - Each event is acknowledged after it is printed, so one that was not
//!   printed (the tool stopped, stdout closed) stays in a durable `--queue`.

use std::{
    borrow::Cow,
    io::{self, Write as _},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use futures::StreamExt as _;
use lapin::{
    Connection, ConnectionProperties, Consumer, ExchangeKind,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
        QueueBindOptions, QueueDeclareOptions,
    },
    types::{FieldTable, ShortString},
};
use serde_json::Value;

use crate::{cli::EventsArgs, render};

/// Events the broker may send ahead of the acknowledgements.
const PREFETCH: u16 = 64;
/// How long to wait for the broker to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a clean close on Ctrl-C before just exiting.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Prints events until Ctrl-C (then `Ok`) or until the connection fails.
pub async fn run(args: EventsArgs) -> anyhow::Result<()> {
    // Listened for from the start, so Ctrl-C while connecting also exits cleanly.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);

    let (connection, mut consumer) = tokio::select! {
        stop = &mut ctrl_c => return stop.context("cannot listen for Ctrl-C"),
        subscribed = subscribe(&args) => subscribed?,
    };

    loop {
        let next = tokio::select! {
            stop = &mut ctrl_c => {
                stop.context("cannot listen for Ctrl-C")?;
                break;
            }
            next = consumer.next() => next,
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(err)) => return Err(amqp(err)).context("lost the connection to RabbitMQ"),
            None => bail!("RabbitMQ cancelled the consumer (was the queue deleted?)"),
        };
        print(&delivery, args.json)?;
        delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(amqp)
            .context("cannot acknowledge an event")?;
    }

    // Unacknowledged events go back to the queue; an error here changes nothing.
    let _ = tokio::time::timeout(
        CLOSE_TIMEOUT,
        connection.close(200, "orderctl stopped".into()),
    )
    .await;
    Ok(())
}

/// Connects, declares the exchange and the queue, binds them and starts
/// consuming.
async fn subscribe(args: &EventsArgs) -> anyhow::Result<(Connection, Consumer)> {
    let url = redact(&args.amqp_url);
    let properties = ConnectionProperties::default().with_connection_name("orderctl events".into());
    let connection = tokio::time::timeout(
        CONNECT_TIMEOUT,
        Connection::connect(&args.amqp_url, properties),
    )
    .await
    .map_err(|_| anyhow!("timed out connecting to RabbitMQ at {url}"))?
    .map_err(amqp)
    .with_context(|| format!("cannot connect to RabbitMQ at {url}"))?;
    let channel = connection
        .create_channel()
        .await
        .map_err(amqp)
        .context("cannot open a channel")?;

    // Declared as the relay does, so binding works before its first event.
    let exchange = ShortString::from(args.exchange.clone());
    channel
        .exchange_declare(
            exchange.clone(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(amqp)
        .with_context(|| format!("cannot declare the exchange {}", args.exchange))?;

    let (name, options) = match &args.queue {
        Some(name) => (
            name.clone(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
        ),
        // Named by the server, and gone with the connection.
        None => (
            String::new(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
        ),
    };
    let queue = channel
        .queue_declare(name.into(), options, FieldTable::default())
        .await
        .map_err(amqp)
        .context("cannot declare the queue")?;
    let queue = queue.name().clone();

    for binding in &args.bindings {
        channel
            .queue_bind(
                queue.clone(),
                exchange.clone(),
                binding.clone().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp)
            .with_context(|| format!("cannot bind the queue {queue} with {binding}"))?;
    }

    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .map_err(amqp)
        .context("cannot set the prefetch")?;
    // Manual acknowledgements (`no_ack` false): see `run`.
    let consumer = channel
        .basic_consume(
            queue.clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp)
        .with_context(|| format!("cannot consume from the queue {queue}"))?;

    let kept = if args.queue.is_some() {
        "durable"
    } else {
        "temporary"
    };
    eprintln!(
        "listening on {url}: exchange {}, binding {}, {kept} queue {queue}; Ctrl-C to stop",
        args.exchange,
        args.bindings.join(" ")
    );
    Ok((connection, consumer))
}

/// Prints one event, flushed, so it is out before it is acknowledged.
///
/// A body that is not a JSON object is printed as it is, with a warning.
fn print(delivery: &Delivery, json: bool) -> anyhow::Result<()> {
    let raw = String::from_utf8_lossy(&delivery.data);
    let routing_key = delivery.routing_key.as_str();
    let line = match serde_json::from_slice::<Value>(&delivery.data) {
        Ok(event) if event.is_object() => {
            if !json {
                render::event(&event, routing_key, delivery.redelivered)
            } else if raw.contains('\n') {
                // Still one event per line.
                event.to_string()
            } else {
                raw.into_owned()
            }
        }
        parsed => {
            let why = match parsed {
                Err(err) => Cow::Owned(err.to_string()),
                Ok(_) => Cow::Borrowed("not an object"),
            };
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map_or("none", ShortString::as_str);
            eprintln!(
                "warning: message {id} (routing key {routing_key}) is not a JSON event ({why}); printed as is and acknowledged"
            );
            if json {
                raw.trim_end().to_owned()
            } else {
                format!(
                    "[{}] {routing_key:<17} {}",
                    render::clock(None),
                    raw.trim_end()
                )
            }
        }
    };
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .context("cannot write to stdout")
}

/// A lapin error as one message: its `Display` already includes its source,
/// which `{:#}` would print a second time.
fn amqp(err: lapin::Error) -> anyhow::Error {
    anyhow!("{err}")
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "the given URL".into();
    };
    let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{path}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_the_password_only() {
        assert_eq!(
            redact("amqp://guest:s3cr%2Ft@rabbit:5672/%2f"),
            "amqp://guest:***@rabbit:5672/%2f"
        );
        assert_eq!(redact("amqp://rabbit:5672"), "amqp://rabbit:5672");
        assert_eq!(redact("amqp://guest@rabbit/"), "amqp://guest@rabbit/");
        assert_eq!(redact("guest:pw@rabbit"), "the given URL");
    }
}
