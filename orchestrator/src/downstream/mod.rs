//! Clients of the domain services: one lazily connected HTTP/2 channel per
//! service, shared by every saga, each call carrying the orchestrator's API key.
//! The saga's forward calls go in batches ([`batch`]).

pub mod batch;
pub mod batch_methods;
mod deadline_cap;
mod lane;

pub use batch::Batcher;
pub use deadline_cap::{DeadlineCap, HeldSlot, MIN_BUDGET, Slots};
pub use lane::Lane;

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Args;
use ordersaga_proto::{
    payment::v1::payment_service_client::PaymentServiceClient,
    shipping::v1::shipping_service_client::ShippingServiceClient,
    stock::v1::stock_service_client::StockServiceClient,
};
use secrecy::{ExposeSecret, SecretString};
use tonic::{
    Request, Status,
    metadata::AsciiMetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, ClientTlsConfig, Endpoint},
};

#[derive(Debug, Clone, Args)]
pub struct DownstreamArgs {
    /// Address of the stock service.
    #[arg(
        long,
        env = "STOCK_SERVICE_URL",
        value_name = "STOCK_SERVICE_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    pub stock_url: String,

    /// Address of the shipping service.
    #[arg(
        long,
        env = "SHIPPING_SERVICE_URL",
        value_name = "SHIPPING_SERVICE_URL",
        default_value = "http://127.0.0.1:50053"
    )]
    pub shipping_url: String,

    /// Address of the payment service.
    #[arg(
        long,
        env = "PAYMENT_SERVICE_URL",
        value_name = "PAYMENT_SERVICE_URL",
        default_value = "http://127.0.0.1:50054"
    )]
    pub payment_url: String,

    /// Most calls in flight on each service's connection; more wait in the
    /// orchestrator, and one that waits out its deadline is never sent (see
    /// [`DeadlineCap`]). Keeps a burst (10,000 sagas resumed at once) from
    /// opening thousands of HTTP/2 streams that time out and get reset together.
    #[arg(long, env = "DOWNSTREAM_MAX_CONCURRENT_CALLS", value_name = "DOWNSTREAM_MAX_CONCURRENT_CALLS", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub downstream_max_concurrent_calls: u32,

    /// Most price lookups (GetProduct) in flight at once, out of the stock
    /// service's DOWNSTREAM_MAX_CONCURRENT_CALLS; default a quarter of it. New
    /// orders' pricing then never takes every slot of the link that the
    /// sagas' reservations and releases need. A lookup that waits 2 s for
    /// its turn fails the order with UNAVAILABLE (retryable).
    #[arg(long, env = "PRICING_MAX_CONCURRENT_LOOKUPS", value_name = "PRICING_MAX_CONCURRENT_LOOKUPS", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub pricing_max_concurrent_lookups: Option<u32>,

    /// Business key sent to the domain services in `x-api-key`; defaults to
    /// the first of the orchestrator's own business keys.
    #[arg(
        long,
        env = "SERVICES_API_KEY",
        value_name = "SERVICES_API_KEY",
        hide_env_values = true
    )]
    pub services_api_key: Option<SecretString>,

    /// PEM CA that signed the services' certificates: the service URLs are
    /// then `https://` and every call goes over TLS (without it, `http://`).
    #[arg(long, env = "SERVICES_TLS_CA", value_name = "SERVICES_TLS_CA")]
    pub services_tls_ca: Option<PathBuf>,

    /// PEM certificate the orchestrator presents to the services (mTLS),
    /// with SERVICES_TLS_KEY.
    #[arg(long, env = "SERVICES_TLS_CERT", value_name = "SERVICES_TLS_CERT")]
    pub services_tls_cert: Option<PathBuf>,

    /// PEM private key of SERVICES_TLS_CERT.
    #[arg(long, env = "SERVICES_TLS_KEY", value_name = "SERVICES_TLS_KEY")]
    pub services_tls_key: Option<PathBuf>,
}

impl DownstreamArgs {
    /// The pricing budget: set, or a quarter of the per-service cap. Never
    /// more than the cap less one, so a saga's call always finds a slot.
    pub fn pricing_lookups(&self) -> usize {
        let cap = self.downstream_max_concurrent_calls as usize;
        let budget = self
            .pricing_max_concurrent_lookups
            .map(|n| n as usize)
            .unwrap_or(cap / 4);
        budget.min(cap.saturating_sub(1)).max(1)
    }

    pub fn local(stock_url: String, shipping_url: String, payment_url: String) -> Self {
        DownstreamArgs {
            stock_url,
            shipping_url,
            payment_url,
            downstream_max_concurrent_calls: 512,
            pricing_max_concurrent_lookups: None,
            services_api_key: None,
            services_tls_ca: None,
            services_tls_cert: None,
            services_tls_key: None,
        }
    }

    /// The TLS the orchestrator speaks to the services, if any.
    fn tls(&self) -> anyhow::Result<Option<ClientTlsConfig>> {
        let identity = match (&self.services_tls_cert, &self.services_tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((
                ("SERVICES_TLS_CERT", cert.as_path()),
                ("SERVICES_TLS_KEY", key.as_path()),
            )),
            (Some(_), None) => anyhow::bail!("SERVICES_TLS_CERT is set without SERVICES_TLS_KEY"),
            (None, Some(_)) => anyhow::bail!("SERVICES_TLS_KEY is set without SERVICES_TLS_CERT"),
        };
        let Some(ca) = &self.services_tls_ca else {
            anyhow::ensure!(
                identity.is_none(),
                "SERVICES_TLS_CERT needs SERVICES_TLS_CA: mTLS is TLS with client certificates"
            );
            return Ok(None);
        };
        svc_kit::tls::client_config(Some(("SERVICES_TLS_CA", ca)), identity).map(Some)
    }
}

/// Adds the API key and the current trace context to every outgoing call.
#[derive(Clone)]
pub struct SendApiKey {
    key: AsciiMetadataValue,
}

impl Interceptor for SendApiKey {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(svc_kit::auth::API_KEY_HEADER, self.key.clone());
        svc_kit::propagation::inject_current(request.metadata_mut());
        Ok(request)
    }
}

pub type Authed = InterceptedService<DeadlineCap<Channel>, SendApiKey>;
pub type StockClient = StockServiceClient<Authed>;
pub type ShippingClient = ShippingServiceClient<Authed>;
pub type PaymentClient = PaymentServiceClient<Authed>;

#[derive(Clone)]
pub struct Downstream {
    pub stock: Lane<StockClient>,
    pub shipping: Lane<ShippingClient>,
    pub payment: Lane<PaymentClient>,
    /// The forward calls, batched, on the lanes above.
    pub reserve_stock: Batcher<batch_methods::ReserveStock>,
    pub prepare_shipment: Batcher<batch_methods::PrepareShipment>,
    pub charge: Batcher<batch_methods::Charge>,
}

impl Downstream {
    /// Builds the clients. Channels connect on first use and reconnect by
    /// themselves, so the orchestrator can start before the services.
    pub fn connect_lazy(args: &DownstreamArgs, own_key: &str) -> anyhow::Result<Self> {
        if let Some(key) = &args.services_api_key {
            svc_kit::settings::check_single_key(key)
                .map_err(|e| anyhow::anyhow!("SERVICES_API_KEY (--services-api-key): {e}"))?;
        }
        let key = args
            .services_api_key
            .as_ref()
            .map(|k| k.expose_secret().to_owned())
            .unwrap_or_else(|| own_key.to_owned());
        let key: AsciiMetadataValue = key
            .parse()
            .context("SERVICES_API_KEY is not valid metadata")?;
        let auth = SendApiKey { key };
        let tls = args.tls()?;
        let limit = args.downstream_max_concurrent_calls as usize;
        let channel = |url: &str, name: &str| -> anyhow::Result<(Authed, Slots)> {
            let mut endpoint = Endpoint::from_shared(url.to_owned())
                .with_context(|| format!("{name} is not a valid URL: {url:?}"))?;
            match (url.starts_with("https://"), &tls) {
                (true, Some(tls)) => {
                    endpoint = endpoint
                        .tls_config(tls.clone())
                        .with_context(|| format!("TLS to {name} ({url})"))?;
                }
                (false, None) => {}
                (true, None) => anyhow::bail!(
                    "{name} is https:// but SERVICES_TLS_CA is not set: name the CA that signed the services' certificates"
                ),
                (false, Some(_)) => anyhow::bail!(
                    "SERVICES_TLS_CA is set but {name} is not https:// ({url}): use https:// to call it over TLS"
                ),
            }
            let endpoint = endpoint
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_while_idle(true);
            let slots = Slots::new(limit);
            let channel = InterceptedService::new(
                DeadlineCap::new(endpoint.connect_lazy(), slots.clone()),
                auth.clone(),
            );
            Ok((channel, slots))
        };
        let (stock, stock_slots) = channel(&args.stock_url, "STOCK_SERVICE_URL")?;
        let (shipping, shipping_slots) = channel(&args.shipping_url, "SHIPPING_SERVICE_URL")?;
        let (payment, payment_slots) = channel(&args.payment_url, "PAYMENT_SERVICE_URL")?;
        let stock = Lane::new(StockServiceClient::new(stock), stock_slots);
        let shipping = Lane::new(ShippingServiceClient::new(shipping), shipping_slots);
        let payment = Lane::new(PaymentServiceClient::new(payment), payment_slots);
        Ok(Downstream {
            reserve_stock: Batcher::new(batch_methods::ReserveStock(stock.clone())),
            prepare_shipment: Batcher::new(batch_methods::PrepareShipment(shipping.clone())),
            charge: Batcher::new(batch_methods::Charge(payment.clone())),
            stock,
            shipping,
            payment,
        })
    }
}
