//! Integration tests: real services on loopback ports, real PostgreSQL and
//! Redis, real clients. One test binary, so the helpers are shared and the
//! suite links once.

#[macro_use]
mod common;

mod auth;
mod baseline;
mod catalog;
mod cli;
mod compare;
mod deploy;
mod gateway;
mod loadtest_scripts;
mod observability;
mod order;
mod order_faults;
