//! Rebound's control API: HTTP/JSON over a Unix socket, following Firecracker's API where it
//! applies (`PUT /machine-config`, `PUT /boot-source`, `PUT /drives/{id}`, `PUT /actions`,
//! `PATCH /vm`, `PUT /snapshot/create`, `PUT /snapshot/load`, `GET /`, error bodies
//! `{"fault_message": ...}`), so a Firecracker client can drive Rebound. `GET /metrics`,
//! `/protection`, `/checkpoint` and `/rollback` are Rebound's own. The contract is
//! `openapi.json` in this crate.
//!
//! Handlers only translate HTTP to calls on [`rebound_control::Instance`]; every request body is
//! parsed strictly (unknown fields refused) and every failure is a 400 with a reason.

pub mod models;
mod server;

pub use server::{ApiError, router, serve};

/// The OpenAPI description of this API.
pub const OPENAPI: &str = include_str!("../openapi.json");
