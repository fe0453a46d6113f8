//! Assertions on gRPC outcomes.

use tonic::{Code, Response, Status};

/// Asserts the call failed with `code` and a message containing each of `needles`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<Response<T>, Status>,
    code: Code,
    needles: &[&str],
) {
    match result {
        Ok(reply) => panic!("expected {code:?}, got a reply: {:?}", reply.into_inner()),
        Err(status) => {
            assert_eq!(status.code(), code, "unexpected status: {status:?}");
            for needle in needles {
                assert!(
                    status.message().contains(needle),
                    "message {:?} should mention {needle:?}",
                    status.message()
                );
            }
        }
    }
}

/// A fresh order ID.
pub fn order_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A fresh request ID.
pub fn request_id() -> String {
    format!("req-{}", uuid::Uuid::new_v4().simple())
}

/// Polls the order until its saga is terminal (at most `timeout`), and returns it.
pub async fn terminal_order(
    client: &ordersaga_proto::client::OrderClient,
    order_id: &str,
    timeout: std::time::Duration,
) -> ordersaga_proto::orders::v1::Order {
    use ordersaga_proto::orders::v1::OrderStatus;
    ordersaga_tests::eventually("the order to end", timeout, || async {
        let order = client.get_order(order_id).await.ok()?;
        let status = OrderStatus::try_from(order.status).ok()?;
        (!matches!(status, OrderStatus::Running | OrderStatus::Compensating)).then_some(order)
    })
    .await
}

/// Whether the order shows step `name` (forward) with `status`.
pub fn has_forward_step(
    order: &ordersaga_proto::orders::v1::Order,
    name: &str,
    status: ordersaga_proto::orders::v1::StepStatus,
) -> bool {
    use ordersaga_proto::orders::v1::StepPhase;
    order.steps.iter().any(|s| {
        s.name == name && s.phase == StepPhase::Forward as i32 && s.status == status as i32
    })
}

/// PostgreSQL: sends `raced` in a race with another connection, in a batch
/// of the shared transaction after `before` (a request that cannot run
/// alone: one whose effect may write before it refuses), and returns both
/// answers:
/// - one transaction holds a lock `before` needs (`hold`, a statement), and
///   another has written, not yet committed, the row `raced` will write
///   too (`theirs`, a statement whose `$1` is `order_id`);
/// - `before` is sent and waits on the lock, and `raced` queues behind it;
/// - the lock is let go: `raced` runs next in the same batch, comes to wait
///   on the other's row, which then commits.
pub async fn race_in_a_batch<B, R>(
    pool: &sqlx::AnyPool,
    hold: &'static str,
    theirs: &'static str,
    order_id: &str,
    before: impl Future<Output = B> + Send + 'static,
    raced: impl Future<Output = R> + Send + 'static,
) -> (B, R)
where
    B: Send + 'static,
    R: Send + 'static,
{
    let mut writing = pool.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(theirs))
        .bind(order_id)
        .execute(&mut *writing)
        .await
        .unwrap();
    let (before, raced) = queued_in_a_batch(pool, hold, before, raced).await;
    until_blocked_by(pool, backend_pid(&mut writing).await).await;
    writing.commit().await.unwrap();
    let raced = raced.await.unwrap();
    (before.await.unwrap(), raced)
}

/// PostgreSQL: sends `then` in a batch of the shared transaction, after
/// `before` (a request that cannot run alone), and returns both answers:
/// one transaction holds a lock `before` needs (`hold`), `before` waits on
/// it, `then` queues behind it, and the lock is let go.
pub async fn in_a_batch_after<B, R>(
    pool: &sqlx::AnyPool,
    hold: &'static str,
    before: impl Future<Output = B> + Send + 'static,
    then: impl Future<Output = R> + Send + 'static,
) -> (B, R)
where
    B: Send + 'static,
    R: Send + 'static,
{
    let (before, then) = queued_in_a_batch(pool, hold, before, then).await;
    let then = then.await.unwrap();
    (before.await.unwrap(), then)
}

/// `before` sent to wait on a lock (`hold`) another transaction holds,
/// `then` queued behind it in its batch, and the lock let go.
async fn queued_in_a_batch<B, R>(
    pool: &sqlx::AnyPool,
    hold: &'static str,
    before: impl Future<Output = B> + Send + 'static,
    then: impl Future<Output = R> + Send + 'static,
) -> (tokio::task::JoinHandle<B>, tokio::task::JoinHandle<R>)
where
    B: Send + 'static,
    R: Send + 'static,
{
    let mut holding = pool.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(hold))
        .execute(&mut *holding)
        .await
        .unwrap();
    let before = tokio::spawn(before);
    until_blocked_by(pool, backend_pid(&mut holding).await).await;
    let then = tokio::spawn(then);
    // Queued behind the request before, in its batch.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    holding.commit().await.unwrap();
    (before, then)
}

/// PostgreSQL: sends `raced` alone (no other request in flight, so that it
/// may commit with its one statement, outside the shared transaction) in a
/// race with another connection, which has written, not yet committed, a
/// row `raced` will write too (`theirs`, a statement whose `$1` is `key`).
/// `raced` comes to wait on that row, which then commits.
pub async fn race_alone<R>(
    pool: &sqlx::AnyPool,
    theirs: &str,
    key: &str,
    raced: impl Future<Output = R> + Send + 'static,
) -> R
where
    R: Send + 'static,
{
    let mut writing = pool.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(theirs.to_owned()))
        .bind(key)
        .execute(&mut *writing)
        .await
        .unwrap();
    let raced = tokio::spawn(raced);
    until_blocked_by(pool, backend_pid(&mut writing).await).await;
    writing.commit().await.unwrap();
    raced.await.unwrap()
}

/// A statement that stores `request`'s refusal under its `request_id` (its
/// `$1`), as another process of the service would have: FAILED_PRECONDITION
/// with `message`, for `method`.
pub fn stored_refusal(method: &str, request: &impl prost::Message, message: &str) -> String {
    let fingerprint: String = request
        .encode_to_vec()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!(
        "INSERT INTO idempotency (request_id, method, fingerprint, created_at_ms, status_code, status_message) \
         VALUES ($1, '{method}', decode('{fingerprint}', 'hex'), 0, {}, '{message}')",
        tonic::Code::FailedPrecondition as i32
    )
}

/// The backend process of a connection (a transaction a test holds open).
async fn backend_pid(conn: &mut sqlx::AnyConnection) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await
        .unwrap()
}

/// Waits until a statement on the database behind `pool` waits on a lock
/// that the backend `blocker` holds (a race set up by a test).
async fn until_blocked_by(pool: &sqlx::AnyPool, blocker: i32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
        )
        .bind(blocker)
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no statement came to wait on backend {blocker}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Makes every `COMMIT` that follows an insert into `table` of a row
/// matching `when` (a trigger condition on `NEW`) sleep 20 s, as a stalled
/// server would: a deferred trigger that runs at commit time.
pub async fn stall_commits_after_inserts(pool: &sqlx::AnyPool, table: &str, when: &str) {
    for statement in [
        "CREATE FUNCTION slow_commit() RETURNS trigger AS $$ BEGIN PERFORM pg_sleep(20); RETURN NULL; END $$ LANGUAGE plpgsql".to_owned(),
        format!(
            "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON {table} DEFERRABLE INITIALLY DEFERRED \
             FOR EACH ROW WHEN ({when}) EXECUTE FUNCTION slow_commit()"
        ),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(pool)
            .await
            .unwrap();
    }
}
