//! Rebound's control API: HTTP/JSON over a Unix socket, following Firecracker's API where it
//! applies (`PUT /machine-config`, `PUT /boot-source`, `PUT /drives/{id}`, `PUT /actions`,
//! `PATCH /vm`, `PUT /snapshot/create`, `PUT /snapshot/load`, `GET /`, error bodies
//! `{"fault_message": ...}`), so a Firecracker client can drive Rebound. `GET /metrics`,
//! `/protection`, `/checkpoint` and `/rollback` are Rebound's own. The contract is
//! `openapi.json` in this crate.
//!
//! Handlers only translate HTTP to calls on [`rebound_control::Instance`]; every request body is
//! parsed strictly (unknown fields refused) and every failure is a 400 with a reason.

pub mod config_file;
pub mod http;
pub mod models;
mod server;
pub mod telemetry;

use std::sync::Arc;

pub use server::{ApiError, parse, router, router_with, serve, serve_with};

/// Largest request body the API takes.
pub fn server_body_limit() -> usize {
    server::BODY_LIMIT
}

/// Applies a `PUT /logger` request to the process's log (the binary owns logging); returns
/// why it was refused.
pub type LoggerHook = Arc<dyn Fn(&models::LoggerConfig) -> Result<(), String> + Send + Sync>;

/// What the API can do beyond the instance: process-wide settings the binary owns.
#[derive(Clone, Default)]
pub struct Hooks {
    /// `PUT /logger`; None: refused.
    pub logger: Option<LoggerHook>,
    /// The metrics destination (`PUT /metrics`, `--metrics-path`), shared with the binary;
    /// None: the API keeps its own.
    pub metrics: Option<Arc<telemetry::MetricsFile>>,
}

/// The OpenAPI description of this API.
pub const OPENAPI: &str = include_str!("../openapi.json");
