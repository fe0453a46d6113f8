//! Order events through the transactional outbox, against the real RabbitMQ.

use std::{collections::BTreeMap, time::Duration};

use orchestrator::outbox::relay::BrokerArgs;
use ordersaga_proto::orders::v1::{Order, OrderStatus};
use ordersaga_tests::{
    Backend,
    broker::{Received, TcpProxy, collect_until, consume, rabbitmq_url, unique_exchange},
    eventually,
    process::ServiceProcess,
    system::{DomainServices, Options, System, order},
};
use secrecy::SecretString;

use crate::{
    assertions::{request_id, terminal_order},
    bins,
};

on_both_stores!(
    each_orders_events_arrive_in_order_with_their_content,
    a_state_change_and_its_event_commit_together,
    sequences_keep_counting_after_the_outbox_is_pruned,
    events_no_queue_is_bound_for_are_parked_not_lost,
);

const WAIT: Duration = Duration::from_secs(60);

fn broker(url: String, exchange: &str) -> BrokerArgs {
    BrokerArgs {
        rabbitmq_url: Some(SecretString::from(url)),
        events_exchange: exchange.to_owned(),
        ..Default::default()
    }
}

/// Event types per order ID, in the order they were received.
fn by_order(events: &[Received]) -> BTreeMap<String, Vec<(i64, String)>> {
    let mut map: BTreeMap<String, Vec<(i64, String)>> = BTreeMap::new();
    for e in events {
        let id = e.field("order_id").as_str().unwrap_or_default().to_owned();
        map.entry(id)
            .or_default()
            .push((e.field("sequence").as_i64().unwrap(), e.routing_key.clone()));
    }
    map
}

fn has_terminal_event(events: &[Received], order_id: &str) -> bool {
    events
        .iter()
        .any(|e| e.field("order_id") == order_id && e.routing_key != "order.created")
}

async fn each_orders_events_arrive_in_order_with_their_content(backend: Backend) {
    let exchange = unique_exchange();
    let mut rx = consume(&exchange).await;
    let options = Options {
        broker: Some(broker(rabbitmq_url(), &exchange)),
        ..Default::default()
    };
    let system = System::start(backend, options).await;
    let client = system.client().await;
    let mut orders: Vec<Order> = Vec::new();
    for (customer, sku, quantity) in [
        ("alice", "BOOK", 2),
        ("poor", "BOOK", 1),
        ("alice", "RARE", 5),
    ] {
        let mut request = order(&request_id(), customer, &[(sku, quantity)], "DE");
        request.wait = true;
        orders.push(client.create_order(request).await.unwrap());
    }
    let ids: Vec<String> = orders.iter().map(|o| o.order_id.clone()).collect();
    let events = collect_until(&mut rx, WAIT, |events| {
        ids.iter().all(|id| has_terminal_event(events, id))
    })
    .await;

    let expected = ["order.completed", "order.compensated", "order.failed"];
    let grouped = by_order(&events);
    for (order, terminal) in orders.iter().zip(expected) {
        assert_eq!(
            grouped[&order.order_id],
            vec![(1, "order.created".to_owned()), (2, terminal.to_owned())],
            "events of {} arrive in order",
            order.order_id
        );
        let event = events.iter().find(|e| e.routing_key == terminal).unwrap();
        assert_eq!(event.field("event_type"), terminal);
        assert_eq!(
            event.message_id,
            event.field("event_id").as_str().unwrap(),
            "message_id is the event ID"
        );
        assert!(event.persistent, "persistent messages");
        assert_eq!(event.field("order_id"), order.order_id.as_str());
        assert_eq!(event.field("customer_id"), order.customer_id.as_str());
        assert_eq!(event.field("total_cents"), order.total_cents);
        assert_eq!(event.field("currency"), "EUR");
        let status = OrderStatus::try_from(order.status)
            .unwrap()
            .as_str_name()
            .trim_start_matches("ORDER_STATUS_")
            .to_owned();
        assert_eq!(event.field("status"), status.as_str());
        assert!(event.field("occurred_at_ms").as_i64().unwrap() > 0);
        assert_eq!(order.trace_id.len(), 32, "the order has a trace");
        assert!(
            event.traceparent_header.contains(&order.trace_id)
                && event.field("traceparent") == event.traceparent_header.as_str(),
            "the event carries the order's trace: {event:?}"
        );
    }
    let failed = events
        .iter()
        .find(|e| e.routing_key == "order.failed")
        .unwrap();
    assert!(
        failed
            .field("failure_reason")
            .as_str()
            .unwrap()
            .contains("out of stock")
    );
}

async fn a_state_change_and_its_event_commit_together(backend: Backend) {
    let system = System::start(backend, Options::default()).await;
    let pool = system.orchestrator.db.pool().await;
    // The store refuses the completion event; the completion must not commit without it.
    let refuse = match backend {
        Backend::Sqlite => vec![
            "CREATE TRIGGER refuse_completed BEFORE INSERT ON outbox WHEN NEW.event_type = 'order.completed' \
             BEGIN SELECT RAISE(ABORT, 'injected: outbox refused'); END",
        ],
        Backend::Postgres => vec![
            "CREATE FUNCTION refuse_completed() RETURNS trigger AS $$ BEGIN \
             IF NEW.event_type = 'order.completed' THEN RAISE EXCEPTION 'injected: outbox refused'; END IF; \
             RETURN NEW; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER refuse_completed BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION refuse_completed()",
        ],
    };
    for sql in refuse {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    let client = system.client().await;
    let created = client
        .create_order(order(&request_id(), "alice", &[("PEN", 1)], "DE"))
        .await
        .unwrap();

    // Every step is done (the charge happened), yet the order can't become COMPLETED.
    eventually("the charge", WAIT, || async {
        (system.services.effects().await.charged == 1).then_some(())
    })
    .await;
    let events_of = |types: &'static str| {
        let pool = pool.clone();
        let id = created.order_id.clone();
        async move {
            let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT event_type FROM outbox WHERE aggregate_id = '{id}' {types} ORDER BY sequence"
            )))
            .fetch_all(&pool)
            .await
            .unwrap();
            rows
        }
    };
    for _ in 0..5 {
        // The engine keeps retrying the refused commit meanwhile.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let order = client.get_order(&created.order_id).await.unwrap();
        assert_eq!(
            order.status,
            OrderStatus::Running as i32,
            "no state change without its event"
        );
        assert_eq!(events_of("").await, vec!["order.created"]);
    }

    let lift = match backend {
        Backend::Sqlite => "DROP TRIGGER refuse_completed",
        Backend::Postgres => "DROP TRIGGER refuse_completed ON outbox",
    };
    sqlx::query(lift).execute(&pool).await.unwrap();
    let order = eventually("the order to complete", WAIT, || async {
        let order = client.get_order(&created.order_id).await.ok()?;
        (order.status == OrderStatus::Completed as i32).then_some(order)
    })
    .await;
    assert_eq!(order.status, OrderStatus::Completed as i32);
    assert_eq!(
        events_of("").await,
        vec!["order.created", "order.completed"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_outage_loses_no_event() {
    let exchange = unique_exchange();
    let mut rx = consume(&exchange).await;
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let options = Options {
        broker: Some(broker(proxy.url(), &exchange)),
        ..Default::default()
    };
    let system = System::start(Backend::Sqlite, options).await;
    let client = system.client().await;
    let mut ids = Vec::new();
    for i in 0..12 {
        if i == 4 {
            // Mid-run: the broker becomes unreachable.
            proxy.cut();
        }
        let mut request = order(&request_id(), "alice", &[("PEN", 1)], "DE");
        request.wait = true;
        let order = client.create_order(request).await.unwrap();
        assert_eq!(
            order.status,
            OrderStatus::Completed as i32,
            "orders complete without the broker"
        );
        ids.push(order.order_id);
    }
    let pool = system.orchestrator.db.pool().await;
    let unsent: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE sent_at_ms IS NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        unsent > 0,
        "events wait in the outbox while the broker is away"
    );

    proxy.restore();
    let events = collect_until(&mut rx, WAIT, |events| {
        ids.iter().all(|id| {
            events
                .iter()
                .any(|e| e.field("order_id") == id.as_str() && e.routing_key == "order.completed")
                && events
                    .iter()
                    .any(|e| e.field("order_id") == id.as_str() && e.routing_key == "order.created")
        })
    })
    .await;
    for (id, list) in by_order(&events) {
        let sequences: Vec<i64> = list.iter().map(|(s, _)| *s).collect();
        assert_eq!(sequences, vec![1, 2], "order {id}: in order, none lost");
    }
    eventually("the outbox to drain", WAIT, || async {
        let unsent: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE sent_at_ms IS NULL")
                .fetch_one(&pool)
                .await
                .unwrap();
        (unsent == 0).then_some(())
    })
    .await;
}

/// A partition that closes nothing (no RST, no FIN) and carries nothing: the
/// relay must give up on a publish the broker never confirms and reconnect,
/// not wait on a connection that is gone in all but name.
#[tokio::test(flavor = "multi_thread")]
async fn a_silent_broker_connection_is_abandoned_and_no_event_is_lost() {
    let exchange = unique_exchange();
    let mut rx = consume(&exchange).await;
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let options = Options {
        broker: Some(broker(proxy.url(), &exchange)),
        ..Default::default()
    };
    let system = System::start(Backend::Sqlite, options).await;
    let client = system.client().await;
    let mut ids = Vec::new();
    let place = async |ids: &mut Vec<String>| {
        let mut request = order(&request_id(), "alice", &[("PEN", 1)], "DE");
        request.wait = true;
        ids.push(client.create_order(request).await.unwrap().order_id);
    };
    let both_events = |ids: &[String], events: &[Received]| {
        ids.iter().all(|id| {
            ["order.created", "order.completed"].iter().all(|kind| {
                events
                    .iter()
                    .any(|e| e.field("order_id") == id.as_str() && e.routing_key == *kind)
            })
        })
    };
    // The relay is connected and publishing.
    place(&mut ids).await;
    let mut events = collect_until(&mut rx, WAIT, |events| both_events(&ids, events)).await;

    proxy.stall();
    for _ in 0..4 {
        place(&mut ids).await;
    }
    // Well under RabbitMQ's heartbeat timeout (60 s): the relay's own
    // bound on a confirm is what finds the dead connection.
    events.extend(
        collect_until(&mut rx, Duration::from_secs(30), |more| {
            let all: Vec<Received> = events.iter().chain(more).cloned().collect();
            both_events(&ids, &all)
        })
        .await,
    );
    // At least once: a batch sent again after a reconnect may come twice.
    let mut seen = std::collections::HashSet::new();
    events.retain(|e| seen.insert(e.message_id.clone()));
    for (id, list) in by_order(&events) {
        let kinds: Vec<&str> = list.iter().map(|(_, kind)| kind.as_str()).collect();
        assert_eq!(kinds, ["order.created", "order.completed"], "order {id}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_committed_before_a_kill_9_is_delivered_after_restart() {
    let exchange = unique_exchange();
    let mut rx = consume(&exchange).await;
    // The broker is unreachable, so events commit with their state and wait.
    let proxy = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    proxy.cut();
    let services = DomainServices::start(Backend::Sqlite, &Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut orchestrator = ServiceProcess::new(
        bins::ORCHESTRATOR,
        dir.path(),
        "orchestrator",
        &[
            ("STOCK_SERVICE_URL", services.stock.endpoint()),
            ("SHIPPING_SERVICE_URL", services.shipping.endpoint()),
            ("PAYMENT_SERVICE_URL", services.payment.endpoint()),
            ("RABBITMQ_URL", proxy.url()),
            ("EVENTS_EXCHANGE", exchange.clone()),
        ],
    );
    orchestrator.start().await;
    let client = ordersaga_proto::client::OrderClient::connect(
        orchestrator.endpoint(),
        ordersaga_tests::API_KEY,
    )
    .await
    .unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut request = order(&request_id(), "alice", &[("BOOK", 1)], "DE");
        request.wait = true;
        let order = client.create_order(request).await.unwrap();
        assert_eq!(order.status, OrderStatus::Completed as i32);
        ids.push(order.order_id);
    }
    // State committed, events not yet published: crash.
    orchestrator.kill().await;
    proxy.restore();
    orchestrator.start().await;

    let events = collect_until(&mut rx, WAIT, |events| {
        ids.iter().all(|id| {
            events
                .iter()
                .any(|e| e.field("order_id") == id.as_str() && e.routing_key == "order.completed")
        })
    })
    .await;
    assert_eq!(
        events
            .iter()
            .filter(|e| e.routing_key == "order.created")
            .count(),
        3
    );
    orchestrator.terminate().await;
}

/// The outbox (aggregate, sequence, type) rows of one order, in sequence order.
async fn outbox_of(pool: &sqlx::AnyPool, order_id: &str) -> Vec<(i64, String)> {
    sqlx::query_as(
        "SELECT sequence, event_type FROM outbox WHERE aggregate_id = $1 ORDER BY sequence",
    )
    .bind(order_id)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A saga that compensates for long outlives its first events, which are
/// pruned once sent. Its later events must still count on from where it was:
/// a consumer following docs/events.md drops an event whose sequence it has
/// already seen.
async fn sequences_keep_counting_after_the_outbox_is_pruned(backend: Backend) {
    use h2::Reason;
    use ordersaga_tests::h2_proxy::{H2Proxy, Rule};

    let mut services = DomainServices::start(backend, &Options::default()).await;
    // Nobody ships to AQ, so the reservation is released; every release's
    // reply is lost until the proxy heals, so the compensation is stuck.
    let proxy = H2Proxy::start(
        services.stock.addr,
        Rule::ResetAfterReply {
            path_suffix: "/ReleaseStock".into(),
            reason: Reason::CANCEL,
        },
    )
    .await;
    services.stock_endpoint = Some(proxy.endpoint());
    let downstream = services.downstream();
    let orchestrator = ordersaga_tests::services::orchestrator(backend, move |url| {
        let mut settings = orchestrator::Settings::local(url, ordersaga_tests::API_KEY, downstream);
        settings.engine = orchestrator::EngineArgs {
            compensation_max_backoff_ms: 50,
            compensation_stuck_after_secs: 1,
            ..Default::default()
        };
        settings
    })
    .await;
    let client = ordersaga_proto::client::OrderClient::connect(
        orchestrator.endpoint(),
        ordersaga_tests::API_KEY,
    )
    .await
    .unwrap();
    let created = client
        .create_order(order(&request_id(), "alice", &[("BOOK", 1)], "AQ"))
        .await
        .unwrap();
    let pool = orchestrator.db.pool().await;
    eventually("the stuck announcement", WAIT, || {
        let pool = pool.clone();
        let id = created.order_id.clone();
        async move { (outbox_of(&pool, &id).await.len() == 2).then_some(()) }
    })
    .await;
    assert_eq!(
        outbox_of(&pool, &created.order_id).await,
        vec![
            (1, "order.created".to_owned()),
            (2, "order.compensation_stuck".to_owned())
        ]
    );
    // What the relay's pruning does to sent events past their retention.
    sqlx::query("DELETE FROM outbox WHERE aggregate_id = $1")
        .bind(&created.order_id)
        .execute(&pool)
        .await
        .unwrap();
    proxy.set_rule(Rule::Pass);
    let order = terminal_order(&client, &created.order_id, WAIT).await;
    assert_eq!(order.status, OrderStatus::Compensated as i32, "{order:?}");
    assert_eq!(
        outbox_of(&pool, &created.order_id).await,
        vec![(3, "order.compensated".to_owned())],
        "the sequence goes on after pruning"
    );
}

/// An event that no queue is bound for is kept in the durable queue
/// `<exchange>.unrouted`, not confirmed into the void. Many orders' events,
/// parked from the same relay batches: each is kept once, every order's in
/// its order.
async fn events_no_queue_is_bound_for_are_parked_not_lost(backend: Backend) {
    const ORDERS: usize = 24;
    let exchange = unique_exchange();
    let options = Options {
        broker: Some(broker(rabbitmq_url(), &exchange)),
        ..Default::default()
    };
    let system = System::start(backend, options).await;
    let client = system.client().await;
    let created = futures::future::join_all((0..ORDERS).map(|_| {
        let client = client.clone();
        async move {
            let mut request = order(&request_id(), "alice", &[("PEN", 1)], "DE");
            request.wait = true;
            client.create_order(request).await.unwrap()
        }
    }))
    .await;
    for done in &created {
        assert_eq!(done.status, OrderStatus::Completed as i32);
    }
    let pool = system.orchestrator.db.pool().await;
    eventually("the relay to confirm every event", WAIT, || {
        let pool = pool.clone();
        async move {
            let unsent: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE sent_at_ms IS NULL")
                    .fetch_one(&pool)
                    .await
                    .ok()?;
            (unsent == 0).then_some(())
        }
    })
    .await;
    let parked = ordersaga_tests::broker::drain_queue(&format!("{exchange}.unrouted")).await;
    assert_eq!(parked.len(), 2 * ORDERS, "each event parked once");
    for done in &created {
        let types: Vec<String> = parked
            .iter()
            .filter(|e| e.field("order_id") == done.order_id.as_str())
            .map(|e| {
                e.field("event_type")
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            types,
            vec!["order.created".to_owned(), "order.completed".to_owned()],
            "order {}: both events are parked, in order",
            done.order_id
        );
    }
}
