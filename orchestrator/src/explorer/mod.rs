//! The saga explorer: a web page, built into the binary, where a person sees
//! the orders, a saga's timeline (live while it runs) and the sagas that need
//! them, and acts on them. Served on a port of its own (`EXPLORER_PORT`),
//! off unless set.
//!
//! - [`api`]: the JSON API under `/api`, over the same handlers as gRPC.
//! - [`access`]: the keys: the business key reads, the admin key acts.
//! - [`assets`]: the page itself (HTML, script, style), with a strict CSP.
//! - [`reply`]: JSON answers, and refusals with the gRPC code they stand for.

mod access;
mod api;
mod assets;
mod reply;

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    routing::{get, post},
};
use clap::Args;
use svc_kit::auth::Keys;
use tokio::net::TcpListener;

pub use api::Explorer;

use crate::{order_saga::OrderData, orders::OrderApi};
use saga_engine::Engine;

/// Where the explorer listens, and what it links to.
#[derive(Debug, Clone, Default, Args)]
pub struct ExplorerArgs {
    /// Port of the saga explorer (a web page; HTTP). Unset: no explorer.
    /// It listens on HOST, like the gRPC port; put it behind a TLS proxy
    /// when HOST is not loopback.
    #[arg(long, env = "EXPLORER_PORT", value_name = "EXPLORER_PORT")]
    pub explorer_port: Option<u16>,

    /// Jaeger's web UI, e.g. http://localhost:16686: each saga links to its trace there.
    #[arg(long, env = "JAEGER_UI_URL", value_name = "JAEGER_UI_URL", value_parser = jaeger_url)]
    pub jaeger_ui_url: Option<String>,
}

fn jaeger_url(value: &str) -> Result<String, String> {
    if value.starts_with("http://") || value.starts_with("https://") {
        Ok(value.trim_end_matches('/').to_owned())
    } else {
        Err(format!(
            "{value:?} is not an http:// or https:// URL (e.g. http://localhost:16686)"
        ))
    }
}

/// The explorer's routes.
pub fn router(explorer: Explorer) -> Router {
    Router::new()
        .route("/", get(assets::page))
        .route("/assets/explorer.js", get(assets::script))
        .route("/assets/explorer.css", get(assets::style))
        .route("/favicon.ico", get(assets::icon))
        .route("/api/session", get(api::session))
        .route("/api/counts", get(api::counts))
        .route("/api/orders", get(api::list))
        .route("/api/orders/{id}", get(api::order))
        .route("/api/orders/{id}/live", get(api::live))
        .route("/api/orders/{id}/retry", post(api::retry))
        .route("/api/orders/{id}/resolve", post(api::resolve))
        .route("/api/orders/{id}/cancel", post(api::cancel))
        .fallback(api::not_found)
        .with_state(explorer)
}

/// A bound explorer, served by [`BoundExplorer::serve`].
pub struct BoundExplorer {
    listener: TcpListener,
    explorer: Explorer,
}

impl BoundExplorer {
    /// Binds `host:port`; the error names the setting.
    pub async fn bind(
        host: std::net::IpAddr,
        port: u16,
        api: Arc<OrderApi>,
        engine: Engine<OrderData>,
        keys: Keys,
        jaeger_url: Option<String>,
    ) -> anyhow::Result<BoundExplorer> {
        let addr = SocketAddr::new(host, port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("EXPLORER_PORT: cannot listen on {addr}: {e}"))?;
        Ok(BoundExplorer {
            listener,
            explorer: Explorer {
                api,
                engine,
                keys,
                jaeger_url,
            },
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `stop`; open live views end with it.
    pub async fn serve(self, stop: impl Future<Output = ()> + Send + 'static) {
        let app = router(self.explorer).into_make_service_with_connect_info::<SocketAddr>();
        if let Err(error) = axum::serve(self.listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(%error, "saga explorer stopped");
        }
    }
}
