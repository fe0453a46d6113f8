//! The explorer's JSON API, under `/api`. Reads and actions go through the
//! same `OrderService` handlers as gRPC, so a request is checked, refused
//! and recorded exactly as there; orders are the proto3 JSON the gRPC
//! gateway and grpcurl print.
//!
//! - `GET  /api/session`: the key's scope and the Jaeger URL.
//! - `GET  /api/counts`: how many orders rest in each status.
//! - `GET  /api/orders?status=&customer_id=&created_after=&created_before=&page_size=&page_token=`
//! - `GET  /api/orders/{id}`: the order, and its saga's pivot, cancel, events,
//!   actions and the attempts of its retried steps.
//! - `GET  /api/orders/{id}/live`: that, again at every change, as server-sent events.
//! - `POST /api/orders/{id}/retry|resolve|cancel`: operator actions (admin key).

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use axum::{
    body::Bytes,
    extract::{ConnectInfo, Path, RawQuery, State},
    http::HeaderMap,
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use futures::StreamExt;
use ordersaga_proto::{
    Timestamp,
    orders::v1::{
        CancelOrderRequest, ListOrdersRequest, OrderStatus, ResolveCompensationRequest,
        RetryCompensationRequest, WatchOrderRequest, order_service_server::OrderService,
    },
};
use saga_engine::{Engine, log::history::SagaHistory};
use serde_json::{Map, Value, json};
use svc_kit::auth::Keys;
use tonic::{Request, transport::server::TcpConnectInfo};
use uuid::Uuid;

use super::{
    access::{self, Scope},
    reply::{self, Refusal},
};
use crate::{
    order_saga::OrderData,
    orders::{OrderApi, store, view},
};

/// What every handler shares.
#[derive(Clone)]
pub struct Explorer {
    pub api: Arc<OrderApi>,
    pub engine: Engine<OrderData>,
    pub keys: Keys,
    /// Jaeger's UI, e.g. `http://localhost:16686`; a trace is `{url}/trace/{id}`.
    pub jaeger_url: Option<String>,
}

type Answer = Result<Response, Refusal>;

pub async fn session(State(x): State<Explorer>, headers: HeaderMap) -> Answer {
    let scope = access::scope(&x.keys, &headers)?;
    Ok(reply::json(&json!({
        "scope": scope.as_str(),
        "actions": scope == Scope::Admin,
        "jaegerUrl": x.jaeger_url,
    })))
}

pub async fn counts(State(x): State<Explorer>, headers: HeaderMap) -> Answer {
    access::scope(&x.keys, &headers)?;
    let counts = x.engine.count_by_status().await.map_err(internal)?;
    let counts: Map<String, Value> = counts
        .into_iter()
        .map(|(status, n)| (status.as_str().to_owned(), n.into()))
        .collect();
    Ok(reply::json(&json!({ "counts": counts })))
}

pub async fn list(
    State(x): State<Explorer>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Answer {
    access::scope(&x.keys, &headers)?;
    let request = list_request(query.as_deref().unwrap_or(""))?;
    let page = x.api.list_orders(Request::new(request)).await?.into_inner();
    Ok(reply::json(&to_json(&page)?))
}

/// The query string as a `ListOrdersRequest`; a parameter it does not know,
/// or a value it cannot read, is refused by name.
fn list_request(query: &str) -> Result<ListOrdersRequest, Refusal> {
    let mut request = ListOrdersRequest::default();
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match name.as_ref() {
            "status" => {
                for status in value.split(',').filter(|s| !s.is_empty()) {
                    request.statuses.push(status_named(status)? as i32);
                }
            }
            "customer_id" => request.customer_id = value.into_owned(),
            "created_after" => request.created_after = Some(timestamp("created_after", &value)?),
            "created_before" => request.created_before = Some(timestamp("created_before", &value)?),
            "page_size" => {
                request.page_size = value.parse().map_err(|_| {
                    Refusal::invalid(format!("page_size: {value:?} is not a whole number"))
                })?
            }
            "page_token" => request.page_token = value.into_owned(),
            other => {
                return Err(Refusal::invalid(format!(
                    "unknown query parameter {other:?}: use status, customer_id, created_after, created_before, page_size or page_token"
                )));
            }
        }
    }
    Ok(request)
}

/// `RUNNING` or `ORDER_STATUS_RUNNING`.
fn status_named(name: &str) -> Result<OrderStatus, Refusal> {
    let full = if name.starts_with("ORDER_STATUS_") {
        name.to_owned()
    } else {
        format!("ORDER_STATUS_{name}")
    };
    OrderStatus::from_str_name(&full)
        .filter(|s| *s != OrderStatus::Unspecified)
        .ok_or_else(|| {
            Refusal::invalid(format!(
                "status: {name:?} is not an order status (e.g. RUNNING, COMPENSATED, NEEDS_ATTENTION)"
            ))
        })
}

/// An RFC 3339 time, e.g. `2026-12-04T10:00:00Z`.
fn timestamp(field: &str, value: &str) -> Result<Timestamp, Refusal> {
    serde_json::from_value::<Timestamp>(Value::String(value.to_owned())).map_err(|_| {
        Refusal::invalid(format!(
            "{field}: {value:?} is not an RFC 3339 time (e.g. 2026-12-04T10:00:00Z)"
        ))
    })
}

pub async fn order(
    State(x): State<Explorer>,
    headers: HeaderMap,
    Path(order_id): Path<String>,
) -> Answer {
    access::scope(&x.keys, &headers)?;
    let order_id = parse_order_id(&order_id)?;
    Ok(reply::json(&detail(&x, order_id).await?))
}

/// The order at every change, as `data:` frames, until it is terminal. Fed
/// by WatchOrder itself, so the same limits hold (MAX_WATCH_STREAMS, per
/// connection, WATCH_STREAM_MAX_SECS); a refusal ends the stream with an
/// `error` frame.
pub async fn live(
    State(x): State<Explorer>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(order_id): Path<String>,
) -> Answer {
    access::scope(&x.keys, &headers)?;
    let id = parse_order_id(&order_id)?;
    let mut request = Request::new(WatchOrderRequest { order_id });
    request.extensions_mut().insert(TcpConnectInfo {
        local_addr: None,
        remote_addr: Some(remote),
    });
    let changes = x.api.watch_order(request).await?.into_inner();
    let frames = changes.then(move |change| {
        let x = x.clone();
        async move {
            let frame = match change {
                Ok(_) => detail(&x, id).await,
                Err(status) => Err(Refusal::from(status)),
            };
            let data = frame.unwrap_or_else(|refusal| json!({ "error": refusal.body() }));
            Ok::<_, Infallible>(Event::default().data(data.to_string()))
        }
    });
    Ok(Sse::new(frames)
        .keep_alive(KeepAlive::default())
        .into_response())
}

pub async fn retry(
    State(x): State<Explorer>,
    headers: HeaderMap,
    Path(order_id): Path<String>,
    body: Bytes,
) -> Answer {
    let body = Body::admin(&x, &headers, &body)?;
    let request = RetryCompensationRequest {
        request_id: body.text("request_id")?,
        order_id,
    };
    replied(x.api.retry_compensation(Request::new(request)).await)
}

pub async fn resolve(
    State(x): State<Explorer>,
    headers: HeaderMap,
    Path(order_id): Path<String>,
    body: Bytes,
) -> Answer {
    let body = Body::admin(&x, &headers, &body)?;
    let request = ResolveCompensationRequest {
        request_id: body.text("request_id")?,
        order_id,
        operator: body.text("operator")?,
        reason: body.text("reason")?,
    };
    replied(x.api.resolve_compensation(Request::new(request)).await)
}

pub async fn cancel(
    State(x): State<Explorer>,
    headers: HeaderMap,
    Path(order_id): Path<String>,
    body: Bytes,
) -> Answer {
    let body = Body::admin(&x, &headers, &body)?;
    let request = CancelOrderRequest {
        request_id: body.text("request_id")?,
        order_id,
        reason: body.text("reason")?,
    };
    replied(x.api.cancel_order(Request::new(request)).await)
}

pub async fn not_found() -> Refusal {
    Refusal::new(tonic::Code::NotFound, "no such explorer endpoint")
}

/// An action's JSON body: an object of strings.
struct Body(Map<String, Value>);

/// An action's answer: the reply (the order) as JSON, or the refusal.
fn replied<T: serde::Serialize>(reply: Result<tonic::Response<T>, tonic::Status>) -> Answer {
    Ok(reply::json(&to_json(reply?.get_ref())?))
}

impl Body {
    /// The body of an action, once the key is known to be the admin key.
    fn admin(x: &Explorer, headers: &HeaderMap, bytes: &[u8]) -> Result<Body, Refusal> {
        access::require_admin(&x.keys, headers)?;
        Body::parse(bytes)
    }

    fn parse(bytes: &[u8]) -> Result<Body, Refusal> {
        match serde_json::from_slice(bytes) {
            Ok(Value::Object(fields)) => Ok(Body(fields)),
            _ => Err(Refusal::invalid(
                "the body must be a JSON object, e.g. {\"request_id\": \"…\"}",
            )),
        }
    }

    /// The field's text; empty when absent (the handler then names it).
    fn text(&self, field: &str) -> Result<String, Refusal> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(text)) => Ok(text.clone()),
            Some(_) => Err(Refusal::invalid(format!("{field} must be a string"))),
        }
    }
}

fn parse_order_id(order_id: &str) -> Result<Uuid, Refusal> {
    svc_kit::validate::uuid("order_id", order_id).map_err(|e| tonic::Status::from(e).into())
}

/// The order, with what the saga page shows beside it.
async fn detail(x: &Explorer, order_id: Uuid) -> Result<Value, Refusal> {
    let saga = x
        .engine
        .view(order_id)
        .await
        .map_err(internal)?
        .ok_or_else(|| {
            Refusal::new(tonic::Code::NotFound, format!("order {order_id} not found"))
        })?;
    let history = x.engine.history(order_id).await.map_err(internal)?;
    let (order, _) =
        store::render(order_id, &saga).map_err(|e| Refusal::from(tonic::Status::from(e)))?;
    let trace_url = match (&x.jaeger_url, order.trace_id.as_str()) {
        (Some(url), id) if !id.is_empty() => {
            Some(format!("{}/trace/{id}", url.trim_end_matches('/')))
        }
        _ => None,
    };
    Ok(json!({
        "order": to_json(&order)?,
        "saga": {
            "pivotStep": x.engine.definition().pivot,
            "pivotPassed": saga.pivot_passed,
            "cancelRequested": saga.cancel_requested,
            "events": events(&history),
            "actions": actions(&history),
            "attempts": attempts(x, &history),
        },
        "traceUrl": trace_url,
    }))
}

fn events(history: &SagaHistory) -> Vec<Value> {
    history
        .events
        .iter()
        .map(|e| {
            json!({
                "sequence": e.sequence,
                "eventType": e.event_type,
                "createdAt": rfc3339(e.created_at_ms),
                "sentAt": e.sent_at_ms.map(rfc3339),
            })
        })
        .collect()
}

/// Each attempt of a retried step, named as the order's steps are.
fn attempts(x: &Explorer, history: &SagaHistory) -> Vec<Value> {
    let steps = &x.engine.definition().steps;
    history
        .attempts
        .iter()
        .map(|a| {
            let name = usize::try_from(a.step_index)
                .ok()
                .and_then(|i| steps.get(i))
                .map(|s| s.name())
                .unwrap_or("?");
            json!({
                "step": name,
                "phase": a.phase.as_str(),
                "attempt": a.attempt,
                "startedAt": rfc3339(a.started_at_ms),
                "finishedAt": rfc3339(a.finished_at_ms),
                "error": a.error,
            })
        })
        .collect()
}

fn actions(history: &SagaHistory) -> Vec<Value> {
    history
        .actions
        .iter()
        .map(|a| {
            json!({
                "requestId": a.request_id,
                "action": a.action,
                "note": a.note,
                "at": rfc3339(a.at_ms),
            })
        })
        .collect()
}

fn rfc3339(ms: i64) -> Value {
    serde_json::to_value(view::timestamp(ms)).unwrap_or(Value::Null)
}

fn to_json(message: &impl serde::Serialize) -> Result<Value, Refusal> {
    serde_json::to_value(message).map_err(internal)
}

fn internal(error: impl std::fmt::Display) -> Refusal {
    tracing::error!(%error, "saga explorer");
    Refusal::new(tonic::Code::Internal, format!("internal error: {error}"))
}
