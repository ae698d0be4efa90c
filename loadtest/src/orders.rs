//! `flashmesh-loadtest orders`: PlaceOrder over real gRPC, the catalog on
//! the other end, with and without the Redis stock gate, and a count of
//! every unit afterwards.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flashmesh_proto::{
    catalog::v1::{self as catalog_pb, catalog_service_client::CatalogServiceClient},
    order::v1::{self as pb, order_service_client::OrderServiceClient},
};
use sqlx::{Connection, PgConnection};
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    transport::Channel,
};

use crate::{
    run::{Outcome, Row, ms_at, refusal, run},
    stack::{Backends, CHEAP_HASHING, Mode, Stack},
};

/// The catalog's caches (L1 + L2) keep a deal at most this long.
const DEAL_CACHE_MAX_AGE: Duration = Duration::from_millis(1_500);

/// Longest wait for the sales counter to count every order.
const SALES_CATCH_UP: Duration = Duration::from_secs(30);

pub struct OrdersOptions {
    pub duration: Duration,
    pub callers: usize,
    pub users: usize,
    pub signup_parallel: usize,
    pub rush_stock: i32,
    pub rush_limit: i32,
    pub sustained_stock: i32,
}

/// The counts taken after one scenario, from four places.
struct Check {
    scenario: String,
    mode: Mode,
    stock: i32,
    /// Units in the OK answers the callers received.
    answered: u64,
    /// Units in confirmed orders in the order service's tables.
    order_rows: i64,
    /// GetDealSales.
    sales_units: i64,
    sales_orders: i64,
    /// How long after the scenario the sales counter showed every unit (or
    /// gave up).
    caught_up: Duration,
    /// GetDeal: stock − remaining_stock.
    catalog_sold: i64,
}

impl Check {
    fn holds(&self) -> bool {
        let answered = i64::try_from(self.answered).unwrap_or(i64::MAX);
        answered == self.order_rows
            && answered == self.sales_units
            && answered == self.catalog_sold
            && answered <= i64::from(self.stock)
    }
}

struct Setup {
    mode: Mode,
    users: usize,
    took: Duration,
}

pub async fn orders(backends: &Backends, options: &OrdersOptions) -> anyhow::Result<()> {
    if options.users == 0 || options.callers == 0 {
        bail!("--users and --callers must be at least 1");
    }
    let (mut rows, mut checks, mut setups) = (Vec::new(), Vec::new(), Vec::new());
    for mode in [Mode::RedisGate, Mode::DatabaseOnly] {
        eprintln!("== {} ==", mode.label());
        let stack = Stack::up(mode, backends, CHEAP_HASHING).await?;
        let measured = scenarios(&stack, mode, options, &mut rows, &mut checks).await;
        // Tear down even after a failure, so no database or key is left.
        let down = stack.down().await;
        setups.push(measured?);
        down?;
    }
    print_report(options, &setups, &rows, &checks);
    Ok(())
}

async fn scenarios(
    stack: &Stack,
    mode: Mode,
    options: &OrdersOptions,
    rows: &mut Vec<Row>,
    checks: &mut Vec<Check>,
) -> anyhow::Result<Setup> {
    let began = Instant::now();
    let users = stack
        .sign_up_users(options.users, options.signup_parallel)
        .await?;
    let setup = Setup {
        mode,
        users: users.len(),
        took: began.elapsed(),
    };
    eprintln!(
        "  signed up {} buyers in {:.1} s",
        setup.users,
        setup.took.as_secs_f64()
    );
    let orders = stack.order_clients(8).await?;
    let mut checker = Checker::new(stack).await?;
    let (duration, callers) = (options.duration, options.callers);

    let deal = stack
        .create_deal(options.rush_stock, options.rush_limit)
        .await?;
    let row = run(
        &format!(
            "flash rush: {} units, {}/buyer, {} buyers",
            options.rush_stock, options.rush_limit, options.users
        ),
        mode,
        callers,
        duration,
        |i| place_call(&orders, &deal, &users[i % users.len()], i),
    )
    .await;
    checks.push(
        checker
            .check(&row, &deal, options.rush_stock, row.units)
            .await?,
    );
    rows.push(row);

    let deal = stack
        .create_deal(options.sustained_stock, options.sustained_stock)
        .await?;
    let row = run(
        &format!("sustained: {} units, 1 per order", options.sustained_stock),
        mode,
        callers,
        duration,
        |i| place_call(&orders, &deal, &users[i % users.len()], i),
    )
    .await;
    checks.push(
        checker
            .check(&row, &deal, options.sustained_stock, row.units)
            .await?,
    );
    rows.push(row);

    // Every call repeats one completed request: the idempotent replay.
    let replay_stock = 10;
    let deal = stack.create_deal(replay_stock, replay_stock).await?;
    let key = uuid::Uuid::new_v4().to_string();
    let first = place_order(&orders, &deal, &users[0], key.clone(), 0)
        .await
        .context("the PlaceOrder that the replay scenario repeats")?;
    let first_units = units(&first);
    let row = run(
        "replay: one completed idempotency key",
        mode,
        callers,
        duration,
        |i| replay_call(&orders, &deal, &users[0], &key, &first.id, i),
    )
    .await;
    checks.push(
        checker
            .check(&row, &deal, replay_stock, first_units + row.units)
            .await?,
    );
    rows.push(row);
    Ok(setup)
}

/// PlaceOrder of one unit by `user` under `key`, on connection `i`.
fn place_order(
    orders: &[OrderServiceClient<Channel>],
    deal: &str,
    user: &MetadataValue<Ascii>,
    key: String,
    i: usize,
) -> impl std::future::Future<Output = Result<pb::Order, Status>> + use<> {
    let mut client = orders[i % orders.len()].clone();
    let mut request = Request::new(pb::PlaceOrderRequest {
        deal_id: deal.to_owned(),
        quantity: 1,
        idempotency_key: key,
    });
    request.metadata_mut().insert("authorization", user.clone());
    async move {
        client
            .place_order(request)
            .await?
            .into_inner()
            .order
            .ok_or_else(|| Status::internal("PlaceOrder answered no order (seen by the bench)"))
    }
}

/// A purchase attempt: a fresh idempotency key.
fn place_call(
    orders: &[OrderServiceClient<Channel>],
    deal: &str,
    user: &MetadataValue<Ascii>,
    i: usize,
) -> impl std::future::Future<Output = Result<Outcome, Status>> + use<> {
    let placed = place_order(orders, deal, user, uuid::Uuid::new_v4().to_string(), i);
    async move {
        match placed.await {
            Ok(order) => Ok(Outcome::Ok {
                units: units(&order),
            }),
            Err(status) => refusal(status),
        }
    }
}

/// A retry of a completed attempt: must answer the original order and take
/// nothing (an answer with another order counts as DATA_LOSS).
fn replay_call(
    orders: &[OrderServiceClient<Channel>],
    deal: &str,
    user: &MetadataValue<Ascii>,
    key: &str,
    order_id: &str,
    i: usize,
) -> impl std::future::Future<Output = Result<Outcome, Status>> + use<> {
    let placed = place_order(orders, deal, user, key.to_owned(), i);
    let order_id = order_id.to_owned();
    async move {
        match placed.await {
            Ok(order) if order.id == order_id => Ok(Outcome::Ok { units: 0 }),
            Ok(order) => Err(Status::data_loss(format!(
                "replay answered order {} instead of {order_id} (seen by the bench)",
                order.id
            ))),
            Err(status) => refusal(status),
        }
    }
}

fn units(order: &pb::Order) -> u64 {
    order
        .items
        .iter()
        .map(|item| u64::try_from(item.quantity).unwrap_or(0))
        .sum()
}

/// What counts a deal's units after a scenario, connected before the load
/// starts (so a busy server cannot refuse it a connection afterwards).
struct Checker {
    db: PgConnection,
    orders: OrderServiceClient<Channel>,
    catalog: CatalogServiceClient<Channel>,
    admin: MetadataValue<Ascii>,
}

impl Checker {
    async fn new(stack: &Stack) -> anyhow::Result<Self> {
        Ok(Self {
            db: PgConnection::connect(&stack.database_url)
                .await
                .context("connecting to the stack's database")?,
            orders: stack
                .order_clients(1)
                .await?
                .pop()
                .context("an order client")?,
            catalog: stack
                .catalog_clients(1)
                .await?
                .pop()
                .context("a catalog client")?,
            admin: stack.admin_bearer()?,
        })
    }

    /// Counts the deal's units: in the order tables, in the sales counter
    /// (once it stops trailing), and in the catalog (once its caches have
    /// expired).
    async fn check(
        &mut self,
        row: &Row,
        deal: &str,
        stock: i32,
        answered: u64,
    ) -> anyhow::Result<Check> {
        let ended = Instant::now();
        let (order_rows,): (i64,) = sqlx::query_as(
            "SELECT COALESCE(SUM(i.quantity), 0)::BIGINT FROM order_service.order_items i \
             JOIN order_service.orders o ON o.id = i.order_id \
             WHERE i.deal_id = $1 AND o.state = 'confirmed'",
        )
        .bind(deal)
        .fetch_one(&mut self.db)
        .await
        .context("counting order items")?;

        let target = i64::try_from(answered)?;
        let sales = sales_reaching(&mut self.orders, &self.admin, deal, target).await?;
        let (sales_units, sales_orders) = (sales.units_sold, sales.orders_confirmed);
        let caught_up = ended.elapsed();

        tokio::time::sleep_until((ended + DEAL_CACHE_MAX_AGE).into()).await;
        let deal_now = self
            .catalog
            .get_deal(catalog_pb::GetDealRequest {
                id: deal.to_owned(),
            })
            .await
            .context("GetDeal")?
            .into_inner()
            .deal
            .context("GetDeal answered no deal")?;
        let check = Check {
            scenario: row.scenario.clone(),
            mode: row.mode,
            stock,
            answered,
            order_rows,
            sales_units,
            sales_orders,
            caught_up,
            catalog_sold: i64::from(deal_now.stock) - i64::from(deal_now.remaining_stock),
        };
        eprintln!(
            "    units: {} answered, {} in order rows, {} counted by sales ({} orders, after {:.2} s), \
             {} taken from the deal{}",
            check.answered,
            check.order_rows,
            check.sales_units,
            check.sales_orders,
            check.caught_up.as_secs_f64(),
            check.catalog_sold,
            if check.holds() { "" } else { " — MISMATCH" },
        );
        Ok(check)
    }
}

/// GetDealSales of `deal` (asked as the admin, `admin`) once it counts
/// `units` sold, or as it is after [`SALES_CATCH_UP`]: the sales counter
/// trails the orders by the outbox relay and the consumer.
pub(crate) async fn sales_reaching(
    orders: &mut OrderServiceClient<Channel>,
    admin: &MetadataValue<Ascii>,
    deal: &str,
    units: i64,
) -> anyhow::Result<pb::DealSales> {
    let started = Instant::now();
    loop {
        let mut request = Request::new(pb::GetDealSalesRequest {
            deal_id: deal.to_owned(),
        });
        request
            .metadata_mut()
            .insert("authorization", admin.clone());
        let sales = orders
            .get_deal_sales(request)
            .await
            .context("GetDealSales")?
            .into_inner()
            .sales
            .context("GetDealSales answered no sales")?;
        if sales.units_sold >= units || started.elapsed() >= SALES_CATCH_UP {
            return Ok(sales);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `A 12, B 3`, or `0`.
fn tally<'a>(counts: impl Iterator<Item = (&'a String, u64)>) -> String {
    let parts: Vec<String> = counts
        .filter(|&(_, n)| n > 0)
        .map(|(label, n)| format!("{label} {n}"))
        .collect();
    if parts.is_empty() {
        "0".to_owned()
    } else {
        parts.join(", ")
    }
}

fn print_report(options: &OrdersOptions, setups: &[Setup], rows: &[Row], checks: &[Check]) {
    println!(
        "flashmesh-loadtest orders --duration {} --callers {} --users {} --rush-stock {} \
         --rush-limit {} --sustained-stock {}\n",
        humantime::format_duration(options.duration),
        options.callers,
        options.users,
        options.rush_stock,
        options.rush_limit,
        options.sustained_stock,
    );
    for setup in setups {
        println!(
            "- {}: {} buyers signed up (AuthService.SignUp, argon2 256 KiB × 1 iteration) in {:.1} s, before timing",
            setup.mode.label(),
            setup.users,
            setup.took.as_secs_f64(),
        );
    }
    println!();
    println!(
        "| scenario | mode | callers | answers/s | orders/s | p50 ms | p99 ms | OK p50 ms | OK p99 ms | OK | last OK at | refused (FAILED_PRECONDITION) | errors |"
    );
    println!(
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"
    );
    for row in rows {
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} |",
            row.scenario,
            row.mode.label(),
            row.callers,
            row.throughput(),
            row.ok_throughput(),
            ms_at(&row.latency, 0.5),
            ms_at(&row.latency, 0.99),
            ms_at(&row.ok_latency, 0.5),
            ms_at(&row.ok_latency, 0.99),
            row.ok,
            row.last_ok
                .map_or_else(|| "-".to_owned(), |at| format!("{:.2} s", at.as_secs_f64())),
            tally(row.refused.iter().map(|(reason, &n)| (reason, n))),
            tally(row.errors.iter().map(|(label, (n, _))| (label, *n))),
        );
    }
    println!();
    println!(
        "| scenario | mode | deal stock | units in OK answers | units in confirmed order rows | GetDealSales units_sold (orders) | sales counted after | GetDeal stock − remaining | all equal, ≤ stock |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    for check in checks {
        println!(
            "| {} | {} | {} | {} | {} | {} ({}) | {:.2} s | {} | {} |",
            check.scenario,
            check.mode.label(),
            check.stock,
            check.answered,
            check.order_rows,
            check.sales_units,
            check.sales_orders,
            check.caught_up.as_secs_f64(),
            check.catalog_sold,
            if check.holds() { "yes" } else { "**NO**" },
        );
    }
}
