//! The command line. Everything checkable without the server is checked here, so
//! a malformed command fails with clap's usage message (exit 2) before any
//! connection is made; the business rules (quantities, countries, …) stay the
//! server's, which names the offending field.

use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum, error::ErrorKind};
use ordersaga_proto::{
    Timestamp,
    orders::v1::{ListOrdersRequest, OrderItem, OrderStatus},
};
use tonic::transport::Uri;

/// Create, inspect, watch and cancel orders of the order saga system, and follow
/// its order events.
#[derive(Debug, Parser)]
#[command(name = "orderctl", version)]
pub struct Cli {
    /// URL of the orchestrator's OrderService.
    #[arg(
        long,
        env = "ORDERCTL_ADDR",
        default_value = "http://127.0.0.1:50051",
        value_parser = parse_addr
    )]
    pub addr: String,

    /// API key, sent as `x-api-key` metadata with every call. Required by every
    /// subcommand but `events`.
    // Not `global`, like `--addr`: these flags go before the subcommand (or come
    // from the environment). Optional to clap because `events` needs none; the
    // others ask for it with `Cli::api_key`.
    #[arg(long, env = "APPLICATION_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Admin key, sent instead of the API key by the operator actions
    /// (`retry-compensation`, `resolve`).
    #[arg(long, env = "ADMIN_API_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,

    /// How results are printed; before or after the subcommand.
    #[arg(
        long,
        short,
        global = true,
        value_enum,
        default_value_t = Output::Text,
        env = "ORDERCTL_OUTPUT"
    )]
    pub output: Output,

    #[command(subcommand)]
    pub command: Command,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people: an order with its items and steps; `list` one line per
    /// order; `watch` one line per change.
    Text,
    /// The proto3 JSON mapping, as grpcurl prints it: the order, or the whole
    /// page for `list`; `watch` and `events` one object per line.
    Json,
    /// Columns under a header, one row per order (`get`, `list`, `create`, …)
    /// or per change (`watch`).
    Table,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create an order and print it.
    Create(CreateArgs),
    /// Print an order with its items and saga steps.
    Get { order_id: String },
    /// List orders, newest first, one line each.
    List(ListArgs),
    /// Print a line per state change until the order is terminal (times in UTC).
    Watch { order_id: String },
    /// Cancel an order before payment; its done steps are undone.
    Cancel(CancelArgs),
    /// Operator action (admin key): run the failed compensation of a
    /// NEEDS_ATTENTION order again, now.
    RetryCompensation(RetryArgs),
    /// Operator action (admin key): record that you undid the failed
    /// compensation of a NEEDS_ATTENTION order by hand; the saga goes on
    /// undoing the steps before it and ends COMPENSATED.
    Resolve(ResolveArgs),
    /// Operator work on every order a filter matches: the orders are listed
    /// first (`--dry-run` stops there and prints them), then acted on a few
    /// at a time, with a progress bar.
    #[command(subcommand)]
    Bulk(BulkAction),
    /// Reconcile the saga log with the services' own records: for every
    /// order the filter matches, check through each service's read RPC that
    /// its effects fit its outcome. Prints the mismatches; exit code 1 if
    /// there are any.
    Audit(AuditArgs),
    /// Print order events from RabbitMQ as they are published, one line each
    /// (times in UTC), until Ctrl-C. Needs no API key.
    Events(EventsArgs),
    /// Print the completion script for a shell; needs no key. For example
    /// `orderctl completions bash > /etc/bash_completion.d/orderctl`, or
    /// `orderctl completions zsh > "${fpath[1]}/_orderctl"`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

impl Cli {
    /// The key the subcommand sends: the admin key for operator actions,
    /// else the API key (every subcommand but `events` needs one). Missing,
    /// it is a usage error, as when clap required it: message, usage, exit
    /// code 2.
    pub fn key(&self) -> Result<&str, clap::Error> {
        let (key, flag) = if self.command.is_operator_action() {
            (&self.admin_key, "--admin-key (or ADMIN_API_KEY)")
        } else {
            (&self.api_key, "--api-key (or APPLICATION_API_KEY)")
        };
        key.as_deref().ok_or_else(|| {
            Self::command().error(
                ErrorKind::MissingRequiredArgument,
                format!("{flag} is required for {}", self.command.name()),
            )
        })
    }
}

/// Writes the completion script of `shell` for every subcommand and flag.
pub fn write_completions(shell: clap_complete::Shell, out: &mut impl std::io::Write) {
    clap_complete::generate(shell, &mut Cli::command(), "orderctl", out);
}

impl Command {
    /// Whether it acts on a saga as an operator, with the admin key.
    pub fn is_operator_action(&self) -> bool {
        matches!(self, Command::RetryCompensation(_) | Command::Resolve(_))
    }

    /// The subcommand as typed.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Create(_) => "create",
            Command::Get { .. } => "get",
            Command::List(_) => "list",
            Command::Watch { .. } => "watch",
            Command::Cancel(_) => "cancel",
            Command::RetryCompensation(_) => "retry-compensation",
            Command::Resolve(_) => "resolve",
            Command::Bulk(BulkAction::Retry(_)) => "bulk retry",
            Command::Bulk(BulkAction::Cancel { .. }) => "bulk cancel",
            Command::Audit(_) => "audit",
            Command::Events(_) => "events",
            Command::Completions { .. } => "completions",
        }
    }
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Customer ID.
    #[arg(long)]
    pub customer: String,

    /// An item to order, as SKU=QTY; repeat for more items.
    #[arg(long = "item", value_name = "SKU=QTY", required = true, value_parser = parse_item)]
    pub items: Vec<OrderItem>,

    /// Shipping address: who receives the parcel.
    #[arg(long)]
    pub recipient: String,

    /// Shipping address: street and number.
    #[arg(long)]
    pub line1: String,

    /// Shipping address: city.
    #[arg(long)]
    pub city: String,

    /// Shipping address: postal code.
    #[arg(long)]
    pub postal_code: String,

    /// Shipping address: ISO 3166-1 alpha-2 code, upper case, e.g. DE.
    #[arg(long, value_name = "XX")]
    pub country: String,

    /// Idempotency key: repeating a create with the same key returns the same
    /// order instead of a second one. Default: a new UUID v4.
    #[arg(long)]
    pub request_id: Option<String>,

    /// Reply only once the saga is over (or after 30 s), not as soon as the
    /// order is recorded.
    #[arg(long)]
    pub wait: bool,
}

/// Which orders: the filters `list`, `bulk` and `audit` share.
#[derive(Debug, Args)]
pub struct OrderFilter {
    /// Only this customer's orders.
    #[arg(long)]
    pub customer: Option<String>,

    /// Only orders in this status; repeat for several.
    #[arg(long = "status", value_enum)]
    pub statuses: Vec<StatusArg>,

    /// Only orders created at or after this time (RFC 3339, e.g. 2026-12-04T10:00:00Z).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub created_after: Option<Timestamp>,

    /// Only orders created before this time (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub created_before: Option<Timestamp>,
}

impl OrderFilter {
    /// The ListOrders request of this filter; `default_status` when no
    /// `--status` was given.
    pub fn request(&self, default_status: Option<OrderStatus>) -> ListOrdersRequest {
        let mut statuses: Vec<i32> = self
            .statuses
            .iter()
            .map(|s| OrderStatus::from(*s) as i32)
            .collect();
        if statuses.is_empty() {
            statuses.extend(default_status.map(|s| s as i32));
        }
        ListOrdersRequest {
            customer_id: self.customer.clone().unwrap_or_default(),
            statuses,
            created_after: self.created_after,
            created_before: self.created_before,
            ..Default::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub filter: OrderFilter,

    /// Orders per page, 1 to 500. Default: the server's (50).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=500))]
    pub page_size: Option<i32>,

    /// The next-page token printed by the previous `list`.
    #[arg(long)]
    pub page_token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum BulkAction {
    /// Run the failed compensation of every matching order again (default:
    /// the NEEDS_ATTENTION ones). Lists with the API key, acts with the
    /// admin key: both are needed.
    Retry(BulkFilter),
    /// Cancel every matching order (default: the RUNNING ones); those past
    /// their pivot are refused by the server and counted as skipped.
    Cancel {
        #[command(flatten)]
        filter: BulkFilter,

        /// Why, for the record.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Default: every order (open ones are listed but not checked).
    #[command(flatten)]
    pub filter: OrderFilter,

    /// URL of the stock service.
    #[arg(long, env = "STOCK_SERVICE_URL", default_value = "http://127.0.0.1:50052", value_parser = parse_addr)]
    pub stock_addr: String,

    /// URL of the shipping service.
    #[arg(long, env = "SHIPPING_SERVICE_URL", default_value = "http://127.0.0.1:50053", value_parser = parse_addr)]
    pub shipping_addr: String,

    /// URL of the payment service.
    #[arg(long, env = "PAYMENT_SERVICE_URL", default_value = "http://127.0.0.1:50054", value_parser = parse_addr)]
    pub payment_addr: String,

    /// The services' API key. Default: --api-key.
    #[arg(long, env = "SERVICES_API_KEY", hide_env_values = true)]
    pub services_key: Option<String>,
}

/// Which orders a bulk action takes (default status: the one the action is
/// for), and how it runs.
#[derive(Debug, Args)]
pub struct BulkFilter {
    #[command(flatten)]
    pub orders: OrderFilter,

    /// Print the matching orders and their count, and change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Each order's request ID is `<batch>:<order_id>`: the same batch ID
    /// again finishes an interrupted run, replaying what was done instead of
    /// acting twice. Default: a new UUID (printed).
    #[arg(long, value_name = "ID", value_parser = parse_batch_id)]
    pub batch_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    pub order_id: String,

    /// Why, for the record.
    #[arg(long, default_value = "")]
    pub reason: String,

    /// Idempotency key, as for `create`. Default: a new UUID v4.
    #[arg(long)]
    pub request_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    pub order_id: String,

    /// Idempotency key, as for `create`. Default: a new UUID v4.
    #[arg(long)]
    pub request_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct ResolveArgs {
    pub order_id: String,

    /// Who resolved it, e.g. your e-mail address; kept in the saga's history.
    #[arg(long)]
    pub operator: String,

    /// What you did, e.g. "released 2 BOOK in the warehouse system".
    #[arg(long)]
    pub reason: String,

    /// Idempotency key, as for `create`. Default: a new UUID v4.
    #[arg(long)]
    pub request_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// AMQP URL of RabbitMQ.
    #[arg(
        long,
        env = "RABBITMQ_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,

    /// The topic exchange the orchestrator publishes order events to. Declared
    /// (durable) if missing, so binding works before the first event.
    #[arg(long, env = "EVENTS_EXCHANGE", default_value = "orders.events")]
    pub exchange: String,

    /// Consume from this durable queue, declared if missing, which keeps the
    /// events published while orderctl is not running (its bindings from
    /// earlier runs stay too). Default: a temporary queue, deleted on exit,
    /// which sees only the events from now on.
    #[arg(long, value_name = "NAME")]
    pub queue: Option<String>,

    /// Routing-key pattern to bind, e.g. `order.completed` or `order.*`;
    /// repeat for several. The routing key is the event type.
    #[arg(long = "binding", value_name = "PATTERN", default_value = "order.#")]
    pub bindings: Vec<String>,

    /// Print each event's JSON body as received, one per line.
    #[arg(long)]
    pub json: bool,
}

/// An order status as typed on the command line: lower case, no prefix.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StatusArg {
    Pending,
    Running,
    Completed,
    Compensating,
    Compensated,
    Cancelled,
    Failed,
    NeedsAttention,
}

impl From<StatusArg> for OrderStatus {
    fn from(status: StatusArg) -> Self {
        match status {
            StatusArg::Pending => Self::Pending,
            StatusArg::Running => Self::Running,
            StatusArg::Completed => Self::Completed,
            StatusArg::Compensating => Self::Compensating,
            StatusArg::Compensated => Self::Compensated,
            StatusArg::Cancelled => Self::Cancelled,
            StatusArg::Failed => Self::Failed,
            StatusArg::NeedsAttention => Self::NeedsAttention,
        }
    }
}

/// Accepts `http://HOST:PORT` (or https). A bare `HOST:PORT` parses as a URI
/// too but fails only at connect time, with a vaguer message.
fn parse_addr(addr: &str) -> Result<String, String> {
    let uri: Uri = addr.parse().map_err(|e| format!("{e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) => Ok(addr.to_owned()),
        _ => Err("expected a URL like http://127.0.0.1:50051".to_owned()),
    }
}

/// An RFC 3339 time, e.g. `2026-12-04T10:00:00Z`.
fn parse_time(value: &str) -> Result<Timestamp, String> {
    serde_json::from_value(serde_json::Value::String(value.to_owned()))
        .map_err(|_| format!("{value:?} is not an RFC 3339 time, e.g. 2026-12-04T10:00:00Z"))
}

/// A batch ID: up to 80 characters (the request IDs it makes are capped at
/// 128), no colon (it separates the batch from the order).
fn parse_batch_id(value: &str) -> Result<String, String> {
    if value.is_empty() || value.len() > 80 || value.contains(':') || value.trim() != value {
        return Err("expected 1 to 80 characters, without ':' or surrounding spaces".into());
    }
    Ok(value.to_owned())
}

/// Parses `SKU=QTY`. The quantity's range is left to the server.
fn parse_item(item: &str) -> Result<OrderItem, String> {
    let (sku, quantity) = item
        .split_once('=')
        .filter(|(sku, _)| !sku.is_empty())
        .ok_or("expected SKU=QTY, e.g. BOOK-1=2")?;
    let quantity = quantity
        .parse()
        .map_err(|_| format!("quantity {quantity:?} is not a whole number"))?;
    Ok(OrderItem {
        sku: sku.to_owned(),
        quantity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_goes_before_or_after_the_subcommand_and_defaults_to_text() {
        if std::env::var("ORDERCTL_OUTPUT").is_err() {
            assert_eq!(parse(&["get", "o1"]).unwrap().output, Output::Text);
        }
        assert_eq!(
            parse(&["--output", "json", "get", "o1"]).unwrap().output,
            Output::Json
        );
        assert_eq!(
            parse(&["list", "-o", "table"]).unwrap().output,
            Output::Table
        );
        let err = parse(&["get", "o1", "--output", "yaml"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidValue);
        assert!(err.to_string().contains("json"), "{err}");
    }

    #[test]
    fn completions_cover_every_subcommand_and_bash_reads_them() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut script = Vec::new();
            write_completions(shell, &mut script);
            let script = String::from_utf8(script).unwrap();
            for subcommand in Cli::command()
                .get_subcommands()
                .map(|c| c.get_name().to_owned())
            {
                assert!(script.contains(&subcommand), "{shell}: no {subcommand}");
            }
            assert!(script.contains("admin-key"), "{shell}: no --admin-key");
            if shell == clap_complete::Shell::Bash {
                let checked = std::process::Command::new("bash")
                    .args(["-n", "-c", &script])
                    .output()
                    .unwrap();
                assert!(
                    checked.status.success(),
                    "bash -n: {}",
                    String::from_utf8_lossy(&checked.stderr)
                );
            }
        }
        let err = parse(&["completions", "tcsh"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidValue);
        assert!(err.to_string().contains("bash"), "{err}");
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("orderctl").chain(args.iter().copied()))
    }

    #[test]
    fn operator_actions_send_the_admin_key_and_the_rest_the_api_key() {
        let resolve = parse(&[
            "--api-key",
            "business",
            "--admin-key",
            "admin",
            "resolve",
            "o1",
            "--operator",
            "ops@example.com",
            "--reason",
            "released by hand",
        ])
        .unwrap();
        assert_eq!(resolve.key().unwrap(), "admin");
        let get = parse(&["--api-key", "business", "--admin-key", "admin", "get", "o1"]).unwrap();
        assert_eq!(get.key().unwrap(), "business");
        // Only checkable where the environment gives no admin key.
        if std::env::var("ADMIN_API_KEY").is_err() {
            let retry = parse(&["--api-key", "business", "retry-compensation", "o1"]).unwrap();
            let err = retry.key().unwrap_err().to_string();
            assert!(
                err.contains("--admin-key (or ADMIN_API_KEY) is required for retry-compensation"),
                "{err}"
            );
        }
    }

    #[test]
    fn resolve_needs_who_and_why() {
        for args in [
            &["resolve", "o1", "--reason", "released by hand"][..],
            &["resolve", "o1", "--operator", "ops@example.com"][..],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument, "{err}");
        }
    }
}
