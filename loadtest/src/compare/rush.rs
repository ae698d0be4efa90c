//! The flash-sale rush in figures: what k6 counted (`rush_*` metrics of
//! `loadtest/k6/rush.js`), and an independent count after the run through
//! the public and admin API — the units taken from the deal (stock −
//! remaining) and the units the order service's sales counter saw sold.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::Value;

use super::{CompareOptions, k6::Summary};
use crate::stack::Stack;

/// The rush script's deal (its product's name).
const RUSH_PRODUCT: &str = "k6 rush product";
/// Longest wait for the sales counter (fed by the order events) to catch up.
const SALES_CATCH_UP: Duration = Duration::from_secs(15);

#[derive(Clone, Debug, Serialize)]
pub struct Rush {
    pub vus: usize,
    pub stock: u32,
    pub per_buyer_limit: u32,
    pub orders_accepted: u64,
    pub units_accepted: u64,
    pub sold_out_answers: u64,
    /// Answers other than an order or SOLD_OUT.
    pub unexpected_answers: u64,
    /// From the opening to the last accepted order.
    pub time_to_sell_out_ms: f64,
    /// Of every request during the sale.
    pub p99_ms: f64,
    /// Stock − remaining stock of the deal, read back after the run.
    pub units_taken_from_deal: i64,
    /// GetDealSales' units sold, read back after the run.
    pub units_sold_counted: i64,
    /// Units sold beyond the stock by any of the three counts: must be 0.
    pub oversell: i64,
}

impl Rush {
    pub async fn count(
        stack: &Stack,
        options: &CompareOptions,
        summary: &Summary,
        p99_ms: f64,
    ) -> anyhow::Result<Self> {
        let counter = |name: &str| summary.count(name).unwrap_or(0.0) as u64;
        let units_accepted = counter("rush_units_accepted");
        let client = reqwest::Client::new();
        let base = format!("http://{}", stack.gateway_addr);
        let deal = rush_deal(&client, &base, options.rush_stock).await?;
        let id = deal["id"]
            .as_str()
            .context("the deal has no id")?
            .to_owned();
        let stock = number(&deal["stock"])?;
        let remaining = number(&deal["remaining_stock"])?;
        let units_sold_counted =
            units_sold(&client, &base, &stack.admin_token, &id, units_accepted).await?;
        let units_taken_from_deal = stock - remaining;
        let most = units_taken_from_deal
            .max(units_sold_counted)
            .max(i64::try_from(units_accepted)?);
        Ok(Self {
            vus: options.vus,
            stock: options.rush_stock,
            per_buyer_limit: options.rush_limit,
            orders_accepted: counter("rush_orders_accepted"),
            units_accepted,
            sold_out_answers: counter("rush_sold_out"),
            unexpected_answers: counter("rush_unexpected"),
            time_to_sell_out_ms: summary.trend("rush_accept_ms").map_or(0.0, |t| t.max),
            p99_ms,
            units_taken_from_deal,
            units_sold_counted,
            oversell: (most - i64::from(options.rush_stock)).max(0),
        })
    }
}

/// The rush's deal, found by its product among the sold-out and active
/// deals (the stack's database is fresh, so there is one).
async fn rush_deal(client: &reqwest::Client, base: &str, stock: u32) -> anyhow::Result<Value> {
    let url = format!(
        "{base}/v1/deals?states=DEAL_STATE_SOLD_OUT&states=DEAL_STATE_ACTIVE&page_size=100"
    );
    let deals = get_json(client, &url, None).await?;
    deals["deals"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|deal| {
            deal["product"]["name"] == RUSH_PRODUCT
                && number(&deal["stock"]).ok() == Some(i64::from(stock))
        })
        .cloned()
        .with_context(|| format!("no {RUSH_PRODUCT:?} deal of {stock} units in {deals}"))
}

/// GetDealSales' units sold once it reaches `expected`, or after
/// [`SALES_CATCH_UP`] (the counter consumes order events, so it trails the
/// orders).
async fn units_sold(
    client: &reqwest::Client,
    base: &str,
    admin_token: &str,
    deal: &str,
    expected: u64,
) -> anyhow::Result<i64> {
    let url = format!("{base}/v1/deals/{deal}/sales");
    let deadline = Instant::now() + SALES_CATCH_UP;
    loop {
        let sales = get_json(client, &url, Some(admin_token)).await?;
        let sold = number(&sales["sales"]["units_sold"])?;
        if u64::try_from(sold).is_ok_and(|s| s >= expected) || Instant::now() > deadline {
            return Ok(sold);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn get_json(
    client: &reqwest::Client,
    url: &str,
    bearer: Option<&str>,
) -> anyhow::Result<Value> {
    let mut request = client.get(url);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    let status = response.status();
    let body = response.bytes().await?;
    if !status.is_success() {
        bail!("GET {url}: {status} {}", String::from_utf8_lossy(&body));
    }
    Ok(serde_json::from_slice(&body)?)
}

/// A proto3 JSON integer: a number, or (int64) a string.
fn number(value: &Value) -> anyhow::Result<i64> {
    value
        .as_i64()
        .or_else(|| value.as_str()?.parse().ok())
        .with_context(|| format!("not an integer: {value}"))
}
