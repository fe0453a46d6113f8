//! The settings every service takes, from flags or env, checked at start-up.
//!
//! Each service flattens [`ServerArgs`] into its own clap `Settings` and supplies
//! its defaults (port, database file). Tests build these structs directly and
//! never touch the process environment.

use std::{net::IpAddr, time::Duration};

use clap::Args;
use secrecy::{ExposeSecret, SecretString};

use crate::{
    auth::{DEV_KEYS, KeySet, Keys, MIN_KEY_LEN},
    durability::Durability,
    fault::FaultSettings,
    tls::TlsArgs,
};

#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, env = "HOST", value_name = "HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,

    /// Port to listen on; 0 picks a free one. Defaults to the service's own port.
    #[arg(long, env = "PORT", value_name = "PORT")]
    pub port: Option<u16>,

    /// Port of the Prometheus `/metrics` endpoint; 0 picks a free one. Defaults to the service's own.
    #[arg(long, env = "METRICS_PORT", value_name = "METRICS_PORT")]
    pub metrics_port: Option<u16>,

    /// Store URL: `sqlite://PATH` (the default, a file under ./data) or `postgres://…`.
    #[arg(long, env = "DATABASE_URL", value_name = "DATABASE_URL")]
    pub database_url: Option<String>,

    /// What a commit waits for before the call is answered: `full` (the
    /// disk) or `relaxed` (the operating system, or the PostgreSQL server),
    /// which can lose the last commits when the machine crashes; see
    /// docs/durability.md.
    #[arg(
        long,
        env = "DURABILITY",
        value_name = "DURABILITY",
        value_enum,
        default_value_t = Durability::Full
    )]
    pub durability: Durability,

    /// Keys a business call may carry in its `x-api-key` metadata, separated
    /// by commas: during a rotation both the new key (first) and the old one.
    /// Each at least 32 characters (only `dev-key` is exempt).
    #[arg(
        long,
        env = "APPLICATION_API_KEY",
        value_name = "APPLICATION_API_KEY",
        hide_env_values = true
    )]
    pub api_key: SecretString,

    /// Keys for admin RPCs (Restock, Deposit), separated by commas; never the
    /// same as a business key. Without it, admin RPCs are refused.
    #[arg(
        long,
        env = "ADMIN_API_KEY",
        value_name = "ADMIN_API_KEY",
        hide_env_values = true
    )]
    pub admin_api_key: Option<SecretString>,

    /// Longest a call may run on the server before it is cancelled, in seconds.
    #[arg(long, env = "REQUEST_TIMEOUT_SECS", value_name = "REQUEST_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub request_timeout_secs: u64,

    /// Most business calls in flight at once; past it a call is answered
    /// RESOURCE_EXHAUSTED at once (health checks are never refused).
    #[arg(long, env = "MAX_CONCURRENT_CALLS", value_name = "MAX_CONCURRENT_CALLS", default_value_t = 4_096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_concurrent_calls: u32,

    /// Write logs as JSON lines instead of human-readable text.
    #[arg(
        long,
        env = "LOG_JSON",
        value_name = "LOG_JSON",
        default_value_t = false
    )]
    pub log_json: bool,

    #[command(flatten)]
    pub tls: TlsArgs,

    #[command(flatten)]
    pub faults: FaultSettings,

    /// Lets settings that break the service on purpose run: fault injection
    /// (`FAULT_*`) and, in the orchestrator, the benchmark-only in-memory store.
    /// Without it they stop the process at start-up; with it, each is logged
    /// loudly. For tests, demos and benchmarks only.
    #[arg(
        long,
        env = "ALLOW_UNSAFE_SETTINGS",
        value_name = "ALLOW_UNSAFE_SETTINGS",
        default_value_t = false
    )]
    pub allow_unsafe_settings: bool,
}

impl ServerArgs {
    /// Settings for tests and embedded runs: the given store and key, an ephemeral
    /// loopback port, no faults.
    pub fn local(database_url: impl Into<String>, api_key: &str) -> Self {
        ServerArgs {
            host: IpAddr::from([127, 0, 0, 1]),
            port: Some(0),
            metrics_port: Some(0),
            database_url: Some(database_url.into()),
            durability: Durability::Full,
            api_key: SecretString::from(api_key),
            admin_api_key: None,
            request_timeout_secs: 30,
            max_concurrent_calls: 4_096,
            log_json: false,
            tls: TlsArgs::default(),
            faults: FaultSettings::default(),
            allow_unsafe_settings: false,
        }
    }

    /// Refuses to start with an unsafe setting on (fault injection, or those
    /// in `also`) unless ALLOW_UNSAFE_SETTINGS is set; with it, says so loudly.
    pub fn check_unsafe(&self, also: &[&str]) -> anyhow::Result<()> {
        let mut on: Vec<String> = also.iter().map(|s| (*s).to_owned()).collect();
        if self.faults.is_active() {
            on.insert(
                0,
                format!(
                    "fault injection (FAULT_UNAVAILABLE_RATE={}, FAULT_DROP_REPLY_RATE={}, FAULT_LATENCY_MS={})",
                    self.faults.fault_unavailable_rate,
                    self.faults.fault_drop_reply_rate,
                    self.faults.fault_latency_ms
                ),
            );
        }
        if on.is_empty() {
            return Ok(());
        }
        if !self.allow_unsafe_settings {
            anyhow::bail!(
                "{} is for tests and benchmarks only and breaks real orders; \
                 to run with it anyway, also set ALLOW_UNSAFE_SETTINGS=true (--allow-unsafe-settings)",
                on.join(" and ")
            );
        }
        for setting in &on {
            tracing::warn!("UNSAFE SETTING ON: {setting}. Never run this with real orders");
        }
        Ok(())
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    /// The business key this service sends when it calls others: the first
    /// of its set, the newest during a rotation.
    pub fn api_key(&self) -> &str {
        key_set(&self.api_key).next().unwrap_or_default()
    }

    /// The keys it accepts, by scope. Refuses a key that is in both scopes
    /// (an admin key handed to every business client would be no admin key),
    /// and warns when a key is one of the well-known development keys.
    ///
    /// Checked here rather than by clap, whose message would print the value.
    pub fn keys(&self) -> anyhow::Result<Keys> {
        check_key_set(&self.api_key)
            .map_err(|e| anyhow::anyhow!("APPLICATION_API_KEY (--api-key): {e}"))?;
        if let Some(admin) = &self.admin_api_key {
            check_key_set(admin)
                .map_err(|e| anyhow::anyhow!("ADMIN_API_KEY (--admin-api-key): {e}"))?;
        }
        let business: Vec<&str> = key_set(&self.api_key).collect();
        let admin: Vec<&str> = self.admin_api_key.iter().flat_map(key_set).collect();
        if business.iter().any(|key| admin.contains(key)) {
            anyhow::bail!(
                "ADMIN_API_KEY and APPLICATION_API_KEY share a key: give admin RPCs keys of their own"
            );
        }
        for key in business.iter().chain(&admin) {
            if DEV_KEYS.contains(key) {
                tracing::warn!(
                    "running with the development key {key:?}, which anyone can guess: for local use only"
                );
            }
        }
        Ok(Keys {
            business: KeySet::new(business),
            admin: KeySet::new(admin),
        })
    }
}

fn key_set(keys: &SecretString) -> impl Iterator<Item = &str> {
    keys.expose_secret().split(',')
}

/// A comma-separated set of keys: each printable ASCII, at least
/// [`MIN_KEY_LEN`] characters unless it is a development key. The message
/// names the key by its position, never by its value.
pub fn check_key_set(keys: &SecretString) -> Result<(), String> {
    let value = keys.expose_secret();
    if value.trim().is_empty() {
        return Err("the API key must not be empty".into());
    }
    for (n, key) in value.split(',').enumerate() {
        let which = format!("key {} of the list", n + 1);
        if key.is_empty() {
            return Err(format!("{which} is empty (a stray comma?)"));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("{which} must be printable ASCII without spaces"));
        }
        if key.len() < MIN_KEY_LEN && !DEV_KEYS.contains(&key) {
            return Err(format!(
                "{which} has {} characters; a key needs at least {MIN_KEY_LEN} (e.g. `openssl rand -hex 24`)",
                key.len()
            ));
        }
    }
    Ok(())
}

/// One key, checked as each key of a set is.
pub fn check_single_key(key: &SecretString) -> Result<(), String> {
    if key.expose_secret().contains(',') {
        return Err("one key only, no commas: this is the key sent, not a set accepted".into());
    }
    check_key_set(key)
}

/// Parses a probability in `[0, 1]`.
pub fn parse_rate(value: &str) -> Result<f64, String> {
    let rate: f64 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number"))?;
    if !(0.0..=1.0).contains(&rate) {
        return Err(format!("{rate} is outside 0.0..=1.0"));
    }
    Ok(rate)
}
