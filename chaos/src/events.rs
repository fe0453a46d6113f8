//! A consumer of the order events, connected straight to RabbitMQ (never
//! through the cut link), bound to the run's own exchange before the first
//! order, keeping every delivery in the order it arrived.

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use lapin::{
    Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::{FieldTable, ShortString},
};

/// One delivery, as the audit needs it.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub message_id: String,
    pub event_type: String,
    pub order_id: String,
    pub sequence: i64,
}

#[derive(Clone, Default)]
pub struct Consumer {
    delivered: Arc<Mutex<Vec<Delivered>>>,
}

/// Connects to `amqp_url`, declares `exchange` (a durable topic exchange, as
/// the relay does), binds a private queue to it for every routing key, and
/// consumes it as `tag`. The connection must outlive the consumer.
pub async fn subscribe(
    amqp_url: &str,
    exchange: &str,
    tag: &str,
) -> lapin::Result<(Connection, lapin::Consumer)> {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .exchange_declare(
            ShortString::from(exchange.to_owned()),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let queue = channel
        .queue_declare(
            ShortString::from(""),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            ShortString::from(exchange.to_owned()),
            ShortString::from("#"),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let consumer = channel
        .basic_consume(
            queue.name().clone(),
            ShortString::from(tag.to_owned()),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((connection, consumer))
}

impl Consumer {
    pub async fn start(amqp_url: &str, exchange: &str) -> anyhow::Result<Consumer> {
        let (connection, mut deliveries) = subscribe(amqp_url, exchange, "chaos-audit").await?;
        let consumer = Consumer::default();
        let delivered = consumer.delivered.clone();
        tokio::spawn(async move {
            let _connection = connection;
            while let Some(Ok(delivery)) = deliveries.next().await {
                let body: serde_json::Value =
                    serde_json::from_slice(&delivery.data).unwrap_or_default();
                delivered.lock().unwrap().push(Delivered {
                    message_id: delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|m| m.as_str().to_owned())
                        .unwrap_or_default(),
                    event_type: body["event_type"].as_str().unwrap_or_default().to_owned(),
                    order_id: body["order_id"].as_str().unwrap_or_default().to_owned(),
                    sequence: body["sequence"].as_i64().unwrap_or(-1),
                });
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
        });
        Ok(consumer)
    }

    /// Every delivery so far, in arrival order (duplicates included).
    pub fn delivered(&self) -> Vec<Delivered> {
        self.delivered.lock().unwrap().clone()
    }
}
