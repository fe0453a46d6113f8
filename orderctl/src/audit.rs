//! `orderctl audit`: reconciles the saga log with each service's own records.
//!
//! For every order a filter matches, the orchestrator's outcome says which
//! effects must exist: a COMPLETED order holds its units (the same lines),
//! a prepared shipment and a charge of its total; an order that ended
//! otherwise holds none of them (released, cancelled, refunded, or never
//! made). Each service is asked through its own read RPC. Open orders are
//! skipped (their effects are still moving), and so is an effect a person
//! undid by hand (ResolveCompensation): the system cannot see it.

use std::collections::BTreeMap;

use futures::{StreamExt as _, stream};
use indicatif::{ProgressBar, ProgressStyle};
use ordersaga_proto::{
    client::ApiKey,
    orders::v1::{Order, OrderStatus, StepPhase},
    payment::v1::{
        GetPaymentRequest, Payment, PaymentStatus, payment_service_client::PaymentServiceClient,
    },
    shipping::v1::{
        GetShipmentRequest, Shipment, ShipmentStatus,
        shipping_service_client::ShippingServiceClient,
    },
    stock::v1::{
        GetReservationRequest, Reservation, ReservationStatus,
        stock_service_client::StockServiceClient,
    },
};
use serde_json::json;
use tonic::{Code, Status, service::interceptor::InterceptedService, transport::Channel};

/// Orders checked at once (three reads each).
const IN_FLIGHT: usize = 8;

type Authed = InterceptedService<Channel, ApiKey>;

/// The three services' read RPCs.
pub struct Services {
    stock: StockServiceClient<Authed>,
    shipping: ShippingServiceClient<Authed>,
    payment: PaymentServiceClient<Authed>,
}

impl Services {
    /// Connects to each service; the error names the one that failed.
    pub async fn connect(
        stock: &str,
        shipping: &str,
        payment: &str,
        key: &str,
    ) -> Result<Self, Status> {
        let channel = |name: &'static str, addr: String| async move {
            let endpoint = tonic::transport::Endpoint::from_shared(addr.clone())
                .map_err(|e| Status::invalid_argument(format!("--{name}-addr {addr:?}: {e}")))?;
            endpoint.connect().await.map_err(|e| {
                let cause = anyhow::Error::from(e);
                Status::unavailable(format!(
                    "cannot connect to the {name} service at {addr}: {cause:#}"
                ))
            })
        };
        let key = ApiKey::new(key);
        Ok(Services {
            stock: StockServiceClient::with_interceptor(
                channel("stock", stock.to_owned()).await?,
                key.clone(),
            ),
            shipping: ShippingServiceClient::with_interceptor(
                channel("shipping", shipping.to_owned()).await?,
                key.clone(),
            ),
            payment: PaymentServiceClient::with_interceptor(
                channel("payment", payment.to_owned()).await?,
                key,
            ),
        })
    }

    /// What each service holds for the order (`None`: it never saw it).
    async fn effects(&self, order_id: &str) -> Result<Effects, Status> {
        let order_id = order_id.to_owned();
        let (reservation, shipment, payment) = tokio::try_join!(
            async {
                let request = GetReservationRequest {
                    order_id: order_id.clone(),
                };
                absent_if_not_found(self.stock.clone().get_reservation(request).await, "stock")
                    .map(|r| r.and_then(|r| r.reservation))
            },
            async {
                let request = GetShipmentRequest {
                    order_id: order_id.clone(),
                };
                absent_if_not_found(
                    self.shipping.clone().get_shipment(request).await,
                    "shipping",
                )
                .map(|r| r.and_then(|r| r.shipment))
            },
            async {
                let request = GetPaymentRequest {
                    order_id: order_id.clone(),
                };
                absent_if_not_found(self.payment.clone().get_payment(request).await, "payment")
                    .map(|r| r.and_then(|r| r.payment))
            },
        )?;
        Ok(Effects {
            reservation,
            shipment,
            payment,
        })
    }
}

fn absent_if_not_found<T>(
    reply: Result<tonic::Response<T>, Status>,
    service: &str,
) -> Result<Option<T>, Status> {
    match reply {
        Ok(reply) => Ok(Some(reply.into_inner())),
        Err(status) if status.code() == Code::NotFound => Ok(None),
        Err(status) => Err(Status::new(
            status.code(),
            format!("reading the {service} service: {}", status.message()),
        )),
    }
}

/// The effects of one order in the three services.
#[derive(Debug, Default)]
pub struct Effects {
    pub reservation: Option<Reservation>,
    pub shipment: Option<Shipment>,
    pub payment: Option<Payment>,
}

/// An effect that does not fit the order's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub order_id: String,
    pub status: String,
    pub service: &'static str,
    pub found: String,
    pub expected: String,
}

/// The audit's findings.
#[derive(Debug, Default)]
pub struct Report {
    pub checked: usize,
    /// Still running, compensating or waiting for a person: not checked.
    pub open: usize,
    /// Effects a person undid by hand, which the system cannot see.
    pub resolved_by_hand: usize,
    pub mismatches: Vec<Mismatch>,
}

impl Report {
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "checked": self.checked,
            "open": self.open,
            "resolvedByHand": self.resolved_by_hand,
            "mismatches": self.mismatches.iter().map(|m| json!({
                "orderId": m.order_id,
                "status": m.status,
                "service": m.service,
                "found": m.found,
                "expected": m.expected,
            })).collect::<Vec<_>>(),
        })
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        for m in &self.mismatches {
            out.push_str(&format!(
                "MISMATCH order {} ({}): {}: {}, expected {}\n",
                m.order_id, m.status, m.service, m.found, m.expected
            ));
        }
        out.push_str(&format!(
            "audited {} orders: {} mismatches; {} open (not checked); {} effects resolved by hand (not checked)\n",
            self.checked,
            self.mismatches.len(),
            self.open,
            self.resolved_by_hand
        ));
        out
    }
}

/// Audits `orders`, with a progress bar.
pub async fn run(services: &Services, orders: &[Order]) -> Result<Report, Status> {
    let bar = ProgressBar::new(orders.len() as u64).with_style(
        ProgressStyle::with_template("audit [{bar:40}] {pos}/{len} ({eta} left)")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let reads = orders.iter().map(|order| {
        let bar = bar.clone();
        async move {
            let effects = match is_open(order) {
                true => None,
                false => Some(services.effects(&order.order_id).await?),
            };
            bar.inc(1);
            Ok::<_, Status>((order, effects))
        }
    });
    let mut report = Report::default();
    let mut results = stream::iter(reads).buffer_unordered(IN_FLIGHT);
    while let Some(result) = results.next().await {
        let (order, effects) = result?;
        report.checked += 1;
        match effects {
            None => report.open += 1,
            Some(effects) => {
                let (mismatches, by_hand) = check(order, &effects);
                report.mismatches.extend(mismatches);
                report.resolved_by_hand += by_hand;
            }
        }
    }
    bar.finish_and_clear();
    report
        .mismatches
        .sort_by(|a, b| (&a.order_id, a.service).cmp(&(&b.order_id, b.service)));
    Ok(report)
}

fn is_open(order: &Order) -> bool {
    matches!(
        order.status(),
        OrderStatus::Pending
            | OrderStatus::Running
            | OrderStatus::Compensating
            | OrderStatus::NeedsAttention
            | OrderStatus::Unspecified
    )
}

/// The services whose effect a person undid by hand for this order.
fn resolved_by_hand(order: &Order) -> Vec<&'static str> {
    order
        .steps
        .iter()
        .filter(|s| {
            s.phase() == StepPhase::Compensation && s.result.starts_with("resolved by hand")
        })
        .filter_map(|s| service_of(&s.name))
        .collect()
}

/// The service a step of the order saga calls.
fn service_of(step: &str) -> Option<&'static str> {
    match step {
        "reserve_stock" => Some("stock"),
        "prepare_shipment" => Some("shipping"),
        "charge_payment" => Some("payment"),
        _ => None,
    }
}

/// The mismatches of one terminal order, and how many of its effects were
/// resolved by hand (and so not checked).
pub fn check(order: &Order, effects: &Effects) -> (Vec<Mismatch>, usize) {
    let by_hand = resolved_by_hand(order);
    let status = order
        .status()
        .as_str_name()
        .trim_start_matches("ORDER_STATUS_")
        .to_owned();
    let completed = order.status() == OrderStatus::Completed;
    let mut found = Vec::new();
    let mut mismatch = |service: &'static str, seen: String, expected: String| {
        if !by_hand.contains(&service) {
            found.push(Mismatch {
                order_id: order.order_id.clone(),
                status: status.clone(),
                service,
                found: seen,
                expected,
            });
        }
    };

    let held = effects
        .reservation
        .as_ref()
        .filter(|r| r.status() == ReservationStatus::Reserved);
    if completed {
        let wanted: BTreeMap<&str, i64> = order
            .items
            .iter()
            .map(|i| (i.sku.as_str(), i.quantity))
            .collect();
        match held {
            None => mismatch(
                "stock",
                describe_reservation(effects.reservation.as_ref()),
                lines(&wanted, "reserved"),
            ),
            Some(r) => {
                let holds: BTreeMap<&str, i64> = r
                    .lines
                    .iter()
                    .map(|l| (l.sku.as_str(), l.quantity))
                    .collect();
                if holds != wanted {
                    mismatch(
                        "stock",
                        lines(&holds, "reserved"),
                        lines(&wanted, "reserved"),
                    );
                }
            }
        }
        match effects.shipment.as_ref().map(Shipment::status) {
            Some(ShipmentStatus::Prepared) => {}
            other => mismatch(
                "shipping",
                describe_shipment(other),
                "a prepared shipment".into(),
            ),
        }
        match effects.payment.as_ref() {
            Some(p) if p.status() == PaymentStatus::Charged => {
                if p.amount_cents != order.total_cents || p.currency != order.currency {
                    mismatch(
                        "payment",
                        format!("charged {} {}", p.amount_cents, p.currency),
                        format!("charged {} {}", order.total_cents, order.currency),
                    );
                }
            }
            other => mismatch(
                "payment",
                describe_payment(other),
                format!("charged {} {}", order.total_cents, order.currency),
            ),
        }
    } else {
        if held.is_some() {
            mismatch(
                "stock",
                describe_reservation(effects.reservation.as_ref()),
                "nothing held".into(),
            );
        }
        if let Some(ShipmentStatus::Prepared) = effects.shipment.as_ref().map(Shipment::status) {
            mismatch(
                "shipping",
                "a prepared shipment".into(),
                "none, or cancelled".into(),
            );
        }
        if let Some(p) = effects
            .payment
            .as_ref()
            .filter(|p| p.status() == PaymentStatus::Charged)
        {
            mismatch(
                "payment",
                format!("charged {} {}", p.amount_cents, p.currency),
                "nothing charged, or refunded".into(),
            );
        }
    }
    (found, by_hand.len())
}

fn lines(lines: &BTreeMap<&str, i64>, verb: &str) -> String {
    let each: Vec<String> = lines.iter().map(|(sku, n)| format!("{n} {sku}")).collect();
    format!("{verb} {}", each.join(", "))
}

fn describe_reservation(reservation: Option<&Reservation>) -> String {
    match reservation {
        None => "no reservation".into(),
        Some(r) => format!(
            "reservation {}",
            r.status()
                .as_str_name()
                .trim_start_matches("RESERVATION_STATUS_")
        ),
    }
}

fn describe_shipment(status: Option<ShipmentStatus>) -> String {
    match status {
        None => "no shipment".into(),
        Some(s) => format!(
            "shipment {}",
            s.as_str_name().trim_start_matches("SHIPMENT_STATUS_")
        ),
    }
}

fn describe_payment(payment: Option<&Payment>) -> String {
    match payment {
        None => "no payment".into(),
        Some(p) => format!(
            "payment {}",
            p.status()
                .as_str_name()
                .trim_start_matches("PAYMENT_STATUS_")
        ),
    }
}

#[cfg(test)]
mod tests {
    use ordersaga_proto::{
        orders::v1::{PricedItem, Step, StepStatus},
        stock::v1::ReservedLine,
    };

    use super::*;

    fn order(status: OrderStatus) -> Order {
        Order {
            order_id: "o1".into(),
            status: status as i32,
            items: vec![PricedItem {
                sku: "BOOK".into(),
                quantity: 2,
                unit_price_cents: 1500,
                line_total_cents: 3000,
            }],
            total_cents: 3000,
            currency: "EUR".into(),
            ..Default::default()
        }
    }

    fn all_done(reserved: i64, amount: i64) -> Effects {
        Effects {
            reservation: Some(Reservation {
                status: ReservationStatus::Reserved as i32,
                lines: vec![ReservedLine {
                    sku: "BOOK".into(),
                    quantity: reserved,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            shipment: Some(Shipment {
                status: ShipmentStatus::Prepared as i32,
                ..Default::default()
            }),
            payment: Some(Payment {
                status: PaymentStatus::Charged as i32,
                amount_cents: amount,
                currency: "EUR".into(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_completed_order_needs_every_effect_as_ordered() {
        let completed = order(OrderStatus::Completed);
        assert_eq!(check(&completed, &all_done(2, 3000)).0, vec![]);
        let (found, _) = check(&completed, &all_done(1, 2999));
        let services: Vec<&str> = found.iter().map(|m| m.service).collect();
        assert_eq!(services, ["stock", "payment"], "{found:?}");
        assert_eq!(found[0].found, "reserved 1 BOOK");
        assert_eq!(check(&completed, &Effects::default()).0.len(), 3);
    }

    #[test]
    fn an_undone_order_holds_nothing_unless_a_person_undid_it_by_hand() {
        let mut compensated = order(OrderStatus::Compensated);
        assert_eq!(check(&compensated, &Effects::default()).0, vec![]);
        assert_eq!(check(&compensated, &all_done(2, 3000)).0.len(), 3);
        compensated.steps.push(Step {
            name: "reserve_stock".into(),
            phase: StepPhase::Compensation as i32,
            status: StepStatus::Succeeded as i32,
            result: "resolved by hand by ops@example.com: released 2 BOOK".into(),
            ..Default::default()
        });
        let (found, by_hand) = check(&compensated, &all_done(2, 3000));
        assert_eq!(by_hand, 1);
        let services: Vec<&str> = found.iter().map(|m| m.service).collect();
        assert_eq!(services, ["shipping", "payment"]);
    }
}
