//! Output: pure functions from messages to text (for people, as a table, or
//! as JSON), so the layout lives in one place and `main` only decides what to
//! print.

use std::{
    fmt::Write as _,
    time::{SystemTime, UNIX_EPOCH},
};

use ordersaga_proto::Timestamp;
use ordersaga_proto::orders::v1::{
    ListOrdersResponse, Order, OrderStatus, Step, StepPhase, StepStatus,
};
use serde_json::Value;
use tonic::{Code, Status};

/// The saga's forward steps, as named in `orders.proto`. `watch` counts the
/// ones the order does not list yet, so its total means the whole saga rather
/// than the steps started so far.
const FORWARD_STEPS: [&str; 3] = ["reserve_stock", "prepare_shipment", "charge_payment"];

/// An order in full: header, items, address, steps, trace.
pub fn order(order: &Order) -> String {
    let mut out = format!("{}\n", order_line(order));
    for (i, item) in order.items.iter().enumerate() {
        let label = if i == 0 { "items:" } else { "" };
        let _ = writeln!(
            out,
            "  {label:<7} {} x{} @ {}",
            item.sku,
            item.quantity,
            money(item.unit_price_cents)
        );
    }
    if let Some(to) = &order.shipping_address {
        let _ = writeln!(
            out,
            "  ship to: {}, {}, {} {}, {}",
            to.recipient, to.line1, to.postal_code, to.city, to.country
        );
    }
    if !order.failure_reason.is_empty() {
        let _ = writeln!(out, "  failure: {}", order.failure_reason);
    }
    if order.steps.is_empty() {
        out.push_str("  steps: none yet\n");
    } else {
        out.push_str("  steps:\n");
        for step in &order.steps {
            let _ = write!(
                out,
                "    {:<13} {:<17} {:<9}  attempts {}",
                step_phase(step.phase).to_lowercase(),
                step.name,
                step_status(step.status),
                step.attempts
            );
            if !step.result.is_empty() {
                let _ = write!(out, "  {}", step.result);
            }
            if !step.last_error.is_empty() {
                let _ = write!(out, "  last error: {}", step.last_error);
            }
            out.push('\n');
        }
    }
    if !order.trace_id.is_empty() {
        let _ = writeln!(out, "  trace: {}", order.trace_id);
    }
    out
}

/// A message in the proto3 JSON mapping (what grpcurl prints), indented.
pub fn json(message: &impl serde::Serialize) -> String {
    let mut out = serde_json::to_string_pretty(message).expect("messages serialize");
    out.push('\n');
    out
}

/// A message in the proto3 JSON mapping on one line (a stream's item).
pub fn json_line(message: &impl serde::Serialize) -> String {
    serde_json::to_string(message).expect("messages serialize")
}

const TABLE_HEADER: [&str; 7] = [
    "ORDER", "STATUS", "CUSTOMER", "TOTAL", "CURRENCY", "STEPS", "UPDATED",
];

/// Orders as rows under a header, columns padded to their widest cell.
pub fn orders_table(orders: &[Order]) -> String {
    let rows: Vec<[String; 7]> = orders.iter().map(table_row).collect();
    let mut widths = TABLE_HEADER.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header = TABLE_HEADER.map(str::to_owned);
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// An order's cells, in [`TABLE_HEADER`]'s order.
fn table_row(order: &Order) -> [String; 7] {
    [
        order.order_id.clone(),
        order_status(order.status),
        order.customer_id.clone(),
        money(order.total_cents),
        order.currency.clone(),
        finished_steps(order),
        clock(order.updated_at.as_ref()),
    ]
}

/// One line per order, as the first line of [`order`], so `list` and `get` agree.
pub fn order_line(order: &Order) -> String {
    format!(
        "order {}  {:<11} customer {}   total {} {}",
        order.order_id,
        order_status(order.status),
        order.customer_id,
        money(order.total_cents),
        order.currency
    )
}

/// A page of orders, then the token to pass as `--page-token` for the next one.
pub fn list_page(page: &ListOrdersResponse) -> String {
    let mut out = String::new();
    if page.orders.is_empty() {
        out.push_str("no orders\n");
    }
    for order in &page.orders {
        let _ = writeln!(out, "{}", order_line(order));
    }
    if page.next_page_token.is_empty() {
        out.push_str("(last page)\n");
    } else {
        let _ = writeln!(out, "next page token: {}", page.next_page_token);
    }
    out
}

/// `bulk … --dry-run`: the orders the action would take, and how many.
pub fn bulk_dry_run(verb: &str, orders: &[Order], output: crate::cli::Output) -> String {
    use crate::cli::Output;
    match output {
        Output::Json => json(&serde_json::json!({
            "action": verb,
            "dryRun": true,
            "matched": orders.len(),
            "orders": orders.iter().map(|o| &o.order_id).collect::<Vec<_>>(),
        })),
        Output::Table => {
            let mut out = orders_table(orders);
            let _ = writeln!(out, "dry run: would {verb} {} orders", orders.len());
            out
        }
        Output::Text => {
            let mut out = String::new();
            for order in orders {
                let _ = writeln!(out, "{}", order_line(order));
            }
            let _ = writeln!(out, "dry run: would {verb} {} orders", orders.len());
            out
        }
    }
}

/// What a bulk action did: the counts, then each order skipped or failed.
pub fn bulk_outcome(
    verb: &str,
    outcome: &crate::bulk::Outcome,
    matched: usize,
    batch_id: &str,
) -> String {
    let mut out = format!(
        "{verb}: {} of {matched} orders done, {} skipped, {} failed (batch {batch_id})\n",
        outcome.done.len(),
        outcome.skipped.len(),
        outcome.failed.len(),
    );
    for (order_id, reason) in &outcome.skipped {
        let _ = writeln!(out, "skipped {order_id}: {reason}");
    }
    for (order_id, failure) in &outcome.failed {
        let _ = writeln!(out, "failed  {order_id}: {}", status(failure));
    }
    out
}

/// `watch`'s line for one update, without the time: status, steps finished out
/// of the total, and the step that moved last.
///
/// Kept apart from the time so `watch` can skip updates that change nothing
/// visible.
pub fn progress(order: &Order) -> String {
    let mut out = format!(
        "{:<13} {} steps done",
        order_status(order.status),
        finished_steps(order)
    );
    if let Some(step) = latest_step(&order.steps) {
        let _ = write!(out, " ({} {})", step.name, step_status(step.status));
    }
    if !order.failure_reason.is_empty() {
        let _ = write!(out, "  failure: {}", order.failure_reason);
    }
    out
}

/// "finished/total": the steps settled out of those the saga has or will have.
fn finished_steps(order: &Order) -> String {
    // Settled steps, whatever the outcome: a skipped step (the order was
    // cancelled first) will never run, so it counts as done too.
    let finished = order
        .steps
        .iter()
        .filter(|s| {
            matches!(
                StepStatus::try_from(s.status),
                Ok(StepStatus::Succeeded
                    | StepStatus::Failed
                    | StepStatus::Unknown
                    | StepStatus::Skipped)
            )
        })
        .count();
    // While the saga moves forward, steps not started yet are still to come;
    // once it compensates or ends, they never will be.
    let moving_forward = matches!(
        OrderStatus::try_from(order.status),
        Ok(OrderStatus::Unspecified | OrderStatus::Pending | OrderStatus::Running)
    );
    let to_come = if moving_forward {
        FORWARD_STEPS
            .iter()
            .filter(|name| !order.steps.iter().any(|s| s.name == **name))
            .count()
    } else {
        0
    };
    format!("{finished}/{}", order.steps.len() + to_come)
}

/// The step that moved last: the latest started or finished, and on a tie (or
/// without times) the later in the list, which is the saga's order.
fn latest_step(steps: &[Step]) -> Option<&Step> {
    steps
        .iter()
        .enumerate()
        .filter(|(_, s)| s.status != StepStatus::Unspecified as i32)
        .max_by_key(|(i, s)| {
            let moved = s.finished_at.as_ref().or(s.started_at.as_ref());
            (moved.map(|t| (t.seconds, t.nanos)), *i)
        })
        .map(|(_, s)| s)
}

/// `events`' line for one order event (the JSON body the orchestrator
/// publishes): when it happened, its type and number in the order's sequence,
/// the order, status, total and trace ID, then the failure or the stuck step
/// when there is one. Missing fields show as `?`, so an unexpected event is
/// still printed.
pub fn event(event: &Value, routing_key: &str, redelivered: bool) -> String {
    let event_type = event["event_type"].as_str().unwrap_or(routing_key);
    let occurred = event["occurred_at_ms"].as_i64().map(|ms| Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: 0,
    });
    let mut total = event["total_cents"]
        .as_i64()
        .map_or_else(|| "?".into(), money);
    if let Some(currency) = event["currency"].as_str().filter(|c| !c.is_empty()) {
        let _ = write!(total, " {currency}");
    }
    let mut out = format!(
        "[{}] {event_type:<17} #{:<3} order {}  {:<12} {total}",
        clock(occurred.as_ref()),
        field(event, "sequence"),
        field(event, "order_id"),
        field(event, "status"),
    );
    if let Some(traceparent) = event["traceparent"].as_str().filter(|t| !t.is_empty()) {
        let _ = write!(out, "  trace {}", trace_id(traceparent));
    }
    if let Some(reason) = event["failure_reason"].as_str().filter(|r| !r.is_empty()) {
        let _ = write!(out, "  failure: {reason}");
    }
    // order.compensation_stuck
    if event.get("step").is_some() {
        let _ = write!(
            out,
            "  stuck: {} after {} attempts, last error: {}",
            field(event, "step"),
            field(event, "attempts"),
            field(event, "last_error")
        );
    }
    if redelivered {
        out.push_str("  (redelivered)");
    }
    out
}

/// A field of an event as text: strings as they are, other values as JSON,
/// `?` when missing.
fn field(event: &Value, key: &str) -> String {
    match &event[key] {
        Value::Null => "?".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The trace ID of a W3C `traceparent` (`00-TRACE_ID-SPAN_ID-FLAGS`), as `get`
/// prints it; anything else as it is.
fn trace_id(traceparent: &str) -> &str {
    match traceparent.split('-').collect::<Vec<_>>()[..] {
        [_, trace_id, _, _] if !trace_id.is_empty() => trace_id,
        _ => traceparent,
    }
}

/// `HH:MM:SS` in UTC of `at`, or of now when the server sent no time.
///
/// UTC because the local offset needs a time-zone database this tool does not
/// carry.
pub fn clock(at: Option<&Timestamp>) -> String {
    let seconds = at.map_or_else(
        || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        },
        |t| t.seconds,
    );
    let of_day = seconds.rem_euclid(86_400);
    format!(
        "{:02}:{:02}:{:02}",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

/// `CODE: message`, the code spelled as in the gRPC spec (`NOT_FOUND`), which
/// is how the README and grpcurl users know them.
pub fn status(status: &Status) -> String {
    let code = code_name(status.code());
    if status.message().is_empty() {
        code
    } else {
        format!("{code}: {}", status.message())
    }
}

fn code_name(code: Code) -> String {
    // `Code`'s Debug is the CamelCase variant (`DeadlineExceeded`).
    let mut name = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if i > 0 && c.is_ascii_uppercase() {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// Cents as `12.34`; the system prices everything in cents.
fn money(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let cents = cents.unsigned_abs();
    format!("{sign}{}.{:02}", cents / 100, cents % 100)
}

// Enum names without their prefix. A value this build doesn't know (a newer
// server) shows as its number rather than as UNSPECIFIED, which would be wrong.

fn order_status(value: i32) -> String {
    let name = OrderStatus::try_from(value).map(|s| s.as_str_name());
    enum_name(name.ok(), "ORDER_STATUS_", value)
}

fn step_status(value: i32) -> String {
    let name = StepStatus::try_from(value).map(|s| s.as_str_name());
    enum_name(name.ok(), "STEP_STATUS_", value)
}

fn step_phase(value: i32) -> String {
    let name = StepPhase::try_from(value).map(|s| s.as_str_name());
    enum_name(name.ok(), "STEP_PHASE_", value)
}

fn enum_name(name: Option<&'static str>, prefix: &str, value: i32) -> String {
    match name {
        Some(name) => name.strip_prefix(prefix).unwrap_or(name).to_owned(),
        None => format!("#{value}"),
    }
}

#[cfg(test)]
mod tests {
    use ordersaga_proto::{
        Timestamp,
        orders::v1::{ListOrdersResponse, Order, OrderStatus, Step, StepPhase, StepStatus},
    };
    use serde_json::json;

    use super::{event, json as to_json, orders_table};

    fn compensated() -> Order {
        Order {
            order_id: "0190f1c2-0000-7000-8000-000000000001".into(),
            customer_id: "alice".into(),
            status: OrderStatus::Compensated as i32,
            total_cents: 123_456,
            currency: "EUR".into(),
            updated_at: Some(Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            steps: vec![Step {
                name: "reserve_stock".into(),
                phase: StepPhase::Forward as i32,
                status: StepStatus::Succeeded as i32,
                attempts: 1,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// The proto3 JSON mapping, as grpcurl prints it: camelCase names, enum
    /// names, 64-bit integers as strings, RFC 3339 times.
    #[test]
    fn json_follows_the_proto3_mapping() {
        let page = ListOrdersResponse {
            orders: vec![compensated()],
            next_page_token: "t2".into(),
        };
        let printed: serde_json::Value = serde_json::from_str(&to_json(&page)).unwrap();
        let order = &printed["orders"][0];
        assert_eq!(order["orderId"], "0190f1c2-0000-7000-8000-000000000001");
        assert_eq!(order["status"], "ORDER_STATUS_COMPENSATED");
        assert_eq!(order["totalCents"], "123456");
        assert_eq!(order["updatedAt"], "2023-11-14T22:13:20+00:00");
        assert_eq!(order["steps"][0]["status"], "STEP_STATUS_SUCCEEDED");
        assert_eq!(printed["nextPageToken"], "t2");
    }

    #[test]
    fn a_table_has_a_header_and_aligned_columns() {
        let mut second = compensated();
        second.order_id = "o2".into();
        second.customer_id = "a-much-longer-customer".into();
        let table = orders_table(&[compensated(), second]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("ORDER"), "{table}");
        let status_at = lines[0].find("STATUS").unwrap();
        let customer_at = lines[0].find("CUSTOMER").unwrap();
        for line in &lines[1..] {
            assert_eq!(&line[status_at..status_at + 11], "COMPENSATED", "{table}");
            assert!(line[customer_at..].starts_with('a'), "{table}");
        }
        assert!(
            lines[1].contains("1234.56") && lines[1].contains("EUR"),
            "{table}"
        );
    }

    #[test]
    fn event_line() {
        let completed = json!({
            "event_id": "e1",
            "event_type": "order.completed",
            "sequence": 2,
            "occurred_at_ms": 1_700_000_463_000_i64,
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "order_id": "3f2a0c1e-0000-4000-8000-000000000001",
            "customer_id": "alice",
            "status": "COMPLETED",
            "total_cents": 3999,
            "currency": "EUR",
            "failure_reason": ""
        });
        assert_eq!(
            event(&completed, "order.completed", false),
            "[22:21:03] order.completed   #2   order 3f2a0c1e-0000-4000-8000-000000000001  \
             COMPLETED    39.99 EUR  trace 4bf92f3577b34da6a3ce929d0e0e4736"
        );

        let stuck = json!({
            "event_type": "order.compensation_stuck",
            "sequence": 5,
            "occurred_at_ms": 1_700_000_463_000_i64,
            "traceparent": "",
            "order_id": "o1",
            "status": "COMPENSATING",
            "total_cents": 100,
            "currency": "EUR",
            "failure_reason": "payment declined",
            "step": "reserve_stock",
            "attempts": 7,
            "last_error": "UNAVAILABLE"
        });
        assert_eq!(
            event(&stuck, "order.compensation_stuck", true),
            "[22:21:03] order.compensation_stuck #5   order o1  COMPENSATING 1.00 EUR  \
             failure: payment declined  stuck: reserve_stock after 7 attempts, \
             last error: UNAVAILABLE  (redelivered)"
        );

        // Whatever is missing shows as `?`; the type falls back to the routing key.
        assert!(
            event(&json!({}), "order.odd", false)
                .ends_with("order.odd         #?   order ?  ?            ?")
        );
    }
}
