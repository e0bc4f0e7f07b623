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

/// The sandbox's order list follows the server's rules (issue 15's groundwork):
/// `take` 1..25, `,` for AND and ` OR ` for OR, exact `field:value`, faults apply.
#[tokio::test(flavor = "multi_thread")]
async fn the_sandbox_lists_orders_by_the_servers_rules() {
    let sb = sandbox(SandboxConfig::default()).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let get = |query: String| {
        let (http, url) = (http.clone(), format!("{}/orders?{query}", sb.url()));
        async move {
            let resp = http
                .get(url)
                .header("Authorization", format!("Bearer {KEY}"))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, body) =
        get("search=id:ord_b OR id:ord_checkout_1 OR id:ord_unknown_9&take=25".into()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["count"], 2, "{body}");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["ord_b", "ord_checkout_1"]);
    assert!(body["data"][0]["payment_group_id"].is_null());
    assert!(
        body["data"][1]["payment_group_id"]
            .as_str()
            .unwrap()
            .starts_with("pg_")
    );
    // `,` is AND: an order is not two orders at once.
    let (_, body) = get("search=id:ord_b,id:ord_checkout_1&take=25".into()).await;
    assert_eq!(body["count"], 0);
    // take and skip.
    let (_, body) = get("search=id:ord_b OR id:ord_checkout_1&take=1&skip=1".into()).await;
    assert_eq!(
        (body["count"].as_u64(), body["data"][0]["id"].as_str()),
        (Some(2), Some("ord_checkout_1"))
    );
    for take in ["26", "0", "x"] {
        let (status, body) = get(format!("search=id:ord_b&take={take}")).await;
        assert_eq!(status, 400, "take={take}");
        assert!(body["error"]["message"].is_array(), "{body}");
    }
    // Ids asked by the lists answered (a refused list asks nothing).
    assert_eq!(sb.stats(false).list_ids_asked, 3 + 2 + 2);
    // Faults apply to the list like to any route.
    sb.set_faults(SandboxConfig {
        error_503: 1.0,
        ..SandboxConfig::default()
    });
    let (status, _) = get("search=id:ord_b&take=1".into()).await;
    assert_eq!(status, 503);
}
