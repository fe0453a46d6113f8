//! `orderctl`: a command-line client of the orchestrator's `OrderService`.
//!
//! Thin on purpose: arguments are in [`cli`], output in [`render`], and every
//! call goes through `ordersaga_proto::client::OrderClient`, so this is also a
//! worked example of that SDK. `orderctl events`, in [`events`], is the example
//! consumer of the order events the orchestrator publishes to RabbitMQ;
//! `orderctl bulk`, in [`bulk`], acts on every order a filter matches.
//!
//! A library with a thin `main`, so that the end-to-end tests build and run
//! the very same command (tests/bin/orderctl.rs).

mod audit;
mod bulk;
mod cli;
mod events;
mod render;

use std::{fmt, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::Parser as _;
use indicatif::ProgressBar;
use ordersaga_proto::{
    client::OrderClient,
    orders::v1::{CreateOrderRequest, ListOrdersRequest, Order, OrderStatus, ShippingAddress},
};
use tonic::{Code, Status};
use uuid::Uuid;

use clap::CommandFactory as _;

use crate::cli::{BulkAction, Cli, Command, Output};

/// How long `create --wait` lets the server wait for the saga to end. It then
/// replies with the order as it stands, so the command never hangs for long.
const WAIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The whole command: arguments from the process, the exit code to return.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            match err.downcast_ref::<Status>() {
                Some(status) => eprintln!("error: {}", render::status(status)),
                None => eprintln!("error: {err:#}"),
            }
            if let Some(hint) = err.downcast_ref::<RetryHint>() {
                eprintln!("{hint}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Events(mut args) => {
            args.json |= cli.output == Output::Json;
            return events::run(args).await;
        }
        Command::Completions { shell } => {
            cli::write_completions(shell, &mut std::io::stdout());
            return Ok(());
        }
        _ => {}
    }
    // Checked before connecting, like the arguments clap checks.
    let api_key = cli.key().unwrap_or_else(|err| err.exit()).to_owned();

    let client = connect(&cli.addr, &api_key).await?;

    let output = cli.output;
    match cli.command {
        Command::Create(args) => {
            let request_id = RequestId::given_or_new(args.request_id);
            let request = CreateOrderRequest {
                request_id: request_id.id.clone(),
                customer_id: args.customer,
                items: args.items,
                shipping_address: Some(ShippingAddress {
                    recipient: args.recipient,
                    line1: args.line1,
                    city: args.city,
                    postal_code: args.postal_code,
                    country: args.country,
                }),
                wait: false,
            };
            let order = if args.wait {
                client.create_order_and_wait(request, WAIT_TIMEOUT).await
            } else {
                client.create_order(request).await
            };
            let order = request_id.hint_on(order)?;
            print!("{}", show(&order, output));
        }
        Command::Get { order_id } => {
            print!("{}", show(&client.get_order(order_id).await?, output));
        }
        Command::List(args) => {
            let request = ListOrdersRequest {
                page_size: args.page_size.unwrap_or(0),
                page_token: args.page_token.unwrap_or_default(),
                ..args.filter.request(None)
            };
            let page = client.list_orders(request).await?;
            match output {
                Output::Text => print!("{}", render::list_page(&page)),
                Output::Json => print!("{}", render::json(&page)),
                Output::Table => {
                    print!("{}", render::orders_table(&page.orders));
                    if !page.next_page_token.is_empty() {
                        println!("next page token: {}", page.next_page_token);
                    }
                }
            }
        }
        Command::Watch { order_id } => {
            let mut updates = client.watch_order(order_id).await?;
            let mut last = String::new();
            let mut rows = 0;
            while let Some(update) = updates.message().await? {
                let order = update
                    .order
                    .ok_or_else(|| Status::internal("reply without order"))?;
                // The stream may repeat a state; print only what changed.
                let line = render::progress(&order);
                if line == last {
                    continue;
                }
                match output {
                    Output::Text => {
                        println!("[{}] {line}", render::clock(order.updated_at.as_ref()))
                    }
                    Output::Json => println!("{}", render::json_line(&order)),
                    Output::Table => {
                        // The header once, then a row per change.
                        let table = render::orders_table(std::slice::from_ref(&order));
                        let skip = if rows == 0 { 0 } else { 1 };
                        table.lines().skip(skip).for_each(|l| println!("{l}"));
                        rows += 1;
                    }
                }
                last = line;
            }
        }
        Command::Cancel(args) => {
            let request_id = RequestId::given_or_new(args.request_id);
            let order = client
                .cancel_order(args.order_id, request_id.id.clone(), args.reason)
                .await;
            let order = request_id.hint_on(order)?;
            print!("{}", show(&order, output));
        }
        Command::RetryCompensation(args) => {
            let request_id = RequestId::given_or_new(args.request_id);
            let order = client
                .retry_compensation(args.order_id, request_id.id.clone())
                .await;
            let order = request_id.hint_on(order)?;
            print!("{}", show(&order, output));
        }
        Command::Resolve(args) => {
            let request_id = RequestId::given_or_new(args.request_id);
            let order = client
                .resolve_compensation(
                    args.order_id,
                    request_id.id.clone(),
                    args.operator,
                    args.reason,
                )
                .await;
            let order = request_id.hint_on(order)?;
            print!("{}", show(&order, output));
        }
        Command::Bulk(action) => {
            let (filter, action, default_status) = match action {
                BulkAction::Retry(filter) => {
                    (filter, bulk::Action::Retry, OrderStatus::NeedsAttention)
                }
                BulkAction::Cancel { filter, reason } => (
                    filter,
                    bulk::Action::Cancel { reason },
                    OrderStatus::Running,
                ),
            };
            // Retries take the admin key; checked before anything is listed.
            let actor = match (&action, filter.dry_run) {
                (bulk::Action::Retry, false) => {
                    let key = cli.admin_key.as_deref().ok_or_else(|| {
                        Cli::command().error(
                            clap::error::ErrorKind::MissingRequiredArgument,
                            "--admin-key (or ADMIN_API_KEY) is required for bulk retry (and --api-key to list the orders)",
                        )
                    });
                    let key = key.unwrap_or_else(|err| err.exit());
                    connect(&cli.addr, key).await?
                }
                _ => client.clone(),
            };
            let request = filter.orders.request(Some(default_status));
            let orders = list_all(&client, request).await?;
            if filter.dry_run {
                print!("{}", render::bulk_dry_run(action.verb(), &orders, output));
                return Ok(());
            }
            let batch_id = filter
                .batch_id
                .clone()
                .unwrap_or_else(|| Uuid::new_v4().to_string());
            let outcome = bulk::act(&actor, &action, &orders, &batch_id).await;
            match output {
                Output::Json => print!("{}", render::json(&outcome.to_json(&action, &batch_id))),
                Output::Text | Output::Table => {
                    print!(
                        "{}",
                        render::bulk_outcome(action.verb(), &outcome, orders.len(), &batch_id)
                    )
                }
            }
            if !outcome.failed.is_empty() {
                anyhow::bail!(
                    "{} of {} orders failed; run again with --batch-id {batch_id} to retry them (the done ones replay, nothing is done twice)",
                    outcome.failed.len(),
                    orders.len()
                );
            }
        }
        Command::Audit(args) => {
            let services = audit::Services::connect(
                &args.stock_addr,
                &args.shipping_addr,
                &args.payment_addr,
                args.services_key.as_deref().unwrap_or(&api_key),
            )
            .await?;
            let request = args.filter.request(None);
            let orders = list_all(&client, request).await?;
            let report = audit::run(&services, &orders).await?;
            match output {
                Output::Json => print!("{}", render::json(&report.to_json())),
                Output::Text | Output::Table => print!("{}", report.text()),
            }
            if !report.mismatches.is_empty() {
                anyhow::bail!(
                    "{} mismatches between the saga log and the services",
                    report.mismatches.len()
                );
            }
        }
        Command::Events(_) | Command::Completions { .. } => unreachable!("handled above"),
    }
    Ok(())
}

/// Orders per listed page (the server's most).
const PAGE_SIZE: i32 = 500;

/// Every order `filter` matches, newest first, page after page (for `bulk`
/// and `audit`), with a spinner.
async fn list_all(
    reader: &OrderClient,
    mut filter: ListOrdersRequest,
) -> Result<Vec<Order>, Status> {
    let spinner = ProgressBar::new_spinner().with_message("listing the matching orders");
    spinner.enable_steady_tick(Duration::from_millis(120));
    filter.page_size = PAGE_SIZE;
    let mut orders = Vec::new();
    loop {
        let page = reader.list_orders(filter.clone()).await?;
        orders.extend(page.orders);
        spinner.set_message(format!("{} orders match so far", orders.len()));
        if page.next_page_token.is_empty() {
            break;
        }
        filter.page_token = page.next_page_token;
    }
    spinner.finish_and_clear();
    Ok(orders)
}

/// A client of the OrderService at `addr` with `key`. A connect failure is
/// reported like a call failure, with the code a call to an unreachable
/// server would get.
async fn connect(addr: &str, key: &str) -> Result<OrderClient, Status> {
    OrderClient::connect(addr.to_owned(), key)
        .await
        .map_err(|e| {
            let cause = anyhow::Error::from(e);
            Status::unavailable(format!("cannot connect to {addr}: {cause:#}"))
        })
}

/// Printed after an error when the call may have taken effect and the user
/// could not know the request ID, so a retry is not taken for a new request.
#[derive(Debug)]
struct RetryHint(String);

impl fmt::Display for RetryHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "note: the call may have gone through; to retry safely, repeat it with --request-id {}",
            self.0
        )
    }
}

/// The `request_id` of a mutating call: the one given with `--request-id`,
/// or a new one.
struct RequestId {
    id: String,
    generated: bool,
}

impl RequestId {
    fn given_or_new(given: Option<String>) -> Self {
        RequestId {
            generated: given.is_none(),
            id: given.unwrap_or_else(|| Uuid::new_v4().to_string()),
        }
    }

    /// Attaches a [`RetryHint`] to a failure whose outcome is unknown, when
    /// the ID was generated rather than given. Definite refusals (invalid
    /// argument, not found, …) need no hint: nothing happened.
    fn hint_on<T>(&self, result: Result<T, Status>) -> anyhow::Result<T> {
        let unknown_outcome = |status: &Status| {
            matches!(
                status.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Internal
            )
        };
        match result {
            Err(status) if self.generated && unknown_outcome(&status) => {
                Err(status).context(RetryHint(self.id.clone()))
            }
            other => Ok(other?),
        }
    }
}

/// An order as `output` asks.
fn show(order: &Order, output: Output) -> String {
    match output {
        Output::Text => render::order(order),
        Output::Json => render::json(order),
        Output::Table => render::orders_table(std::slice::from_ref(order)),
    }
}
