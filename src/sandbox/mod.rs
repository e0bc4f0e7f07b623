//! The sandbox: a local HTTP server that behaves like the KohortPay API, plus the
//! faults a real server produces only on bad days, each with a rate knob and a seed.
//!
//! Routes: `POST /groups` (and `/payment-groups`), `GET /groups/{id}`,
//! `GET /orders` (a search), `GET /orders/{id}`, `GET /health`, and
//! `GET /_sandbox/stats`.
//!
//! Deterministic rules for tests (see README): customer ids starting `cus_unknown`
//! → 404; `cus_reject` → 400 with a message array; order ids starting `ord_unknown`
//! → 404; `ord_checkout` → the order already has a group.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | `server` | [`Sandbox`]: binding, TLS, shutdown, the in-process handle |
//! | `app` | the state shared by the handlers, the request tracker, the stats |
//! | `faults` | [`SandboxConfig`] and the roll that picks a request's fault |
//! | `gate` | what every API request passes first: rate limit, key, latency, fault |
//! | `routes` | the route table and one handler per route |
//! | `responses` | the error envelope, the router's HTML pages, a cut connection |
//! | `state` | the simulated data (groups, orders) and the server's rules |

mod app;
mod faults;
mod gate;
mod responses;
mod routes;
mod server;
pub(crate) mod state;

pub use faults::{ListAnswer, SandboxConfig};
pub use server::Sandbox;
pub use state::Stats;
