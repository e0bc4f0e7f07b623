//! Existence checks in lists of 25 (`GET /orders?search=`): fewer requests, never a
//! create for an order that has a group, whatever the list answers.

use kohort_batch::Exit;
use kohort_batch::sandbox::{ListAnswer, SandboxConfig};

use crate::util::*;

/// 40 fresh orders and 10 that came through checkout with a group already.
fn mixed_rows() -> String {
    let mut text = csv_rows(40);
    for i in 1..=10 {
        text.push_str(&format!("cus_c{i},ord_checkout_{i:03},it\n"));
    }
    text
}

fn requests(sb: &kohort_batch::sandbox::Sandbox, route: &str) -> u64 {
    sandbox_requests(sb, |k| k.starts_with(route))
}

/// What every run below must show: one group per order, no create for a checkout
/// order, each of those recorded as existing.
async fn assert_exactly_once(s: &Scene) {
    assert_eq!(s.sb.stats(false).duplicate_keys, 0);
    assert_eq!(requests(&s.sb, "POST /groups"), 40, "creates");
    assert_eq!(
        count(
            &s.db,
            "SELECT count(*) FROM jobs WHERE obtained = 'existing'"
        ),
        10
    );
    assert_eq!(
        count(
            &s.db,
            "SELECT count(*) FROM jobs WHERE obtained = 'created'"
        ),
        40
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn checks_go_in_lists_of_25_and_cost_one_request_per_25_orders() {
    let s = Scene::new(SandboxConfig::default(), &mixed_rows()).await;
    assert_eq!(s.run(&s.args()).await, Exit::Success);
    assert_exactly_once(&s).await;
    let stats = s.sb.stats(false);
    assert_eq!(
        stats.list_ids_asked, 50,
        "every order asked once, in a list"
    );
    assert!(requests(&s.sb, "GET /orders ") <= 4, "{:?}", stats.requests);
    assert_eq!(
        requests(&s.sb, "GET /orders/{id}"),
        0,
        "{:?}",
        stats.requests
    );
    // A list request is recorded with each job it checked, and counted once.
    assert_eq!(
        count(
            &s.db,
            "SELECT count(*) FROM attempts WHERE kind = 'list_orders'"
        ),
        50
    );
}

/// A list that ignores the search, one that refuses every search, one that answers
/// for only the first order asked, and one whose orders do not say whether they
/// have a group: the client uses only what was asked and answered, checks the rest
/// one by one, and never creates a second group.
#[tokio::test(flavor = "multi_thread")]
async fn an_untrustworthy_list_never_leads_to_a_second_group() {
    for answer in [
        ListAnswer::Unfiltered,
        ListAnswer::Refused,
        ListAnswer::FirstOnly,
        ListAnswer::Summaries,
    ] {
        let cfg = SandboxConfig {
            list_answer: answer,
            ..SandboxConfig::default()
        };
        let s = Scene::new(cfg, &mixed_rows()).await;
        assert_eq!(s.run(&s.args()).await, Exit::Success, "{answer:?}");
        assert_exactly_once(&s).await;
        let singles = requests(&s.sb, "GET /orders/{id}");
        match answer {
            // Refused once, then batching is off: every order on its own.
            ListAnswer::Refused => {
                assert_eq!(requests(&s.sb, "GET /orders 400"), 1);
                assert_eq!(singles, 50);
            }
            _ => assert!(singles >= 40, "{answer:?}: {singles} single checks"),
        }
    }
}
