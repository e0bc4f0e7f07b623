//! The API client against real sockets: transport failures land in the right class,
//! and both spellings of a group parse.

use std::time::Duration;

use kohort_batch::api::{ApiClient, ApiKey, Class};
use kohort_batch::job::{Payload, SendBody};
use kohort_batch::sandbox::SandboxConfig;

use crate::util::*;

fn payload(order: &str) -> SendBody {
    SendBody::from(&Payload {
        customer_id: "cus_1".into(),
        order_id: Some(order.into()),
        payment_intent_id: None,
        expires_at: None,
        mid_expire_at: None,
        metadata: None,
    })
}

fn client(base: &str, timeout: Duration) -> ApiClient {
    ApiClient::new(base, &ApiKey::new(KEY.into()), timeout, None).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_refused_is_retry_because_nothing_was_sent() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }; // closed again: nothing listens there now
    let reply = client(&format!("http://127.0.0.1:{port}"), Duration::from_secs(2))
        .create_group(&payload("o1"))
        .await;
    assert_eq!(reply.class, Class::Retry, "{:?}", reply.error);
    assert!(reply.error.unwrap().starts_with("could not connect"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timeout_after_sending_is_ambiguous() {
    let slow = Duration::from_millis(800);
    let sb = sandbox(SandboxConfig {
        latency: (slow, slow),
        ..SandboxConfig::default()
    })
    .await;
    let reply = client(&sb.url(), Duration::from_millis(200))
        .create_group(&payload("o1"))
        .await;
    assert_eq!(reply.class, Class::Ambiguous, "{:?}", reply.error);
    assert!(reply.error.unwrap().starts_with("timed out"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_connection_is_ambiguous() {
    let sb = sandbox(SandboxConfig {
        reset: 1.0,
        ..SandboxConfig::default()
    })
    .await;
    let reply = client(&sb.url(), Duration::from_secs(2))
        .create_group(&payload("o1"))
        .await;
    assert_eq!(
        reply.class,
        Class::Ambiguous,
        "{:?} {:?}",
        reply.status,
        reply.error
    );
    assert_eq!(sb.stats(false).groups_total, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn created_group_and_lookups_round_trip() {
    let sb = sandbox(SandboxConfig::default()).await;
    let api = client(&sb.url(), Duration::from_secs(2));
    let created = api.create_group(&payload("ord_rt")).await;
    assert_eq!((created.class, created.status), (Class::Ok, Some(201)));
    let group = created.value.unwrap();
    assert!(
        group.id.starts_with("pg_") && group.share_id.as_deref().unwrap().starts_with("KHT-test-")
    );
    assert_eq!(group.status.as_deref(), Some("OPEN"));
    let order = api.order_group("ord_rt").await;
    assert_eq!(order.value, Some(Some(group.id.clone())));
    let by_share = api.group(group.share_id.as_deref().unwrap()).await;
    assert_eq!(by_share.value.unwrap().unwrap().id, group.id);
    let missing = api.group("pg_00000000000000").await;
    assert_eq!((missing.class, missing.value), (Class::Ok, Some(None)));
}
